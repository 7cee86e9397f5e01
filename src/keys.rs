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

/// SAIS G3 (v2 client) media code: xxh3-64 of the normalised URL, root
/// ignored. Only used to find records a newer client names by this code.
pub fn normalized_code(url: &str) -> String {
    format!("{:016x}", xxh3_64(normalize_url(url).as_bytes()))
}

/// The v2 client's URL normalisation: lowercase scheme and host, default
/// port, user-info and fragment dropped, empty path `/`, query re-encoded
/// with sorted keys. Strings without scheme or host are only trimmed.
pub fn normalize_url(raw: &str) -> String {
    let trimmed = raw.trim();
    let Ok(parsed) = url::Url::parse(trimmed) else {
        return trimmed.to_string();
    };
    let Some(host) = parsed.host_str() else {
        return trimmed.to_string();
    };
    let scheme = parsed.scheme().to_ascii_lowercase();
    let mut out = format!("{scheme}://{}", host.to_ascii_lowercase());
    // `Url` already drops the scheme's default port.
    if let Some(port) = parsed.port() {
        out.push_str(&format!(":{port}"));
    }
    let path = parsed.path();
    out.push_str(if path.is_empty() { "/" } else { path });
    if let Some(query) = parsed.query() {
        let rebuilt = php_sorted_query(query);
        if !rebuilt.is_empty() {
            out.push('?');
            out.push_str(&rebuilt);
        }
    }
    out
}

/// PHP `parse_str` then `ksort` then `http_build_query(RFC 3986)`: later
/// duplicates win, dots and spaces in keys become `_`, `k` alone is `k=`,
/// `k[]=a&k[]=b` is a list written back as `k[0]=a&k[1]=b`.
fn php_sorted_query(query: &str) -> String {
    use std::collections::BTreeMap;
    enum Value {
        One(String),
        List(Vec<String>),
    }
    let mut params: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let (name, is_list) = match key.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (key.as_ref(), false),
        };
        if name.is_empty() {
            continue;
        }
        let name = name.replace(['.', ' '], "_");
        let value = value.into_owned();
        if is_list {
            match params.get_mut(&name) {
                Some(Value::List(items)) => items.push(value),
                _ => {
                    params.insert(name, Value::List(vec![value]));
                }
            }
        } else {
            params.insert(name, Value::One(value));
        }
    }
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string();
    let mut pairs = Vec::new();
    for (name, value) in &params {
        match value {
            Value::One(v) => pairs.push(format!("{}={}", encode(name), encode(v))),
            Value::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    pairs.push(format!("{}={}", encode(&format!("{name}[{i}]")), encode(v)));
                }
            }
        }
    }
    pairs.join("&")
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

/// A path asked for as an original (a cache URL's, a purge's): refused
/// when it lies in one of kiln's own trees, or a cache URL could make a
/// variant, a media record or an account the source of a render, and of
/// the media record its file name points at.
pub fn validate_original_path(path: &str) -> Result<()> {
    match OWN_TREES.iter().find(|tree| path.starts_with(*tree)) {
        Some(tree) => Err(Error::InvalidPath(format!(
            "{tree} holds kiln's own files, not originals"
        ))),
        None => Ok(()),
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

/// Top-level names of kiln's own trees in storage (variants, records,
/// accounts): no account is named after one.
const RESERVED_ROOTS: [&str; 3] = ["media", "meta", "accounts"];

/// Where kiln keeps what it writes besides originals.
const OWN_TREES: [&str; 3] = ["media/cache/", "meta/", "accounts/"];

/// A storage root (account) name: a single safe path segment.
pub fn validate_root(root: &str) -> Result<()> {
    if crate::filter::is_identifier(root) && !RESERVED_ROOTS.contains(&root) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "root {root:?} must be 1-64 of [A-Za-z0-9_-] and not a reserved name"
        )))
    }
}

/// Where an original is stored: `<root>/<bin>/<code>.<ext>`.
pub fn original_path(root: &str, approx: u64, code: &str, ext: &str) -> String {
    format!("{}.{ext}", original_stem(root, approx, code))
}

