//! `imaging::decode` with small limits: Ok within the limits or a stable
//! error, never a panic, and never an image past the limits.
#![no_main]

use kiln::imaging::{decode, Limits};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_width: 4096,
    max_height: 4096,
    max_pixels: 4_000_000,
    max_alloc_bytes: 64 << 20,
};

fuzz_target!(|bytes: &[u8]| {
    match decode(bytes, LIMITS) {
        Ok(decoded) => {
            let (w, h) = (decoded.width(), decoded.height());
            assert!(w > 0 && h > 0);
            assert!(w <= LIMITS.max_width && h <= LIMITS.max_height);
            assert!(u64::from(w) * u64::from(h) <= LIMITS.max_pixels);
            assert!(kiln::imaging::sniff(bytes).is_some());
        }
        Err(e) => assert!(
            matches!(
                e.code(),
                "unsupported-image" | "image-too-large" | "decode-failed"
            ),
            "unexpected error {e}"
        ),
    }
});
