//! Originals, variants and media records over `Arc<dyn ObjectStore>`: the
//! source of truth. Backend errors are mapped to `Error` here; nothing above
//! this module knows whether bytes live on disk or in S3.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Size and time of a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Unix seconds.
    pub last_modified: i64,
}

#[derive(Debug, Clone)]
pub struct StoredObject {
    pub bytes: Bytes,
    pub info: ObjectInfo,
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    description: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.description)
    }
}

impl Storage {
    /// Opens `storage.url`: a directory path, `file:///abs/dir`, or `memory://`.
    pub fn open(url: &str) -> Result<Storage> {
        if url == "memory://" {
            return Ok(Self::from_store(Arc::new(InMemory::new()), "memory"));
        }
        if url.starts_with("s3://") {
            return Err(Error::Config(format!(
                "storage.url {url:?}: this build has no S3 backend yet"
            )));
        }
        let dir = match url.strip_prefix("file://") {
            Some(path) => std::path::PathBuf::from(path),
            None if url.contains("://") => {
                return Err(Error::Config(format!(
                    "storage.url {url:?}: use a directory, file:///abs/dir or memory://"
                )))
            }
            None => std::path::PathBuf::from(url),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Config(format!("storage.url {}: {e}", dir.display())))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| Error::Config(format!("storage.url {}: {e}", dir.display())))?
            .with_automatic_cleanup(true);
        Ok(Self::from_store(
            Arc::new(store),
            &dir.display().to_string(),
        ))
    }

    pub fn from_store(store: Arc<dyn ObjectStore>, description: &str) -> Storage {
        Storage {
            store,
            description: description.to_string(),
        }
    }

    fn location(path: &str) -> Result<StorePath> {
        StorePath::parse(path).map_err(|e| Error::InvalidPath(e.to_string()))
    }

    pub async fn head(&self, path: &str) -> Result<Option<ObjectInfo>> {
        match self.store.head(&Self::location(path)?).await {
            Ok(meta) => Ok(Some(ObjectInfo {
                size: meta.size,
                last_modified: meta.last_modified.timestamp(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Option<StoredObject>> {
        let result = match self.store.get(&Self::location(path)?).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let info = ObjectInfo {
            size: result.meta.size,
            last_modified: result.meta.last_modified.timestamp(),
        };
        let bytes = result.bytes().await?;
        Ok(Some(StoredObject { bytes, info }))
    }

    /// Writes the whole object at once (the local backend writes a temp file
    /// and renames it), so readers never see a partial object.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<ObjectInfo> {
        let size = bytes.len() as u64;
        self.store
            .put(&Self::location(path)?, PutPayload::from(bytes))
            .await?;
        Ok(ObjectInfo {
            size,
            last_modified: now_secs(),
        })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        match self.get(path).await? {
            Some(object) => Ok(Some(
                serde_json::from_slice(&object.bytes)
                    .map_err(|e| Error::Storage(format!("{path} holds invalid JSON: {e}")))?,
            )),
            None => Ok(None),
        }
    }

    pub async fn put_json<T: Serialize>(&self, path: &str, value: &T) -> Result<()> {
        self.put(path, Bytes::from(serde_json::to_vec_pretty(value)?))
            .await
            .map(|_| ())
    }

    /// Readiness: the backend answers a listing.
    pub async fn ping(&self) -> Result<()> {
        self.store
            .list_with_delimiter(Some(&StorePath::from("meta")))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

/// What kiln knows of one original and its variants, stored at
/// `meta/<code>.json`. Field names are the SAIS media record's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MediaRecord {
    pub code: String,
    pub root: String,
    /// Storage path of the original; null until it is downloaded and its type sniffed.
    pub path: Option<String>,
    pub original_url: Option<String>,
    pub mime_type: Option<String>,
    pub size: Option<u64>,
    pub original_width: Option<u32>,
    pub original_height: Option<u32>,
    /// HTTP status of the origin fetch.
    pub status_code: Option<u16>,
    /// ThumbHash, unpadded standard base64 (what SAIS sends).
    pub blur: Option<String>,
    pub blurhash: Option<String>,
    /// Filter name to variant URL.
    pub resized: BTreeMap<String, String>,
    /// Filter name to the thumbnail's state, URL and size.
    pub thumb_data: BTreeMap<String, Thumb>,
    /// The client's context, echoed back.
    #[serde(deserialize_with = "context_from_json")]
    pub context: serde_json::Value,
    /// `new`, `downloaded`, `resized` or `failed`.
    pub marking: String,
    /// Why the media failed, when it did.
    pub error: Option<FailureSummary>,
    /// Unix seconds.
    pub updated_at: i64,
}

impl MediaRecord {
    /// A record as first seen: `new`, with an empty context.
    pub fn new(code: &str, root: &str, original_url: Option<&str>) -> MediaRecord {
        MediaRecord {
            code: code.to_string(),
            root: root.to_string(),
            original_url: original_url.map(str::to_string),
            marking: "new".into(),
            context: serde_json::json!({}),
            updated_at: now_secs(),
            ..Default::default()
        }
    }
}

/// One thumbnail of a media record: `new` until rendered, then `done`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Thumb {
    pub marking: String,
    pub url: Option<String>,
    pub size: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub mime_type: Option<String>,
}

impl Thumb {
    pub fn pending() -> Thumb {
        Thumb {
            marking: "new".into(),
            ..Default::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.marking == "done" && self.url.is_some()
    }
}

/// PHP encodes an empty map as `[]`; a context is always kept as an object.
pub fn context_from_json<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<serde_json::Value, D::Error> {
    let value = <serde_json::Value as serde::Deserialize>::deserialize(deserializer)?;
    Ok(normalize_context(value))
}

pub fn normalize_context(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Null => serde_json::json!({}),
        serde_json::Value::Array(items) if items.is_empty() => serde_json::json!({}),
        other => other,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct FailureSummary {
    pub code: String,
    pub message: String,
}

/// A SAIS account: a storage root with its key, webhook secret and
/// fallback callback URLs, stored at `accounts/<root>.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Account {
    pub root: String,
    /// Fixed once the account has media: it decides every original's bin.
    pub approx_image_count: u64,
    pub bin_count: u64,
    pub media_callback_url: Option<String>,
    pub thumb_callback_url: Option<String>,
    pub api_key: String,
    /// Standard Webhooks secret (`whsec_` + base64) that signs this account's webhooks.
    pub webhook_secret: String,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl Storage {
    pub async fn media_record(&self, code: &str) -> Result<Option<MediaRecord>> {
        self.get_json(&crate::keys::media_record_path(code)).await
    }

    /// Writes the record only if none exists yet; false when one did.
    pub async fn create_media_record(&self, record: &MediaRecord) -> Result<bool> {
        self.create_json(&crate::keys::media_record_path(&record.code), record)
            .await
    }

    pub async fn put_media_record(&self, record: &MediaRecord) -> Result<()> {
        self.put_json(&crate::keys::media_record_path(&record.code), record)
            .await
    }

    pub async fn account(&self, root: &str) -> Result<Option<Account>> {
        self.get_json(&crate::keys::account_path(root)).await
    }

    /// Writes a new account unless one exists; false when one did.
    pub async fn create_account(&self, account: &Account) -> Result<bool> {
        self.create_json(&crate::keys::account_path(&account.root), account)
            .await
    }

    pub async fn put_account(&self, account: &Account) -> Result<()> {
        self.put_json(&crate::keys::account_path(&account.root), account)
            .await
    }

    /// Files an account's key (by digest) so a presented key finds its account.
    pub async fn put_key_index(&self, digest: &str, root: &str) -> Result<()> {
        self.put_pointer(&crate::keys::api_key_path(digest), "root", root)
            .await
    }

    pub async fn delete_key_index(&self, digest: &str) -> Result<()> {
        match self
            .store
            .delete(&Self::location(&crate::keys::api_key_path(digest))?)
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn root_for_key(&self, digest: &str) -> Result<Option<String>> {
        self.get_pointer(&crate::keys::api_key_path(digest), "root")
            .await
    }

    /// Counts an account's media: one empty marker per code, so counting
    /// needs no read-modify-write shared by fronts.
    pub async fn add_account_media(&self, root: &str, code: &str) -> Result<()> {
        self.put(&crate::keys::account_media_marker(root, code), Bytes::new())
            .await
            .map(|_| ())
    }

    pub async fn account_media_count(&self, root: &str) -> Result<u64> {
        use futures::TryStreamExt;
        let prefix = StorePath::from(crate::keys::account_media_prefix(root));
        let mut listing = self.store.list(Some(&prefix));
        let mut count = 0;
        while listing.try_next().await?.is_some() {
            count += 1;
        }
        Ok(count)
    }

    /// Points a G3 (normalised-URL) code at an account's record.
    pub async fn put_normalized_alias(
        &self,
        normalized: &str,
        root: &str,
        code: &str,
    ) -> Result<()> {
        self.put_pointer(
            &crate::keys::normalized_alias_path(normalized, root),
            "code",
            code,
        )
        .await
    }

    /// The legacy code a G3 code stands for: in `root` when given, else in any account.
    pub async fn code_for_normalized(
        &self,
        normalized: &str,
        root: Option<&str>,
    ) -> Result<Option<String>> {
        use futures::TryStreamExt;
        let alias_path = match root {
            Some(root) => Some(crate::keys::normalized_alias_path(normalized, root)),
            None => {
                let prefix = StorePath::from(crate::keys::normalized_alias_prefix(normalized));
                self.store
                    .list(Some(&prefix))
                    .try_next()
                    .await?
                    .map(|meta| meta.location.to_string())
            }
        };
        match alias_path {
            Some(alias_path) => self.get_pointer(&alias_path, "code").await,
            None => Ok(None),
        }
    }

    /// A small index file naming one thing: `{"<field>": "<value>"}`.
    async fn put_pointer(&self, path: &str, field: &str, value: &str) -> Result<()> {
        self.put_json(path, &serde_json::json!({ field: value }))
            .await
    }

    async fn get_pointer(&self, path: &str, field: &str) -> Result<Option<String>> {
        let pointer: Option<serde_json::Value> = self.get_json(path).await?;
        Ok(pointer.and_then(|p| p[field].as_str().map(str::to_string)))
    }

    async fn create_json<T: Serialize>(&self, path: &str, value: &T) -> Result<bool> {
        let location = Self::location(path)?;
        let payload = PutPayload::from(serde_json::to_vec_pretty(value)?);
        match self
            .store
            .put_opts(&location, payload, object_store::PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        assert!(storage.get("a/b.jpg").await.unwrap().is_none());
        assert!(storage.head("a/b.jpg").await.unwrap().is_none());
        storage
            .put("a/b.jpg", Bytes::from_static(b"xyz"))
            .await
            .unwrap();
        let got = storage.get("a/b.jpg").await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"xyz");
        assert_eq!(storage.head("a/b.jpg").await.unwrap().unwrap().size, 3);
        assert!(dir.path().join("a/b.jpg").exists());
        assert_eq!(
            storage.get("../x").await.unwrap_err().code(),
            "invalid-path"
        );
        storage.ping().await.unwrap();
    }
}
