//! `security::normalize_path`: whatever it accepts is a relative path of
//! plain segments that cannot leave the storage root, even if decoded again.
#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX: usize = 1024;

fuzz_target!(|raw: &str| {
    let Ok(path) = kiln::security::normalize_path(raw, MAX) else {
        return;
    };
    assert!(raw.len() <= MAX, "accepted {} bytes", raw.len());
    // Percent-decoding only ever shrinks.
    assert!(path.len() <= raw.len(), "{path:?} longer than {raw:?}");
    assert!(!path.is_empty());
    assert!(!path.starts_with('/'), "absolute: {path:?}");
    assert!(
        !path
            .chars()
            .any(|c| c == '\\' || c == '\0' || c.is_control()),
        "backslash or control character in {path:?}"
    );
    for segment in path.split('/') {
        assert!(
            !matches!(segment, "" | "." | ".."),
            "segment {segment:?} in {path:?}"
        );
    }
    // A second decode (by a careless consumer) must not turn it into traversal.
    let again = percent_encoding::percent_decode_str(&path).decode_utf8_lossy();
    assert_eq!(
        again.matches('/').count(),
        path.matches('/').count(),
        "a second decode adds separators to {path:?}"
    );
    assert!(!again.contains('\\') && !again.contains('\0'), "{path:?}");
    assert!(
        again.split('/').all(|s| !matches!(s, "" | "." | "..")),
        "a second decode of {path:?} makes a dot segment"
    );
});
