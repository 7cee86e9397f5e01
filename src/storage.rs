//! Originals, variants and media records over `Arc<dyn ObjectStore>`: the
//! source of truth. Backend errors are mapped to `Error` here; nothing above
//! this module knows whether bytes live on disk or in S3.

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
/// `meta/<code>.json`. Field names follow the SAIS media record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MediaRecord {
    pub code: String,
    pub root: String,
    pub path: Option<String>,
    pub original_url: Option<String>,
    pub mime_type: Option<String>,
    pub size: Option<u64>,
    pub original_width: Option<u32>,
    pub original_height: Option<u32>,
    pub status_code: Option<u16>,
    pub blurhash: Option<String>,
    /// Filter name to variant URL.
    pub resized: std::collections::BTreeMap<String, String>,
    pub variants: std::collections::BTreeMap<String, VariantSummary>,
    /// `new`, `downloaded`, `resized` or `failed`.
    pub marking: String,
    pub error: Option<FailureSummary>,
    /// Unix seconds.
    pub updated_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VariantSummary {
    pub url: String,
    pub size: u64,
    pub width: u32,
    pub height: u32,
    pub mime_type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct FailureSummary {
    pub code: String,
    pub message: String,
}

impl Storage {
    pub async fn media_record(&self, code: &str) -> Result<Option<MediaRecord>> {
        self.get_json(&crate::keys::media_record_path(code)).await
    }

    /// Writes the record only if none exists yet; false when one did.
    pub async fn create_media_record(&self, record: &MediaRecord) -> Result<bool> {
        let location = Self::location(&crate::keys::media_record_path(&record.code))?;
        let payload = PutPayload::from(serde_json::to_vec_pretty(record)?);
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

    pub async fn put_media_record(&self, record: &MediaRecord) -> Result<()> {
        self.put_json(&crate::keys::media_record_path(&record.code), record)
            .await
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
