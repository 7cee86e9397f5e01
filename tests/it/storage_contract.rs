//! One storage contract, two backends: every test here runs as
//! `local::<name>` (a temp directory) and `s3::<name>` (a real
//! `moto_server` bucket under a key prefix). Originals, variants, media
//! records and accounts go through `kiln::storage::Storage` as kiln uses
//! it; what lands is checked from outside (the directory, or moto over
//! plain HTTP), so the prefix mapping is part of the contract.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln::config::{Config, Sources};
use kiln::keys::{self, RedisKeys};
use kiln::redis_conn::RedisHandle;
use kiln::shared_lock::RedisRecordLock;
use kiln::storage::{Account, MediaRecord, Storage, Thumb};

use crate::support::s3::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use crate::support::{dimensions, format_of, jpeg, png_rgba, CountingProxy, Moto, RedisServer};

/// Runs each `async fn name(backend: StoreKind)` as `local::name` and `s3::name`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::StoreKind::Local).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::StoreKind::S3).await
                }
            )*
        }
    };
}

on_both_stores!(
    objects_round_trip_with_bytes_and_sizes_intact,
    missing_objects_are_none_not_errors,
    overwrite_replaces_and_create_never_does,
    listing_and_delete,
    concurrent_record_updates_all_land,
    record_updates_from_two_processes_sharing_redis_all_land,
    a_failing_put_is_a_retryable_storage_error_and_writes_nothing,
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Local,
    S3,
}

/// The bucket test stores live in.
pub const BUCKET: &str = "kiln-test";
/// The key prefix of `s3://kiln-test/<PREFIX>`.
const PREFIX: &str = "site/a";

/// `[storage]` TOML for kiln on moto at `endpoint` (moto itself or a proxy
/// in front of it), with keys under `prefix`.
pub fn s3_storage_toml(endpoint: &str, bucket: &str, prefix: &str) -> String {
    format!(
        "[storage]\nurl = \"s3://{bucket}/{prefix}\"\ns3_endpoint = \"{endpoint}\"\n\
         s3_region = \"{REGION}\"\ns3_allow_http = true\ns3_path_style = true\n\
         s3_access_key_id = \"{ACCESS_KEY_ID}\"\ns3_secret_access_key = \"{SECRET_ACCESS_KEY}\"\n\
         s3_max_retries = 2\ns3_retry_timeout_ms = 3000\n"
    )
}

/// Opens storage the way `kiln::app` does: from the `[storage]` settings.
fn open(storage_toml: &str) -> Storage {
    let config = Config::load_from(Sources {
        extra_toml: Some(storage_toml),
        ..Default::default()
    })
    .expect("storage config");
    Storage::from_config(&config.storage).expect("open storage")
}

/// A store under test and a way to look at what it wrote.
struct Store {
    storage: Storage,
    /// The `[storage]` settings it was opened with, for a second process.
    toml: String,
    kind: StoreKind,
    dir: tempfile::TempDir,
    moto: Option<Moto>,
}

impl Store {
    fn new(kind: StoreKind) -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let (toml, moto) = match kind {
            StoreKind::Local => (
                format!("[storage]\nurl = \"{}\"\n", dir.path().display()),
                None,
            ),
            StoreKind::S3 => {
                let moto = Moto::start();
                moto.create_bucket(BUCKET);
                (
                    s3_storage_toml(&moto.endpoint(), BUCKET, PREFIX),
                    Some(moto),
                )
            }
        };
        Store {
            storage: open(&toml),
            toml,
            kind,
            dir,
            moto,
        }
    }

    /// Every stored key, as the backend spells it: paths under the
    /// directory, or bucket keys (which must carry the prefix).
    fn raw_keys(&self) -> BTreeSet<String> {
        match &self.moto {
            None => walk(self.dir.path(), self.dir.path()),
            Some(moto) => moto.keys(BUCKET, "").into_iter().collect(),
        }
    }

    /// How a storage path is spelled in the backend.
    fn raw_key(&self, path: &str) -> String {
        match self.kind {
            StoreKind::Local => path.to_owned(),
            StoreKind::S3 => format!("{PREFIX}/{path}"),
        }
    }
}

