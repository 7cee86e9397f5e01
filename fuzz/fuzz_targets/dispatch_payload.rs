//! A `POST /dispatch_process` body taken as the front takes it
//! (`front::Request::json` into `ProcessPayload`), then validated and
//! recorded by `api::Context::dispatch` on in-memory storage and the
//! embedded queue, as the admin. Malformed bodies are 400/422, refused
//! images are rows marked failed with a stable code, nothing panics.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use kiln::api::sais::ProcessPayload;
use kiln::api::{Caller, Context};
use kiln::config::{Config, Sources};
use kiln::filter::FilterSet;
use kiln::front::Request;
use kiln::index::Index;
use kiln::queue::EmbeddedQueue;
use kiln::security::NetworkPolicy;
use kiln::storage::Storage;
use libfuzzer_sys::fuzz_target;

/// `wait: true` would poll for up to `sais.wait_timeout_ms`: not here.
const TOML: &str = "[storage]\nurl = \"memory://\"\n[sais]\nwait_timeout_ms = 0\nmax_images = 50\n";

fn context(config: &Arc<Config>) -> Context {
    Context::new(
        config.clone(),
        Arc::new(FilterSet::from_config(config).unwrap()),
        Storage::open("memory://").unwrap(),
        Arc::new(Index::new(&config.index, None)),
        Arc::new(EmbeddedQueue::new(&config.queue)),
        NetworkPolicy::default(),
        "fuzz-admin-key-0123456789".into(),
    )
}

fuzz_target!(|body: &[u8]| {
    let request = Request {
        method: Method::POST,
        path: "/dispatch_process".into(),
        query: None,
        if_none_match: None,
        bearer: None,
        content_type: Some("application/json".into()),
        body: Bytes::copy_from_slice(body),
    };
    let payload: ProcessPayload = match request.json() {
        Ok(payload) => payload,
        Err(e) => {
            assert!(matches!(e.code(), "bad-request" | "invalid-payload"), "{e}");
            return;
        }
    };
    let images = payload.images.as_ref().map_or(0, Vec::len);
    let config = Arc::new(
        Config::load_from(Sources {
            extra_toml: Some(TOML),
            ..Default::default()
        })
        .unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = context(&config);
    match runtime.block_on(ctx.dispatch(&Caller::Admin, payload)) {
        Ok(rows) => {
            assert!(
                rows.len() <= images,
                "{} rows for {images} images",
                rows.len()
            );
            for row in rows {
                if row.marking == "failed" {
                    let code = row.error.as_ref().map(|e| e.code.as_str());
                    assert!(
                        matches!(code, Some("invalid-url" | "address-denied")),
                        "failed row with {code:?}"
                    );
                }
            }
        }
        Err(e) => assert!(
            matches!(
                e.code(),
                "invalid-payload"
                    | "unknown-account"
                    | "invalid-path"
                    | "invalid-url"
                    | "address-denied"
            ),
            "unexpected {}: {e}",
            e.code()
        ),
    }
});
