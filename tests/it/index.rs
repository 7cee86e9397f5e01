//! The variant index against a real Redis: what one process marks in one
//! round trip another finds, and a worker's batched look-up asks storage
//! only about variants nobody knows, leaving no absent markers behind.

use std::sync::Arc;

use bytes::Bytes;
use kiln::config::{Config, Sources};
use kiln::index::{Index, VariantInfo};
use kiln::keys::RedisKeys;
use kiln::redis_conn::RedisHandle;
use kiln::storage::Storage;

use crate::support::{png_rgba, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_batched_lookup_asks_storage_only_about_unknown_variants() {
    let server = RedisServer::start();
    let mut config = Config::load_from(Sources::default()).unwrap();
    config.redis.url = server.url();
    let handle = Arc::new(RedisHandle::new(&config.redis).unwrap());
    let keys = RedisKeys::new(&config.redis.prefix);
    let storage = Storage::open("memory://").unwrap();
    let new_index = || Index::new(&config.index, Some((handle.clone(), keys.clone())));
    let png = Bytes::from(png_rgba(4, 3, [200, 10, 10, 255]));
    let info = VariantInfo::of_bytes(&png, 1_700_000_000);

    // One process stores two variants and marks them in one go.
    let (small, medium) = ("small/a/x.png", "medium/a/x.png");
    // An earlier attempt failed one; a front marked the other absent.
    let stale = [keys.variant_failure(small), keys.variant_absent(medium)];
    server.redis_cli(&["SET", &stale[0], "{}"]);
    server.redis_cli(&["SET", &stale[1], "1"]);
    for variant in [small, medium] {
        storage.put(variant, png.clone()).await.unwrap();
    }
    let dels = server.command_calls("del");
    new_index()
        .mark_all(vec![
            (small.into(), info.clone()),
            (medium.into(), info.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(
        server.redis_cli(&["EXISTS", &stale[0], &stale[1]]),
        ":0",
        "marking clears the failure and absent markers"
    );
    assert_eq!(server.command_calls("del") - dels, 1, "in one DEL");
    new_index().mark_all(Vec::new()).await.unwrap();
    // In storage only (written by an older kiln, say).
    let large = "large/a/x.png";
    storage.put(large, png.clone()).await.unwrap();
    // Marked absent by a front; stored since, so only trusting the marker
    // answers "not stored".
    let tiny = "tiny/a/x.png";
    storage.put(tiny, png.clone()).await.unwrap();
    server.redis_cli(&["SET", &keys.variant_absent(tiny), "1"]);
    // Nowhere.
    let square = "square/a/x.png";

    // Another process (a worker), with nothing in memory.
    let variants: Vec<String> = [small, medium, large, tiny, square]
        .map(String::from)
        .into();
    let found = new_index().stored_of(&storage, &variants).await.unwrap();
    let described = |i: usize| {
        found[i]
            .as_ref()
            .map(|(info, bytes)| ((**info).clone(), bytes.clone()))
    };
    assert_eq!(
        described(0),
        Some((info.clone(), None)),
        "small, from Redis"
    );
    assert_eq!(
        described(1),
        Some((info.clone(), None)),
        "medium, from Redis"
    );
    assert_eq!(
        described(2),
        Some((
            info_of_stored(&png, &storage, large).await,
            Some(png.clone())
        ))
    );
    assert_eq!(described(3), None, "tiny is marked absent");
    assert_eq!(described(4), None, "square is nowhere");

    // What storage alone held is now indexed for everyone; nothing was marked absent.
    assert_eq!(
        server.redis_bulk(&["HGET", &keys.variant_index(large), "size"]),
        Some(png.len().to_string())
    );
    assert_eq!(
        server.redis_int(&["EXISTS", &keys.variant_absent(square)]),
        0
    );
    assert_eq!(
        server.redis_int(&["EXISTS", &keys.variant_absent(large)]),
        0
    );
}

/// What the index records for bytes storage holds: their own mtime.
async fn info_of_stored(bytes: &[u8], storage: &Storage, path: &str) -> VariantInfo {
    let stored = storage.head(path).await.unwrap().expect("stored");
    VariantInfo::of_bytes(bytes, stored.last_modified)
}