fn walk(root: &std::path::Path, dir: &std::path::Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            found.extend(walk(root, &path));
        } else {
            let relative = path.strip_prefix(root).expect("under root");
            found.insert(relative.to_string_lossy().into_owned());
        }
    }
    found
}

/// Bytes no compression or text handling leaves alone: every byte value,
/// more than one S3 request buffer.
fn big_payload() -> Bytes {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn account(root: &str, key: &str) -> Account {
    Account {
        root: root.into(),
        approx_image_count: 1000,
        bin_count: keys::bin_count(1000),
        media_callback_url: Some("http://127.0.0.1:9/cb".into()),
        api_key: key.into(),
        webhook_secret: "whsec_dGVzdA==".into(),
        created_at: 1,
        updated_at: 2,
        ..Default::default()
    }
}

async fn objects_round_trip_with_bytes_and_sizes_intact(kind: StoreKind) {
    let store = Store::new(kind);
    let storage = &store.storage;
    let image = jpeg(64, 48, [200, 40, 40]);
    let code = keys::media_code("http://127.0.0.1/a.jpg", "shop");
    let original = keys::original_path("shop", 1000, &code, "jpg");
    let variant = keys::variant_path("small", &original);
    let big = keys::variant_path("large", &original);

    storage
        .put(&original, Bytes::from(image.clone()))
        .await
        .unwrap();
    let thumb = png_rgba(8, 6, [1, 2, 3, 255]);
    storage
        .put(&variant, Bytes::from(thumb.clone()))
        .await
        .unwrap();
    let payload = big_payload();
    let info = storage.put(&big, payload.clone()).await.unwrap();
    assert_eq!(info.size, payload.len() as u64);

    let mut record = MediaRecord::new(&code, "shop", Some("http://127.0.0.1/a.jpg"));
    record.path = Some(original.clone());
    record.size = Some(image.len() as u64);
    record.context = serde_json::json!({"sku": "ü-42", "tags": ["a", "b"]});
    assert!(storage.create_media_record(&record).await.unwrap());
    assert!(storage
        .create_account(&account("shop", "k1"))
        .await
        .unwrap());

    let got = storage.get(&original).await.unwrap().expect("original");
    assert_eq!(got.bytes.len(), image.len());
    assert_eq!(format_of(&got.bytes), "jpeg");
    assert_eq!(dimensions(&got.bytes), (64, 48));
    assert_eq!(got.info.size, image.len() as u64);
    let got = storage.get(&variant).await.unwrap().expect("variant");
    assert_eq!(format_of(&got.bytes), "png");
    assert_eq!(dimensions(&got.bytes), (8, 6));
    let got = storage.get(&big).await.unwrap().expect("big variant");
    assert!(got.bytes == payload, "3 MB of bytes come back as written");
    // An original over fetch.max_bytes is refused by its size alone.
    let size = image.len() as u64;
    let got = storage.get_original(&original, size).await.unwrap();
    assert_eq!(got.expect("original at the limit").bytes.len(), image.len());
    let refused = storage.get_original(&original, size - 1).await.unwrap_err();
    assert_eq!(refused.code(), "too-large");

    for (path, size) in [
        (&original, image.len()),
        (&variant, thumb.len()),
        (&big, payload.len()),
    ] {
        let head = storage.head(path).await.unwrap().expect(path);
        assert_eq!(head.size, size as u64, "{path}");
        let age = kiln::storage::now_secs() - head.last_modified;
        assert!((-5..300).contains(&age), "{path}: last modified {age}s ago");
    }
    // The folder holding the original (a prefix on S3) is no object.
    let folder = original.rsplit_once('/').expect("a nested path").0;
    assert!(storage.head(folder).await.unwrap().is_none(), "{folder}");
    assert_eq!(storage.media_record(&code).await.unwrap(), Some(record));
    assert_eq!(
        storage.account("shop").await.unwrap(),
        Some(account("shop", "k1"))
    );

    // Each object is one key, spelled as the layout says, under the prefix.
    let want: BTreeSet<String> = [
        original.clone(),
        variant,
        big,
        keys::media_record_path(&code),
        keys::account_path("shop"),
    ]
    .iter()
    .map(|p| store.raw_key(p))
    .collect();
    assert_eq!(store.raw_keys(), want);
    storage.ping().await.unwrap();
}

async fn missing_objects_are_none_not_errors(kind: StoreKind) {
    let store = Store::new(kind);
    let storage = &store.storage;
    let variant = keys::variant_path("small", "shop/0/none.jpg");
    assert!(storage.get(&variant).await.unwrap().is_none());
    assert!(storage.head(&variant).await.unwrap().is_none());
    assert!(storage
        .get_json::<serde_json::Value>("meta/none.json")
        .await
        .unwrap()
        .is_none());
    assert!(storage
        .media_record("0123456789abcdef")
        .await
        .unwrap()
        .is_none());
    assert!(storage.account("nobody").await.unwrap().is_none());
    assert!(storage.root_for_key("feed").await.unwrap().is_none());
    storage.delete(&variant).await.unwrap();
    assert!(storage.list("media").await.unwrap().is_empty());
    assert_eq!(storage.account_media_count("nobody").await.unwrap(), 0);
    // A path that escapes the root is refused before any backend call.
    let err = storage.get("../escape.jpg").await.unwrap_err();
    assert_eq!(err.code(), "invalid-path");
    assert!(store.raw_keys().is_empty());
}

async fn overwrite_replaces_and_create_never_does(kind: StoreKind) {
    let store = Store::new(kind);
    let storage = &store.storage;
    let variant = keys::variant_path("small", "shop/1/x.jpg");
    storage
        .put(&variant, Bytes::from(jpeg(40, 30, [0, 0, 255])))
        .await
        .unwrap();
    let second = png_rgba(20, 10, [0, 255, 0, 255]);
    storage
        .put(&variant, Bytes::from(second.clone()))
        .await
        .unwrap();
    let got = storage.get(&variant).await.unwrap().unwrap();
    assert_eq!(format_of(&got.bytes), "png");
    assert_eq!(dimensions(&got.bytes), (20, 10));
    assert_eq!(
        storage.head(&variant).await.unwrap().unwrap().size,
        second.len() as u64
    );

    // Accounts and media records are created once: a second create loses
    // and leaves the first in place; a put replaces.
    assert!(storage
        .create_account(&account("shop", "first"))
        .await
        .unwrap());
    assert!(!storage
        .create_account(&account("shop", "second"))
        .await
        .unwrap());
    assert_eq!(
        storage.account("shop").await.unwrap().unwrap().api_key,
        "first"
    );
    storage
        .put_account(&account("shop", "third"))
        .await
        .unwrap();
    assert_eq!(
        storage.account("shop").await.unwrap().unwrap().api_key,
        "third"
    );

    let mut record = MediaRecord::new("0123456789abcdef", "shop", None);
    assert!(storage.create_media_record(&record).await.unwrap());
    record.marking = "resized".into();
    assert!(!storage.create_media_record(&record).await.unwrap());
    assert_eq!(
        storage
            .media_record(&record.code)
            .await
            .unwrap()
            .unwrap()
            .marking,
        "new"
    );
    let unchanged = storage
        .update_media_record(&record.code, |current| (None, current))
        .await
        .unwrap();
    assert_eq!(unchanged.unwrap().marking, "new", "nothing to write");
    let written = storage
        .update_media_record(&record.code, |current| {
            let mut current = current.expect("created above");
            current.marking = "resized".into();
            (Some(current.clone()), current)
        })
        .await
        .unwrap();
    assert_eq!(written.marking, "resized");
    assert_eq!(
        storage
            .media_record(&record.code)
            .await
            .unwrap()
            .unwrap()
            .marking,
        "resized"
    );
    assert_eq!(store.raw_keys().len(), 3, "{:?}", store.raw_keys());
}

/// Concurrent updates of one record each see the others' writes: none is
/// lost, as a job's thumbnail would be if a dispatch wrote back a record it
/// read before the job wrote.
async fn concurrent_record_updates_all_land(kind: StoreKind) {
    let store = Store::new(kind);
    let storage = &store.storage;
    let code = "0123456789abcdef";
    assert!(storage
        .create_media_record(&MediaRecord::new(code, "shop", None))
        .await
        .unwrap());
    let filters: Vec<String> = (0..24).map(|n| format!("filter{n}")).collect();
    let updates = filters.iter().map(|filter| {
        storage.update_media_record(code, move |current| {
            let mut record = current.expect("created above");
            record.thumb_data.insert(filter.clone(), Thumb::pending());
            (Some(record), ())
        })
    });
    futures::future::try_join_all(updates).await.unwrap();
    let stored = storage.media_record(code).await.unwrap().unwrap();
    let mut kept: Vec<&String> = stored.thumb_data.keys().collect();
    kept.sort();
    let mut wanted: Vec<&String> = filters.iter().collect();
    wanted.sort();
    assert_eq!(kept, wanted, "every update's thumbnail is in the record");
}

/// The same across processes: two fronts or workers with storage of their
/// own over one store and one Redis, as `kiln::app` builds them with the
/// Redis backend, each update holding the record's lock in Redis.
async fn record_updates_from_two_processes_sharing_redis_all_land(kind: StoreKind) {
    let store = Store::new(kind);
    let redis = RedisServer::start();
    let sharing = || {
        let mut config = Config::load_from(Sources::default()).unwrap();
        config.redis.url = redis.url();
        let lock = RedisRecordLock::new(
            Arc::new(RedisHandle::new(&config.redis).unwrap()),
            RedisKeys::new(&config.redis.prefix),
            Duration::from_millis(config.storage.record_lock_ttl_ms),
            Duration::from_millis(config.storage.record_lock_wait_ms),
        );
        open(&store.toml).sharing_record_locks(Arc::new(lock))
    };
    let processes = [sharing(), sharing()];
    let code = "0123456789abcdef";
    assert!(processes[0]
        .create_media_record(&MediaRecord::new(code, "shop", None))
        .await
        .unwrap());
    let filters: Vec<String> = (0..32).map(|n| format!("filter{n}")).collect();
    let updates = filters.iter().enumerate().map(|(n, filter)| {
        processes[n % 2].update_media_record(code, move |current| {
            let mut record = current.expect("created above");
            record.thumb_data.insert(filter.clone(), Thumb::pending());
            (Some(record), ())
        })
    });
    futures::future::try_join_all(updates).await.unwrap();
    let stored = store.storage.media_record(code).await.unwrap().unwrap();
    let kept: BTreeSet<&String> = stored.thumb_data.keys().collect();
    assert_eq!(
        kept,
        filters.iter().collect(),
        "every update's thumbnail is in the record"
    );
}

/// A Redis handle on `redis` and the key names of kiln's default prefix.
fn redis_handle_and_keys(redis: &RedisServer) -> (Arc<RedisHandle>, RedisKeys) {
    let mut config = Config::load_from(Sources::default()).unwrap();
    config.redis.url = redis.url();
    let handle = Arc::new(RedisHandle::new(&config.redis).unwrap());
    (handle, RedisKeys::new(&config.redis.prefix))
}

/// Takes `code`'s record lock for `ttl_ms` as a process that then died would:
/// nobody releases it.
fn dead_holder(keys: &RedisKeys, code: &str, ttl_ms: u64) -> redis::Cmd {
    redis::cmd("SET")
        .arg(keys.record_lock(code))
        .arg("a dead process's token")
        .arg("PX")
        .arg(ttl_ms)
        .clone()
}

/// A process that died holding a record's lock holds up that record until
/// the lock expires, no longer; one waiting past `record_lock_wait_ms` gets
/// a retryable error, and the record is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_lock_left_by_a_dead_process_delays_updates_until_it_expires() {
    let store = Store::new(StoreKind::Local);
    let redis = RedisServer::start();
    let (handle, keys) = redis_handle_and_keys(&redis);
    let waiting = |wait_ms| {
        let lock = RedisRecordLock::new(
            handle.clone(),
            keys.clone(),
            Duration::from_secs(30),
            Duration::from_millis(wait_ms),
        );
        open(&store.toml).sharing_record_locks(Arc::new(lock))
    };
    let code = "fedcba9876543210";
    assert!(store
        .storage
        .create_media_record(&MediaRecord::new(code, "shop", None))
        .await
        .unwrap());
    let add = |filter: &'static str| {
        move |current: Option<MediaRecord>| {
            let mut record = current.expect("created above");
            record.thumb_data.insert(filter.into(), Thumb::pending());
            (Some(record), ())
        }
    };
    let mut conn = handle.conn().await.unwrap();

    let _: () = dead_holder(&keys, code, 60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = waiting(300).update_media_record(code, add("refused")).await;
    let error = refused.expect_err("the lock is held for a minute");
    assert!(error.is_retryable(), "{error:?}");
    let record = store.storage.media_record(code).await.unwrap().unwrap();
    assert!(
        record.thumb_data.is_empty(),
        "nothing written without the lock"
    );

    let _: () = dead_holder(&keys, code, 600)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    waiting(5_000)
        .update_media_record(code, add("after expiry"))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "waited {waited:?} for a 600 ms lock"
    );
    let record = store.storage.media_record(code).await.unwrap().unwrap();
    assert!(record.thumb_data.contains_key("after expiry"));
    // Released after the update: nothing is left behind in Redis.
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.record_lock(code))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
}

