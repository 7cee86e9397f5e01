//! The only place that spells storage paths, Redis keys, media codes and job
//! ids. Pure.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};

/// SAIS media code: xxh3-64 of the URL bytes followed by the root bytes, as
/// 16 lowercase hex digits.
pub fn media_code(url: &str, root: &str) -> String {
    let mut input = Vec::with_capacity(url.len() + root.len());
    input.extend_from_slice(url.as_bytes());
    input.extend_from_slice(root.as_bytes());
    format!("{:016x}", xxh3_64(&input))
}

/// Strong ETag of a variant's bytes.
pub fn etag(bytes: &[u8]) -> String {
    format!("\"{:016x}\"", xxh3_64(bytes))
}

const BIN_ALPHABET: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// SAIS G2 bin count: floor(approx / 1001) + 1.
pub fn bin_count(approx: u64) -> u64 {
    approx / 1001 + 1
}

/// SAIS G2 bin of a code. Bins past 62² get a third symbol instead of
/// SAIS's overflow into an empty symbol.
pub fn bin_for(code: &str, approx: u64) -> String {
    let num = code
        .get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    let bin = u64::from(num) % bin_count(approx);
    let symbol = |i: u64| BIN_ALPHABET[i as usize] as char;
    match bin {
        b if b < 62 => symbol(b).to_string(),
        b if b < 62 * 62 => format!("{}{}", symbol(b / 62), symbol(b % 62)),
        b => format!(
            "{}{}{}",
            symbol(b / 3844 % 62),
            symbol(b / 62 % 62),
            symbol(b % 62)
        ),
    }
}

/// File extension for a sniffed MIME type.
pub fn extension_for_mime(mime: &str) -> &'static str {
    match mime {
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => "img",
    }
}

/// Extension of a URL's last path segment when it names an image type.
pub fn extension_from_url(url: &url::Url) -> Option<&'static str> {
    let last = url.path_segments()?.next_back()?;
    let ext = last.rsplit_once('.')?.1.to_ascii_lowercase();
    match ext.as_str() {
        "jpg" | "jpeg" => Some("jpg"),
        "png" => Some("png"),
        "gif" => Some("gif"),
        "webp" => Some("webp"),
        _ => None,
    }
}

/// A storage root (account) name: a single safe path segment.
pub fn validate_root(root: &str) -> Result<()> {
    if crate::filter::is_identifier(root) && root != "media" && root != "meta" && root != "accounts"
    {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "root {root:?} must be 1-64 of [A-Za-z0-9_-] and not a reserved name"
        )))
    }
}

/// Where an original is stored: `<root>/<bin>/<code>.<ext>`.
pub fn original_path(root: &str, approx: u64, code: &str, ext: &str) -> String {
    format!("{root}/{}/{code}.{ext}", bin_for(code, approx))
}

/// Where a variant is stored: the cache URL's path, so the tree can be served statically.
pub fn variant_path(filter: &str, original: &str) -> String {
    format!("media/cache/{filter}/{original}")
}

/// The public URL of a variant.
pub fn variant_url(public_base: &str, filter: &str, original: &str) -> String {
    let encoded: Vec<String> = original
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string())
        .collect();
    format!("{public_base}/media/cache/{filter}/{}", encoded.join("/"))
}

const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Where a media record is stored.
pub fn media_record_path(code: &str) -> String {
    format!("meta/{code}.json")
}

/// The code of an original at a SAIS path (its file stem), if it has one.
pub fn code_from_path(original: &str) -> Option<&str> {
    let stem = original.rsplit('/').next()?.split('.').next()?;
    (stem.len() == 16 && stem.bytes().all(|b| b.is_ascii_hexdigit())).then_some(stem)
}

/// One job per original and set of filters; misses for the same ones share it.
pub fn dedupe_key(original: &str, filters: &[String]) -> String {
    let mut sorted: Vec<&str> = filters.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    format!(
        "{:016x}",
        xxh3_64(format!("{}\n{original}", sorted.join(",")).as_bytes())
    )
}

/// A fresh, unique job id.
pub fn job_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{millis:x}-{:016x}", rand::random::<u64>())
}

/// Redis key names, all under one prefix. Keys that a Lua script touches
/// together share a `{dedupe}` hash tag.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: &str) -> Self {
        RedisKeys {
            prefix: prefix.to_string(),
        }
    }

    pub fn stream(&self, priority: &str) -> String {
        format!("{}jobs:{priority}", self.prefix)
    }

    pub fn dead_letter(&self) -> String {
        format!("{}jobs:dead", self.prefix)
    }

    pub fn inflight(&self, dedupe: &str) -> String {
        format!("{}inflight:{{{dedupe}}}", self.prefix)
    }

    pub fn callbacks(&self, dedupe: &str) -> String {
        format!("{}callbacks:{{{dedupe}}}", self.prefix)
    }

    pub fn variant_index(&self, variant_path: &str) -> String {
        format!("{}variant:{variant_path}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sais_code_vectors() {
        assert_eq!(
            media_code(
                "https://cdn.dummyjson.com/products/images/beauty/Powder%20Canister/1.png",
                "test"
            ),
            "b53470c4d6e0576d"
        );
        assert_eq!(media_code("abc.com", "root"), "323cacebbf207228");
    }

    #[test]
    fn sais_bin_vectors() {
        let code = "323cacebbf207228";
        for (approx, bin) in [
            (100, "0"),
            (1000, "0"),
            (11000, "1"),
            (130000, "B"),
            (380000, "4j"),
            (500000, "3F"),
            (920000, "6f"),
            (6500000, "7f"),
        ] {
            assert_eq!(bin_for(code, approx), bin, "approx {approx}");
        }
        for (approx, count) in [
            (100, 1),
            (1000, 1),
            (1001, 2),
            (5000, 5),
            (82444, 83),
            (100000, 100),
        ] {
            assert_eq!(bin_count(approx), count);
        }
        // Past SAIS's overflow point every bin still has a full name.
        assert_eq!(bin_for("ffffffff00000000", 100_000_000).len(), 3);
    }

    #[test]
    fn paths_and_urls() {
        assert_eq!(
            original_path("acme", 100, "323cacebbf207228", "jpg"),
            "acme/0/323cacebbf207228.jpg"
        );
        assert_eq!(
            variant_path("small", "acme/0/x.jpg"),
            "media/cache/small/acme/0/x.jpg"
        );
        assert_eq!(
            variant_url("http://k", "small", "a b/0/x.jpg"),
            "http://k/media/cache/small/a%20b/0/x.jpg"
        );
        assert_eq!(
            code_from_path("acme/0/323cacebbf207228.jpg"),
            Some("323cacebbf207228")
        );
        assert_eq!(
            dedupe_key("p", &["b".into(), "a".into()]),
            dedupe_key("p", &["a".into(), "b".into(), "a".into()])
        );
        assert!(validate_root("acme-1").is_ok());
        assert!(validate_root("../x").is_err());
        assert!(validate_root("media").is_err());
        let url = url::Url::parse("http://o/a/b.JPEG?x=1").unwrap();
        assert_eq!(extension_from_url(&url), Some("jpg"));
    }
}