/// An original's path before its extension: `<root>/<bin>/<code>`.
pub fn original_stem(root: &str, approx: u64, code: &str) -> String {
    format!("{root}/{}/{code}", bin_for(code, approx))
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

/// Where an account is stored.
pub fn account_path(root: &str) -> String {
    format!("accounts/{root}.json")
}

/// A marker per media of an account; listing them counts the account's media.
pub fn account_media_marker(root: &str, code: &str) -> String {
    format!("{}/{code}", account_media_prefix(root))
}

pub fn account_media_prefix(root: &str) -> String {
    format!("accounts/{root}/media")
}

/// Where a G3 (normalised-URL) code points at an account's record.
pub fn normalized_alias_path(normalized_code: &str, root: &str) -> String {
    format!("{}/{root}.json", normalized_alias_prefix(normalized_code))
}

pub fn normalized_alias_prefix(normalized_code: &str) -> String {
    format!("meta/g3/{normalized_code}")
}

/// Which root an API key (by its SHA-256 digest) belongs to.
pub fn api_key_path(digest: &str) -> String {
    format!("meta/keys/{digest}.json")
}

/// Whether a string looks like a media code (16 hex digits).
pub fn is_media_code(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The code of an original at a SAIS path (its file stem), if it has one.
pub fn code_from_path(original: &str) -> Option<&str> {
    let stem = original.rsplit('/').next()?.split('.').next()?;
    is_media_code(stem).then_some(stem)
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

/// Storage path of the `/ui` page's sample original, which each filter
/// preset's sample rendering is made from.
pub const UI_SAMPLE_PATH: &str = "kiln-ui/sample.png";

/// A Redis key one module hands another to set (to 1, expiring) in that
/// module's next round trip: the index's "absent until rendered" marker
/// rides with the queue's enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiringMarker {
    pub key: String,
    pub ttl_secs: u64,
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

    /// Jobs of this priority backing off before a retry (a sorted set by due time).
    pub fn delayed(&self, priority: &str) -> String {
        format!("{}jobs:{priority}:delayed", self.prefix)
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

    /// Webhook deliveries waiting, scored by when they are due (ms). The
    /// three webhook keys share a hash tag so their scripts run on Cluster.
    pub fn webhooks_due(&self) -> String {
        format!("{}{{webhooks}}:due", self.prefix)
    }

    /// Hash of delivery id to the delivery's JSON.
    pub fn webhooks_pending(&self) -> String {
        format!("{}{{webhooks}}:pending", self.prefix)
    }

    /// Deliveries that ran out of attempts, newest first.
    pub fn webhooks_dead(&self) -> String {
        format!("{}{{webhooks}}:dead", self.prefix)
    }

    /// A variant whose job failed for good (JSON, expiring).
    pub fn variant_failure(&self, variant_path: &str) -> String {
        format!("{}failed:{variant_path}", self.prefix)
    }

    /// A variant storage was asked for and did not hold (set, expiring,
    /// until a render records the variant).
    pub fn variant_absent(&self, variant_path: &str) -> String {
        format!("{}absent:{variant_path}", self.prefix)
    }

    /// The marker saying a variant's render is queued and storage lacks it
    /// (`variant_absent`), to be set in the queue's round trip.
    pub fn render_expected(&self, variant_path: &str, ttl_secs: u64) -> ExpiringMarker {
        ExpiringMarker {
            key: self.variant_absent(variant_path),
            ttl_secs,
        }
    }

    /// A lock on one media record, held by the process changing it.
    pub fn record_lock(&self, code: &str) -> String {
        format!("{}lock:record:{code}", self.prefix)
    }

    /// Capped list of recently finished jobs (JSON, newest first) for `/ui`.
    pub fn recent_jobs(&self) -> String {
        format!("{}jobs:recent", self.prefix)
    }

    pub fn variant_index(&self, variant_path: &str) -> String {
        format!("{}variant:{variant_path}", self.prefix)
    }

    /// Pub/sub channel of purged variant paths: every process drops its
    /// in-memory copies of them.
    pub fn purges(&self) -> String {
        format!("{}purges", self.prefix)
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
    fn normalised_code_vectors() {
        assert_eq!(
            normalized_code(
                "https://cdn.dummyjson.com/products/images/beauty/Powder%20Canister/1.png"
            ),
            "6cb2d0d5fcb46e21"
        );
        assert_eq!(normalized_code("abc.com"), "5721165f1ed5e9ca");
        assert_eq!(
            normalize_url("HTTPS://User:pw@Example.COM:443?b=2&a=1&a=3&c.d=x y#frag"),
            "https://example.com/?a=3&b=2&c_d=x%20y"
        );
        assert_eq!(
            normalize_url("http://e.com:8080/p?k&l[]=1&l[]=2"),
            "http://e.com:8080/p?k=&l%5B0%5D=1&l%5B1%5D=2"
        );
        assert_eq!(normalize_url("  not a url "), "not a url");
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
        for own in [
            "media/cache/small/acme/0/x.jpg",
            "meta/323cacebbf207228.json",
            "accounts/acme.json",
        ] {
            assert!(validate_original_path(own).is_err(), "{own}");
        }
        for original in ["acme/0/x.jpg", "media/photos/x.jpg", "metadata/x.jpg"] {
            assert!(validate_original_path(original).is_ok(), "{original}");
        }
        let url = url::Url::parse("http://o/a/b.JPEG?x=1").unwrap();
        assert_eq!(extension_from_url(&url), Some("jpg"));
    }
}