/// A change that only applies to an existing record does not ask the lock
/// when there is no record: a lock held for a minute by a dead process on a
/// code with no record delays nothing. On a record that exists it does ask,
/// and waits like any update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_an_existing_record_takes_no_lock_when_there_is_none() {
    let store = Store::new(StoreKind::Local);
    let redis = RedisServer::start();
    let (handle, keys) = redis_handle_and_keys(&redis);
    let lock = RedisRecordLock::new(
        handle.clone(),
        keys.clone(),
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    let storage = open(&store.toml).sharing_record_locks(Arc::new(lock));
    let code = "00112233445566ff";
    let mut conn = handle.conn().await.unwrap();
    let _: () = dead_holder(&keys, code, 60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let add_thumb = |mut record: MediaRecord| {
        record.thumb_data.insert("small".into(), Thumb::pending());
        (Some(record), "changed")
    };

    let absent = storage
        .update_existing_media_record(code, add_thumb)
        .await
        .unwrap();
    assert_eq!(
        absent, None,
        "no record, nothing changed, no lock waited for"
    );
    assert!(storage.media_record(code).await.unwrap().is_none());

    assert!(storage
        .create_media_record(&MediaRecord::new(code, "shop", None))
        .await
        .unwrap());
    let refused = storage.update_existing_media_record(code, add_thumb).await;
    let error = refused.expect_err("the record exists and its lock is held");
    assert!(error.is_retryable(), "{error:?}");

    let _: () = redis::cmd("DEL")
        .arg(keys.record_lock(code))
        .query_async(&mut conn)
        .await
        .unwrap();
    let changed = storage
        .update_existing_media_record(code, add_thumb)
        .await
        .unwrap();
    assert_eq!(changed, Some("changed"));
    let record = storage.media_record(code).await.unwrap().unwrap();
    assert!(record.thumb_data.contains_key("small"));
}

async fn listing_and_delete(kind: StoreKind) {
    let store = Store::new(kind);
    let storage = &store.storage;
    let original = "shop/3/0123456789abcdef.jpg";
    let variants: Vec<String> = ["small", "medium", "large"]
        .iter()
        .map(|f| keys::variant_path(f, original))
        .collect();
    for (i, variant) in variants.iter().enumerate() {
        storage
            .put(variant, Bytes::from(vec![i as u8; 100 + i]))
            .await
            .unwrap();
    }
    storage
        .put(original, Bytes::from(jpeg(8, 8, [9, 9, 9])))
        .await
        .unwrap();
    for code in ["00000000000000a1", "00000000000000a2"] {
        storage.add_account_media("shop", code).await.unwrap();
    }
    storage.put_key_index("d1g3st", "shop").await.unwrap();

    let mut listed = storage.list("media/cache").await.unwrap();
    listed.sort();
    let mut want = variants.clone();
    want.sort();
    assert_eq!(listed, want);
    for (i, variant) in variants.iter().enumerate() {
        let size = storage.head(variant).await.unwrap().unwrap().size;
        assert_eq!(size, 100 + i as u64, "{variant}");
    }
    // A prefix is a directory, not a string prefix.
    assert!(storage.list("media/cach").await.unwrap().is_empty());
    assert_eq!(storage.account_media_count("shop").await.unwrap(), 2);
    assert_eq!(
        storage.root_for_key("d1g3st").await.unwrap().as_deref(),
        Some("shop")
    );

    storage.delete(&variants[0]).await.unwrap();
    assert!(storage.get(&variants[0]).await.unwrap().is_none());
    assert!(storage.head(&variants[0]).await.unwrap().is_none());
    assert_eq!(storage.list("media/cache").await.unwrap().len(), 2);
    storage.delete_key_index("d1g3st").await.unwrap();
    assert!(storage.root_for_key("d1g3st").await.unwrap().is_none());
    // The rest is untouched.
    assert_eq!(
        storage.get(original).await.unwrap().unwrap().info.size,
        storage.head(original).await.unwrap().unwrap().size
    );
    assert!(!store.raw_keys().contains(&store.raw_key(&variants[0])));
    assert!(store.raw_keys().contains(&store.raw_key(&variants[1])));
}

async fn a_failing_put_is_a_retryable_storage_error_and_writes_nothing(kind: StoreKind) {
    let store = Store::new(kind);
    let variant = keys::variant_path("small", "shop/1/x.jpg");
    store
        .storage
        .put(&variant, Bytes::from(jpeg(8, 8, [1, 1, 1])))
        .await
        .unwrap();
    let before = store.raw_keys();

    // A PUT the backend refuses: on disk, under a parent that is a regular
    // file; on S3, into a bucket that does not exist.
    let (failing, under) = match kind {
        StoreKind::Local => {
            std::fs::write(store.dir.path().join("blocked"), b"not a directory").unwrap();
            (store.storage.clone(), "blocked/")
        }
        StoreKind::S3 => {
            let moto = store.moto.as_ref().unwrap();
            (
                open(&s3_storage_toml(
                    &moto.endpoint(),
                    "kiln-no-such-bucket",
                    PREFIX,
                )),
                "",
            )
        }
    };
    let payload = Bytes::from(jpeg(300, 200, [5, 5, 5]));
    let err = failing
        .put(&format!("{under}{variant}"), payload)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.status(), 503);
    let err = failing
        .put_json(
            &format!("{under}{}", keys::account_path("shop")),
            &account("shop", "k"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");

    // Nothing half-written: no object, no temp file, the old one intact.
    let mut want = before.clone();
    if kind == StoreKind::Local {
        want.insert("blocked".into());
    }
    assert_eq!(store.raw_keys(), want);
    let kept = store.storage.get(&variant).await.unwrap().unwrap();
    assert_eq!(dimensions(&kept.bytes), (8, 8));
    if let Some(moto) = &store.moto {
        assert!(
            moto.keys(BUCKET, "").iter().all(|k| k.starts_with(PREFIX)),
            "every key under the prefix"
        );
    }
}

/// S3 gone mid-run: reads and writes fail as retryable storage errors
/// (the worker retries the job), never as "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_gone_mid_test_is_a_retryable_storage_error_not_a_miss() {
    let mut store = Store::new(StoreKind::S3);
    let variant = keys::variant_path("small", "shop/1/x.jpg");
    store
        .storage
        .put(&variant, Bytes::from(jpeg(8, 8, [1, 1, 1])))
        .await
        .unwrap();
    store.moto.as_mut().unwrap().kill();

    let err = store
        .storage
        .put(&variant, Bytes::from(jpeg(8, 8, [2, 2, 2])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    assert!(err.is_retryable());
    for err in [
        store.storage.get(&variant).await.unwrap_err(),
        store.storage.head(&variant).await.map(|_| ()).unwrap_err(),
        store.storage.ping().await.unwrap_err(),
    ] {
        assert_eq!(err.code(), "storage-error", "{err}");
        assert!(err.is_retryable());
    }
}

/// A bucket that does not exist is not "every object missing": readiness fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_readiness_fails_on_a_missing_bucket() {
    let store = Store::new(StoreKind::S3);
    store.storage.ping().await.unwrap();
    let moto = store.moto.as_ref().unwrap();
    let missing = open(&s3_storage_toml(
        &moto.endpoint(),
        "kiln-no-such-bucket",
        "",
    ));
    let err = missing.ping().await.unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
}

/// S3 answering 503: each request is retried (`s3_max_retries`), then fails
/// as a retryable storage error; a read is never taken for "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_5xx_is_retried_then_a_retryable_storage_error() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = CountingProxy::start(moto.addr()).await;
    let storage = open(&s3_storage_toml(&proxy.endpoint(), BUCKET, PREFIX));
    let variant = keys::variant_path("small", "shop/1/x.jpg");
    storage
        .put(&variant, Bytes::from(jpeg(8, 8, [1, 1, 1])))
        .await
        .unwrap();

    proxy.fail_with(503);
    let before = proxy.requests().len();
    let err = storage.get(&variant).await.unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    assert!(err.is_retryable());
    // s3_storage_toml allows 2 retries: 3 attempts in all.
    assert_eq!(proxy.requests().len() - before, 3, "{:?}", proxy.requests());
    let err = storage.head(&variant).await.unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    let err = storage
        .put(&variant, Bytes::from(jpeg(9, 9, [2, 2, 2])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    assert!(err.is_retryable());

    // S3 back: the old object, untouched.
    proxy.fail_with(0);
    let kept = storage.get(&variant).await.unwrap().unwrap();
    assert_eq!(dimensions(&kept.bytes), (8, 8));
}

/// A record change slower than the lock's lifetime (S3 holding the write)
/// keeps the lock, renewed as it runs: another process waits for it instead
/// of writing in between, and the slow write, from its older read, undoes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_change_slower_than_its_lock_keeps_it() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = CountingProxy::start(moto.addr()).await;
    let redis = RedisServer::start();
    let (handle, keys) = redis_handle_and_keys(&redis);
    let lock_ttl = Duration::from_millis(150);
    let sharing = |endpoint: &str| {
        let lock = RedisRecordLock::new(
            handle.clone(),
            keys.clone(),
            lock_ttl,
            Duration::from_secs(10),
        );
        open(&s3_storage_toml(endpoint, BUCKET, PREFIX)).sharing_record_locks(Arc::new(lock))
    };
    let slow = sharing(&proxy.endpoint());
    let direct = sharing(&moto.endpoint());
    let code = "0123456789abcdef";
    assert!(direct
        .create_media_record(&MediaRecord::new(code, "shop", None))
        .await
        .unwrap());
    let note = |filter: &'static str| {
        move |current: Option<MediaRecord>| {
            let mut record = current.expect("created above");
            record.thumb_data.insert(filter.into(), Thumb::pending());
            (Some(record), ())
        }
    };

    // The slow process reads, then its write is held past several lifetimes.
    proxy.delay_puts(lock_ttl * 6);
    let slow_change =
        tokio::spawn(async move { slow.update_media_record(code, note("slow")).await });
    tokio::time::sleep(lock_ttl / 2).await;
    direct
        .update_media_record(code, note("direct"))
        .await
        .unwrap();
    slow_change.await.unwrap().unwrap();

    let stored = direct.media_record(code).await.unwrap().unwrap();
    let kept: BTreeSet<&str> = stored.thumb_data.keys().map(String::as_str).collect();
    assert_eq!(
        kept,
        BTreeSet::from(["direct", "slow"]),
        "both changes landed"
    );
    let lock = keys.record_lock(code);
    assert_eq!(redis.redis_int(&["EXISTS", &lock]), 0, "released");

    // A lock lost meanwhile (deleted here, as if it had lapsed) stops the
    // change, retryably, rather than letting it write unguarded.
    let slow = sharing(&proxy.endpoint());
    let lost_change =
        tokio::spawn(async move { slow.update_media_record(code, note("lost")).await });
    tokio::time::sleep(lock_ttl / 2).await;
    assert_eq!(
        redis.redis_int(&["DEL", &lock]),
        1,
        "the slow change holds it"
    );
    let err = lost_change.await.unwrap().unwrap_err();
    assert_eq!(err.code(), "storage-error", "{err}");
    assert!(err.is_retryable());
}
