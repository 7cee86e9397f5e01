//! `Config::load_from` on arbitrary TOML: an answer, never a panic; what
//! it accepts passes `validate` and yields usable decoder limits.
#![no_main]

use kiln::config::{Config, Sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|toml: &str| {
    let loaded = Config::load_from(Sources {
        extra_toml: Some(toml),
        ..Default::default()
    });
    match loaded {
        Ok(config) => {
            config
                .validate()
                .expect("load_from returned an invalid config");
            let limits = kiln::imaging::Limits::from(&config.imaging);
            assert!(limits.max_width > 0 && limits.max_height > 0 && limits.max_pixels > 0);
            config.allowed_networks().expect("validated networks");
            config.listen_addr().expect("validated listen address");
        }
        Err(e) => assert_eq!(e.code(), "invalid-config", "{e}"),
    }
});
