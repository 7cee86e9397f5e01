//! Originals, variants, media records and accounts over
//! `Arc<dyn ObjectStore>` (a local directory, S3 or memory): the source of
//! truth. Backend errors are mapped to `Error` here (absent = `None`, any
//! other failure = the retryable `Error::Storage`); nothing above this module
//! knows whether bytes live on disk or in S3. Reads from a local directory
//! skip object_store's blocking-pool trips when the kernel's caches can
//! answer (see `local_read`), as a static file server does; other backends
//! never take that path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, PutPayload, RetryConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::StorageConfig;
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

/// A stored object ready to answer with: its bytes, or its open file.
pub enum Sendable {
    Bytes(StoredObject),
    File(FileBody),
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// The same store's directory when it is local, for whole-object reads
    /// that skip object_store's two trips to the blocking pool.
    local: Option<Arc<LocalRoot>>,
    /// Descriptors kept open for `get_keeping_open` (local stores only).
    open_files: Option<Arc<open_files::OpenFiles>>,
    /// Serializes this process's read-change-write of one media record.
    record_locks: Arc<RecordLocks>,
    /// The same, across every process sharing this storage (Redis's).
    shared_lock: Option<Arc<dyn SharedLock>>,
    description: String,
}

/// A lock on one media record that every process changing records holds
/// while it does (`shared_lock::RedisRecordLock`).
#[async_trait::async_trait]
pub trait SharedLock: Send + Sync {
    /// Waits for the record's lock; answers the token that releases it.
    async fn acquire(&self, code: &str) -> Result<String>;
    /// Releases it if still held with `token`; a failure only leaves it to expire.
    async fn release(&self, code: &str, token: &str);
    /// Extends its lifetime if still held with `token`: false when it is not.
    async fn renew(&self, code: &str, token: &str) -> Result<bool>;
    /// How often a holder renews it: well within its lifetime.
    fn renew_every(&self) -> Duration;
}

/// Locks by media code, striped: updates of unrelated media rarely wait,
/// and two updates of one record (a job's result, a dispatch, another
/// filter's job) never interleave their read and their write.
struct RecordLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl RecordLocks {
    /// More stripes than jobs and dispatches in flight.
    const STRIPES: usize = 64;

    fn new() -> RecordLocks {
        RecordLocks {
            stripes: (0..Self::STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    async fn lock(&self, code: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        code.hash(&mut hasher);
        self.stripes[hasher.finish() as usize % self.stripes.len()]
            .lock()
            .await
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.description)
    }
}

impl Storage {
    /// Opens `storage.url` with the other `[storage]` settings: S3 for
    /// `s3://bucket/prefix`, else as [`Storage::open`].
    pub fn from_config(config: &StorageConfig) -> Result<Storage> {
        match config.url.strip_prefix("s3://") {
            Some(rest) => Self::open_s3(rest, config),
            None => Ok(Self::open(&config.url)?.keeping_files_open(
                config.open_files_max,
                Duration::from_millis(config.open_files_idle_ms),
            )),
        }
    }

    /// Keeps up to `max` descriptors of files read by `get_keeping_open`
    /// open (fewer if the process's descriptor limit is low), each closed
    /// after `idle` unread. No effect on a store that is not local.
    pub fn keeping_files_open(mut self, max: u64, idle: Duration) -> Storage {
        let max = open_files::bounded(max);
        self.open_files = (self.local.is_some() && max > 0)
            .then(|| Arc::new(open_files::OpenFiles::new(max, idle)));
        self
    }

    /// Opens a directory path, `file:///abs/dir`, or `memory://`. S3 needs
    /// its settings: [`Storage::from_config`].
    pub fn open(url: &str) -> Result<Storage> {
        if url == "memory://" {
            return Ok(Self::from_store(Arc::new(InMemory::new()), "memory"));
        }
        if url.starts_with("s3://") {
            return Err(Error::Config(format!(
                "storage.url {url:?}: S3 is opened with its settings (Storage::from_config)"
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
        let store = Arc::new(
            LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| Error::Config(format!("storage.url {}: {e}", dir.display())))?
                .with_automatic_cleanup(true),
        );
        // The root object_store resolves paths under (it canonicalizes too).
        let root = std::fs::canonicalize(&dir)
            .map_err(|e| Error::Config(format!("storage.url {}: {e}", dir.display())))?;
        let mut storage = Self::from_store(store, &dir.display().to_string());
        storage.local = Some(Arc::new(LocalRoot { root }));
        Ok(storage)
    }

    /// `bucket[/prefix]`: the environment's AWS settings, then the file's.
    fn open_s3(rest: &str, config: &StorageConfig) -> Result<Storage> {
        let url = &config.url;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(Error::Config(format!(
                "storage.url {url:?}: expected s3://bucket/prefix"
            )));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(!config.s3_path_style)
            // Set key by key: replacing the client options would drop what
            // the environment set in them (AWS_ALLOW_HTTP, a proxy).
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", config.s3_request_timeout_ms),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", config.s3_connect_timeout_ms),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: config.s3_max_retries,
                retry_timeout: Duration::from_millis(config.s3_retry_timeout_ms),
            });
        // An empty or false setting leaves what the environment says.
        if config.s3_allow_http {
            builder = builder.with_allow_http(true);
        }
        if !config.s3_endpoint.is_empty() {
            builder = builder.with_endpoint(&config.s3_endpoint);
        }
        if !config.s3_region.is_empty() {
            builder = builder.with_region(&config.s3_region);
        }
        if !config.s3_access_key_id.is_empty() {
            builder = builder.with_access_key_id(&config.s3_access_key_id);
        }
        if !config.s3_secret_access_key.is_empty() {
            builder = builder.with_secret_access_key(&config.s3_secret_access_key);
        }
        let s3 = builder
            .build()
            .map_err(|e| Error::Config(format!("storage.url {url:?}: {e}")))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            let root = StorePath::parse(prefix)
                .map_err(|e| Error::Config(format!("storage.url {url:?}: prefix: {e}")))?;
            Arc::new(PrefixStore::new(s3, root))
        };
        Ok(Self::from_store(store, &format!("s3://{bucket}/{prefix}")))
    }

    /// Changes to media records also hold `lock`, shared with the other
    /// processes using this storage.
    pub fn sharing_record_locks(mut self, lock: Arc<dyn SharedLock>) -> Storage {
        self.shared_lock = Some(lock);
        self
    }

    pub fn from_store(store: Arc<dyn ObjectStore>, description: &str) -> Storage {
        Storage {
            store,
            local: None,
            open_files: None,
            record_locks: Arc::new(RecordLocks::new()),
            shared_lock: None,
            description: description.to_string(),
        }
    }

    fn location(path: &str) -> Result<StorePath> {
        StorePath::parse(path).map_err(|e| Error::InvalidPath(e.to_string()))
    }

    pub async fn head(&self, path: &str) -> Result<Option<ObjectInfo>> {
        let location = Self::location(path)?;
        if let Some(local) = &self.local {
            return local_read::stat(&local.file(&location)?);
        }
        match self.store.head(&location).await {
            Ok(meta) => Ok(Some(ObjectInfo {
                size: meta.size,
                last_modified: meta.last_modified.timestamp(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Option<StoredObject>> {
        self.get_at_most(path, None).await
    }

    /// `get` of an original, refused as `TooLarge` when it is over
    /// `max_bytes` before any of it is read: a download is held to
    /// `fetch.max_bytes`, but a file put in storage by other means is not.
    pub async fn get_original(&self, path: &str, max_bytes: u64) -> Result<Option<StoredObject>> {
        self.get_at_most(path, Some(max_bytes)).await
    }

    async fn get_at_most(
        &self,
        path: &str,
        max_bytes: Option<u64>,
    ) -> Result<Option<StoredObject>> {
        let check_size = |size: u64| match max_bytes {
            Some(max) if size > max => Err(Error::TooLarge(format!(
                "stored original {path} is {size} bytes, over fetch.max_bytes ({max})"
            ))),
            _ => Ok(()),
        };
        let location = Self::location(path)?;
        if let Some(local) = &self.local {
            let Some((open, metadata)) = local_read::open_file(&local.file(&location)?)? else {
                return Ok(None);
            };
            check_size(metadata.len())?;
            return Self::local_finish(local_read::read(open, &metadata)?).await;
        }
        let result = match self.store.get(&location).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        check_size(result.meta.size)?;
        let info = ObjectInfo {
            size: result.meta.size,
            last_modified: result.meta.last_modified.timestamp(),
        };
        let bytes = result.bytes().await?;
        Ok(Some(StoredObject { bytes, info }))
    }

    /// `get`, for objects read often (variants served from storage): a
    /// local store keeps the file open for the next read.
    pub async fn get_keeping_open(&self, path: &str) -> Result<Option<StoredObject>> {
        let Some(local) = &self.local else {
            return self.get(path).await;
        };
        let Some((open, metadata)) = self.open_local(local, path).await? else {
            return Ok(None);
        };
        Self::local_finish(local_read::read(open, &metadata)?).await
    }

    /// `get_keeping_open` for an answer: a local object the page cache
    /// holds comes back as its open file, for the kernel to send (no read,
    /// no copy); anything else as bytes.
    pub async fn get_for_sending(&self, path: &str) -> Result<Option<Sendable>> {
        let Some(local) = &self.local else {
            return Ok(self.get(path).await?.map(Sendable::Bytes));
        };
        let Some((open, metadata)) = self.open_local(local, path).await? else {
            return Ok(None);
        };
        if file_body::resident(&open.file, metadata.len()) {
            return Ok(Some(Sendable::File(FileBody::new(open, metadata.len()))));
        }
        // Boxed: rare, and a hit's future would otherwise carry its state.
        Ok(
            Box::pin(Self::local_finish(local_read::read(open, &metadata)?))
                .await?
                .map(Sendable::Bytes),
        )
    }

    /// The local object's open file and its `fstat`: the kept descriptor
    /// when files are kept open, else the file opened now.
    async fn open_local(
        &self,
        local: &LocalRoot,
        path: &str,
    ) -> Result<Option<(Arc<local_read::OpenFile>, std::fs::Metadata)>> {
        let file = || local.file(&Self::location(path)?);
        match &self.open_files {
            Some(open_files) => open_files.open(path, file).await,
            None => local_read::open_file(&file()?),
        }
    }

    async fn local_finish(started: local_read::Started) -> Result<Option<StoredObject>> {
        match started {
            local_read::Started::Done(object) => Ok(Some(object)),
            local_read::Started::Pending(rest) => {
                tokio::task::spawn_blocking(move || rest.finish())
                    .await
                    .map_err(|e| Error::Internal(format!("storage read task: {e}")))?
                    .map(Some)
            }
        }
    }

    /// Writes the whole object at once (the local backend writes a temp file
    /// and renames it), so readers never see a partial object.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<ObjectInfo> {
        if self.local.is_some() {
            let mut written = self.put_all(vec![(path.to_string(), bytes)]).await?;
            return Ok(written.remove(0));
        }
        let size = bytes.len() as u64;
        self.store
            .put(&Self::location(path)?, PutPayload::from(bytes))
            .await?;
        Ok(ObjectInfo {
            size,
            last_modified: now_secs(),
        })
    }

    /// Writes several whole objects, each as `put` does. A local store
    /// writes them all in one trip to the blocking pool instead of one trip
    /// each (the worker stores every variant of a render at once).
    pub async fn put_all(&self, objects: Vec<(String, Bytes)>) -> Result<Vec<ObjectInfo>> {
        let Some(local) = &self.local else {
            let puts = objects
                .into_iter()
                .map(|(path, bytes)| async move { self.put(&path, bytes).await });
            return futures::future::try_join_all(puts).await;
        };
        let files = objects
            .into_iter()
            .map(|(path, bytes)| Ok((local.file(&Self::location(&path)?)?, bytes)))
            .collect::<Result<Vec<_>>>()?;
        tokio::task::spawn_blocking(move || {
            files
                .iter()
                .map(|(file, bytes)| local_write::whole(file, bytes))
                .collect()
        })
        .await
        .map_err(|e| Error::Internal(format!("storage write task: {e}")))?
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

    /// Removes an object; one already absent is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&Self::location(path)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The paths of every object under the directory-like `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = Self::location(prefix)?;
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// The names of the directories directly under `prefix`.
    pub async fn child_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&Self::location(prefix)?))
            .await?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
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

mod file_body;
mod open_files;
pub use file_body::FileBody;

/// Where a local store keeps its objects.
struct LocalRoot {
    root: std::path::PathBuf,
}

impl LocalRoot {
    /// The file object_store's `path_to_filesystem` names, without its
    /// round trip through a `file://` URL (percent-encoding each segment,
    /// then decoding it again), which a cold hit would pay on every read.
    /// A parsed `Path` has no empty, `.` or `..` segment; like object_store,
    /// a name ending in `#` and digits (its temporary files) is refused.
    fn file(&self, location: &StorePath) -> Result<std::path::PathBuf> {
        let temporary = |name: &str| {
            name.split_once('#').is_some_and(|(_, suffix)| {
                !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
            })
        };
        match location.filename() {
            Some(name) if !temporary(name) => Ok(self.root.join(location.as_ref())),
            _ => Err(Error::InvalidPath(format!(
                "{location}: not an object's path"
            ))),
        }
    }
}

/// object_store's local `put`, for callers already off the async threads.
mod local_write {
    use std::io::{ErrorKind, Write};
    use std::path::{Path, PathBuf};

    use super::{now_secs, ObjectInfo};
    use crate::error::{Error, Result};

    /// Writes a staging file beside `file` (`<name>#<n>`, a name reads and
    /// listings skip), then renames it over `file`: readers see the old
    /// object or the new one, never part of one.
    pub(super) fn whole(file: &Path, bytes: &[u8]) -> Result<ObjectInfo> {
        let failed = |what: &str, path: &Path, e: std::io::Error| {
            Error::Storage(format!("{what} {}: {e}", path.display()))
        };
        let (mut staged, staging) = staging_file(file)?;
        let written = staged
            .write_all(bytes)
            .map_err(|e| failed("cannot write", &staging, e));
        drop(staged);
        let renamed = written.and_then(|()| {
            std::fs::rename(&staging, file).map_err(|e| failed("cannot rename to", file, e))
        });
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        Ok(ObjectInfo {
            size: bytes.len() as u64,
            last_modified: now_secs(),
        })
    }

    /// A new staging file for `file`, creating its directories if missing.
    fn staging_file(file: &Path) -> Result<(std::fs::File, PathBuf)> {
        let mut suffix = 1u32;
        let mut made_dirs = false;
        loop {
            let mut name = file.as_os_str().to_owned();
            name.push(format!("#{suffix}"));
            let staging = PathBuf::from(name);
            match std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(opened) => return Ok((opened, staging)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => suffix += 1,
                Err(e) if e.kind() == ErrorKind::NotFound && !made_dirs => {
                    let parent = file.parent().unwrap_or(Path::new("."));
                    std::fs::create_dir_all(parent).map_err(|e| {
                        Error::Storage(format!("cannot create {}: {e}", parent.display()))
                    })?;
                    made_dirs = true;
                }
                Err(e) => {
                    return Err(Error::Storage(format!(
                        "cannot create {}: {e}",
                        staging.display()
                    )))
                }
            }
        }
    }
}

/// Reads from local storage that never wait for the disk's data on the
/// calling (async) thread: opening and `fstat` go through the kernel's
/// caches, and the read asks for cached pages only (`RWF_NOWAIT`); what the
/// page cache does not hold is read on the blocking pool. Answers as
/// object_store's local backend does: no file, or a directory, is `None`.
mod local_read {
    use std::fs::{File, Metadata};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use bytes::Bytes;

    use super::{ObjectInfo, StoredObject};
    use crate::error::{Error, Result};

    pub enum Started {
        Done(StoredObject),
        /// Part of the file is not in memory: finish on the blocking pool.
        Pending(Rest),
    }

    /// An open file and the path it was opened by (for errors).
    pub struct OpenFile {
        pub file: File,
        pub path: PathBuf,
    }

    pub struct Rest {
        open: Arc<OpenFile>,
        info: ObjectInfo,
        bytes: Vec<u8>,
        read: usize,
    }

    pub fn failed(path: &Path, e: std::io::Error) -> Error {
        Error::Storage(format!("{}: {e}", path.display()))
    }

    fn info(metadata: &Metadata) -> ObjectInfo {
        let modified = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        ObjectInfo {
            size: metadata.len(),
            last_modified: modified,
        }
    }

    /// A look-up of `path`'s answer: "not found" is no object, not an error.
    fn found<T>(path: &Path, looked_up: std::io::Result<T>) -> Result<Option<T>> {
        match looked_up {
            Ok(found) => Ok(Some(found)),
            // `a.jpg/b.jpg` under a file `a.jpg` is as absent as on S3,
            // not a storage failure (503, retried, logged per request).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(failed(path, e)),
        }
    }

    fn open(path: &Path) -> Result<Option<(File, Metadata)>> {
        let Some(file) = found(path, File::open(path))? else {
            return Ok(None);
        };
        let metadata = file.metadata().map_err(|e| failed(path, e))?;
        Ok((!metadata.is_dir()).then_some((file, metadata)))
    }

    /// Size and time, without reading: one `statx`, where opening for an
    /// `fstat` took three system calls (a third of a first miss's storage
    /// time, which asks after the original).
    pub fn stat(path: &Path) -> Result<Option<ObjectInfo>> {
        let metadata = found(path, std::fs::metadata(path))?;
        Ok(metadata.filter(|m| !m.is_dir()).map(|m| info(&m)))
    }

    /// `open`, keeping the path beside the file for errors.
    pub fn open_file(path: &Path) -> Result<Option<(Arc<OpenFile>, Metadata)>> {
        Ok(open(path)?.map(|(file, metadata)| {
            let path = path.to_owned();
            (Arc::new(OpenFile { file, path }), metadata)
        }))
    }

    /// Reads an open file, `metadata` being its `fstat`.
    pub fn read(open: Arc<OpenFile>, metadata: &Metadata) -> Result<Started> {
        let info = info(metadata);
        let len = usize::try_from(info.size)
            .map_err(|_| Error::Storage(format!("{}: too large", open.path.display())))?;
        let mut bytes = vec![0; len];
        let read = read_cached(&open.file, &mut bytes);
        if read == len {
            return Ok(Started::Done(StoredObject {
                bytes: Bytes::from(bytes),
                info,
            }));
        }
        Ok(Started::Pending(Rest {
            open,
            info,
            bytes,
            read,
        }))
    }

    impl Rest {
        /// A read of `path` whose first `read` bytes are in (tests).
        #[cfg(test)]
        pub fn after(path: &Path, read: usize) -> Result<Rest> {
            let (open, metadata) = open_file(path)?.expect("a file");
            let mut bytes = std::fs::read(path).map_err(|e| failed(path, e))?;
            bytes[read..].fill(0);
            Ok(Rest {
                open,
                info: info(&metadata),
                bytes,
                read,
            })
        }

        /// Blocking: reads what `start` could not.
        pub fn finish(mut self) -> Result<StoredObject> {
            self.open
                .file
                .read_exact_at(&mut self.bytes[self.read..], self.read as u64)
                .map_err(|e| failed(&self.open.path, e))?;
            Ok(StoredObject {
                bytes: Bytes::from(self.bytes),
                info: self.info,
            })
        }
    }

    /// How much of `buf` the page cache could fill from the file's start
    /// without waiting for the disk.
    fn read_cached(file: &File, buf: &mut [u8]) -> usize {
        read_cached_at(file, buf, 0)
    }

    /// Fills `buf` from `at` in the file with what the page cache holds;
    /// answers how much it read.
    #[cfg(target_os = "linux")]
    pub fn read_cached_at(file: &File, buf: &mut [u8], at: u64) -> usize {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        let mut read = 0;
        let mut flags = ReadWriteFlags::NOWAIT;
        while read < buf.len() {
            let mut slice = [std::io::IoSliceMut::new(&mut buf[read..])];
            match preadv2(file, &mut slice, at + read as u64, flags) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(Errno::INTR) => {}
                // tmpfs has no RWF_NOWAIT, and nothing to wait for: plain reads.
                Err(Errno::OPNOTSUPP) if !flags.is_empty() && in_memory(file) => {
                    flags = ReadWriteFlags::empty();
                }
                // EAGAIN (not cached), or a kernel or file system without
                // RWF_NOWAIT: the pool reads it.
                Err(_) => break,
            }
        }
        read
    }

    /// Whether the file lives in memory (tmpfs, ramfs): a read of it never
    /// waits for a disk.
    #[cfg(target_os = "linux")]
    fn in_memory(file: &File) -> bool {
        const TMPFS_MAGIC: u64 = 0x0102_1994;
        const RAMFS_MAGIC: u64 = 0x8584_58f6;
        // f_type's integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        rustix::fs::fstatfs(file)
            .is_ok_and(|fs| matches!(fs.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn read_cached_at(_file: &File, _buf: &mut [u8], _at: u64) -> usize {
        0
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
    /// This record's changes since `base`, applied to `current` (the record
    /// as stored now, which another job may have written meanwhile): a field
    /// this record changed takes its value, and thumbnails and variant URLs
    /// merge filter by filter.
    pub fn rebased(&self, base: &MediaRecord, mut current: MediaRecord) -> MediaRecord {
        let stored_marking = current.marking.clone();
        // The fields are destructured, so a new one cannot be forgotten here.
        macro_rules! take_changed_fields {
            ($($by_filter:ident),*; $($field:ident),*) => {
                let MediaRecord { code: _, root: _, $($by_filter,)* $($field),* } = self;
                $(
                    if *$field != base.$field {
                        current.$field = $field.clone();
                    }
                )*
            };
        }
        take_changed_fields!(
            resized, thumb_data;
            path,
            original_url,
            mime_type,
            size,
            original_width,
            original_height,
            status_code,
            blur,
            blurhash,
            context,
            marking,
            error,
            updated_at
        );
        for (filter, url) in resized {
            if base.resized.get(filter) != Some(url) {
                current.resized.insert(filter.clone(), url.clone());
            }
        }
        for (filter, thumb) in thumb_data {
            if base.thumb_data.get(filter) != Some(thumb) {
                current.thumb_data.insert(filter.clone(), thumb.clone());
            }
        }
        // What another job finished stays finished: a record some variant
        // of which is done does not go back to `downloaded` or `failed`
        // (one job's own record does not either, see `with_failure`).
        if stored_marking == "resized" {
            current.marking = stored_marking;
        }
        current
    }

    /// The record with its variant URLs on `base`: a URL is built once,
    /// at render time, on the `server.public_url` of that moment, and a
    /// client told of it later must get one that works now (kiln moved
    /// behind a CDN, say).
    pub fn with_public_base(mut self, base: &str) -> MediaRecord {
        let rebase = |url: &mut String| {
            if let Some(at) = url.find("/media/cache/") {
                if &url[..at] != base {
                    *url = format!("{base}{}", &url[at..]);
                }
            }
        };
        self.resized.values_mut().for_each(rebase);
        self.thumb_data
            .values_mut()
            .filter_map(|thumb| thumb.url.as_mut())
            .for_each(rebase);
        self
    }

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

    /// Reads the media record as stored now (`None` when there is none),
    /// lets `change` decide what to write (`None`: nothing) and what to
    /// answer, and writes it, with no other update of this record by this
    /// process in between. Every change to an existing record goes through
    /// here: a record written from an earlier read would undo what a job or
    /// a dispatch wrote since. The process's own lock comes first, so its
    /// tasks queue in memory and only one at a time asks the shared lock.
    pub async fn update_media_record<T>(
        &self,
        code: &str,
        change: impl FnOnce(Option<MediaRecord>) -> (Option<MediaRecord>, T),
    ) -> Result<T> {
        let _locked = self.record_locks.lock(code).await;
        let Some(shared) = &self.shared_lock else {
            return self.change_media_record(code, change).await;
        };
        let token = shared.acquire(code).await?;
        // Renewed while the change runs, so a read and write slower than the
        // lock's lifetime (S3 having a bad time) still hold it: otherwise
        // another process could take it and write in between, and this
        // write, from the older read, would undo that one. A lock that
        // cannot be renewed stops the change (retryably) before it writes,
        // if it has not yet.
        let token = token.as_str();
        let changed = crate::heartbeat::renewing(
            shared.renew_every(),
            self.change_media_record(code, change),
            || async move {
                match shared.renew(code, token).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Error::Storage(format!(
                        "lost the lock on media record {code} before its change was written"
                    ))),
                    Err(e) => Err(Error::Storage(format!(
                        "could not renew the lock on media record {code}: {e}"
                    ))),
                }
            },
        )
        .await
        .and_then(|changed| changed);
        shared.release(code, token).await;
        changed
    }

    /// `update_media_record` where no record means nothing to change:
    /// answers `None`, without taking the lock, when there is none. A new
    /// record is written whole by `create_media_record`, which fails if
    /// another got there first, so only existing records need the lock; a
    /// dispatch of new URLs then costs no lock round trips.
    pub async fn update_existing_media_record<T>(
        &self,
        code: &str,
        change: impl FnOnce(MediaRecord) -> (Option<MediaRecord>, T),
    ) -> Result<Option<T>> {
        if self.media_record(code).await?.is_none() {
            return Ok(None);
        }
        self.update_media_record(code, |current| match current {
            Some(record) => {
                let (write, answer) = change(record);
                (write, Some(answer))
            }
            None => (None, None),
        })
        .await
    }

    async fn change_media_record<T>(
        &self,
        code: &str,
        change: impl FnOnce(Option<MediaRecord>) -> (Option<MediaRecord>, T),
    ) -> Result<T> {
        let (write, answer) = change(self.media_record(code).await?);
        if let Some(record) = write {
            self.put_json(&crate::keys::media_record_path(code), &record)
                .await?;
        }
        Ok(answer)
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
        self.delete(&crate::keys::api_key_path(digest)).await
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

        // Below a file is nowhere, as on S3.
        assert!(storage.get("a/b.jpg/c.jpg").await.unwrap().is_none());
        assert!(storage.head("a/b.jpg/c.jpg").await.unwrap().is_none());

        // An original over the limit is refused, not read into memory.
        let whole = storage.get_original("a/b.jpg", 3).await.unwrap().unwrap();
        assert_eq!(&whole.bytes[..], b"xyz");
        let refused = storage.get_original("a/b.jpg", 2).await.unwrap_err();
        assert_eq!(refused.code(), "too-large");
        assert!(storage
            .get_original("a/none.jpg", 2)
            .await
            .unwrap()
            .is_none());
    }

    /// Local writes land whole, through a staging file that is gone after,
    /// in directories made on the way; an overwrite replaces the object.
    /// object_store reads and lists what they write like its own.
    #[tokio::test]
    async fn local_writes_are_whole_objects_object_store_reads() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        storage
            .put("x/old.jpg", Bytes::from_static(b"old"))
            .await
            .unwrap();
        let written = storage
            .put_all(vec![
                ("x/old.jpg".into(), Bytes::from_static(b"newer")),
                ("y/z/new.jpg".into(), Bytes::from(vec![7u8; 70_000])),
            ])
            .await
            .unwrap();
        assert_eq!(
            written.iter().map(|w| w.size).collect::<Vec<_>>(),
            [5, 70_000]
        );
        let object_store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let read = |path: &'static str| {
            let object_store = &object_store;
            async move {
                let got = object_store.get(&StorePath::from(path)).await.unwrap();
                got.bytes().await.unwrap()
            }
        };
        assert_eq!(&read("x/old.jpg").await[..], b"newer");
        assert_eq!(read("y/z/new.jpg").await.len(), 70_000);
        let mut listed = storage.list("").await.unwrap();
        listed.sort();
        assert_eq!(listed, ["x/old.jpg", "y/z/new.jpg"]);
        let mut names: Vec<String> = ["x", "y/z"]
            .iter()
            .flat_map(|d| std::fs::read_dir(dir.path().join(d)).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["new.jpg", "old.jpg"], "no staging file is left");

        let refused = storage
            .put_all(vec![
                ("ok.jpg".into(), Bytes::new()),
                ("../out".into(), Bytes::new()),
            ])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "invalid-path");
        assert!(
            storage.get("ok.jpg").await.unwrap().is_none(),
            "nothing is written"
        );
    }

    /// `s3://bucket/prefix` opens S3 (never the local fast path) with the
    /// prefix as its root; a URL without a bucket is a config error.
    #[test]
    fn s3_urls_open_with_their_settings() {
        let load = |storage: &str| {
            crate::config::Config::load_from(crate::config::Sources {
                extra_toml: Some(&format!(
                    "[storage]\n{storage}\ns3_region = \"eu-west-1\"\n\
                     s3_access_key_id = \"k\"\ns3_secret_access_key = \"s\""
                )),
                ..Default::default()
            })
            .unwrap()
            .storage
        };
        let storage = Storage::from_config(&load("url = \"s3://media/a/b/\"")).unwrap();
        assert_eq!(format!("{storage:?}"), "Storage(s3://media/a/b)");
        assert!(storage.local.is_none());
        let storage = Storage::from_config(&load("url = \"s3://media\"")).unwrap();
        assert_eq!(format!("{storage:?}"), "Storage(s3://media/)");
        for url in ["s3://", "s3:///prefix"] {
            let err = Storage::from_config(&load(&format!("url = \"{url}\""))).unwrap_err();
            assert_eq!(err.code(), "invalid-config", "{url}: {err}");
        }
        let err = Storage::open("s3://media/a").unwrap_err();
        assert_eq!(err.code(), "invalid-config");
        let dir = tempfile::tempdir().unwrap();
        let local = Storage::from_config(&load(&format!("url = \"{}\"", dir.path().display())));
        assert!(local.unwrap().local.is_some());
    }

    /// Local reads open the very file object_store's local backend names.
    #[test]
    fn local_files_are_the_ones_object_store_names() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let local = storage.local.as_ref().unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        for path in [
            "a/b.jpg",
            "media/cache/small/acme/0/x y.jpg",
            "ünï/çødé/ñ.png",
            "a/b%20c.jpg",
            "a/100%.jpg",
            "a/b#c.jpg",
            "a/b#",
            "a/b#12",
            "a/b#0",
            "q?x=1&y=2.webp",
        ] {
            let location = Storage::location(path).unwrap();
            let ours = local.file(&location).ok();
            let theirs = store.path_to_filesystem(&location).ok();
            assert_eq!(ours, theirs, "{path}");
        }
        assert!(local.file(&StorePath::from("")).is_err());
    }

    /// Whether this kernel has `cachestat` (Linux 6.5).
    fn kernel_has_cachestat() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let minor: u32 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 5)
    }

    /// A local object the page cache holds is answered as its open file
    /// (the kept one while it is linked, a new one once it is replaced);
    /// other stores answer bytes.
    #[tokio::test]
    async fn objects_for_sending_are_their_cached_files() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap())
            .unwrap()
            .keeping_files_open(10, Duration::from_secs(60));
        assert!(storage
            .get_for_sending("a/none.png")
            .await
            .unwrap()
            .is_none());

        for content in [&b"first version"[..], b"second, longer version"] {
            storage
                .put("a/b.png", Bytes::copy_from_slice(content))
                .await
                .unwrap();
            let sendable = storage.get_for_sending("a/b.png").await.unwrap().unwrap();
            let bytes = match sendable {
                Sendable::File(file) => {
                    assert_eq!(file.len(), content.len() as u64);
                    file.read_all().await.unwrap()
                }
                Sendable::Bytes(object) => {
                    assert!(!kernel_has_cachestat(), "a just-written file is cached");
                    object.bytes
                }
            };
            assert_eq!(bytes, content);
        }

        let memory = Storage::open("memory://").unwrap();
        memory
            .put("a/b.png", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let sendable = memory.get_for_sending("a/b.png").await.unwrap().unwrap();
        assert!(matches!(sendable, Sendable::Bytes(object) if object.bytes == "x"));
    }

    /// Local reads answer as object_store's local backend does.
    #[tokio::test]
    async fn local_reads_match_object_store() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        for (path, bytes) in [
            ("a/b.jpg", &b"xyz"[..]),
            ("a/empty", b""),
            ("c/d e.png", b"1"),
        ] {
            storage.put(path, Bytes::from_static(bytes)).await.unwrap();
        }
        for path in ["a/b.jpg", "a/empty", "c/d e.png", "a", "none", "a/none"] {
            let location = StorePath::parse(path).unwrap();
            let want = match store.get(&location).await {
                Ok(got) => Some((
                    got.meta.size,
                    got.meta.last_modified.timestamp(),
                    got.bytes().await.unwrap(),
                )),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("{path}: {e}"),
            };
            let got = storage.get(path).await.unwrap();
            let got = got.map(|o| (o.info.size, o.info.last_modified, o.bytes));
            assert_eq!(got, want, "{path}");
            let head = storage.head(path).await.unwrap();
            assert_eq!(
                head.map(|i| (i.size, i.last_modified)),
                want.map(|w| (w.0, w.1)),
                "{path}"
            );
        }
    }

    /// Whole reads, small and large, on disk and in memory alike.
    #[tokio::test]
    async fn whole_reads() {
        let dir = tempfile::tempdir().unwrap();
        let big: Bytes = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for storage in [
            Storage::open(dir.path().to_str().unwrap()).unwrap(),
            Storage::open("memory://").unwrap(),
        ] {
            assert!(storage.get("a/b.jpg").await.unwrap().is_none());
            for bytes in [Bytes::new(), Bytes::from_static(b"xyz"), big.clone()] {
                storage.put("a/b.jpg", bytes.clone()).await.unwrap();
                assert_eq!(storage.get("a/b.jpg").await.unwrap().unwrap().bytes, bytes);
            }
            // A directory is no object.
            assert!(storage.get("a").await.unwrap().is_none());
            assert!(storage.head("a").await.unwrap().is_none());
            assert_eq!(
                storage.get("../x").await.unwrap_err().code(),
                "invalid-path"
            );
        }
    }

    /// A kept descriptor serves reads until its file is replaced or
    /// deleted, however that happens.
    #[tokio::test]
    async fn kept_open_files_follow_replacements_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap())
            .unwrap()
            .keeping_files_open(10, Duration::from_secs(60));
        let read = |path: &'static str| {
            let storage = storage.clone();
            async move {
                let got = storage.get_keeping_open(path).await.unwrap();
                got.map(|object| object.bytes)
            }
        };
        assert_eq!(read("v/a.jpg").await, None);
        storage
            .put("v/a.jpg", Bytes::from_static(b"one"))
            .await
            .unwrap();
        assert_eq!(read("v/a.jpg").await.as_deref(), Some(&b"one"[..]));
        assert_eq!(storage.open_files.as_ref().unwrap().kept().await, 1);

        // The kept descriptor is read without the path: a file moved away
        // by hand (still linked) is what it reads.
        let file = dir.path().join("v/a.jpg");
        std::fs::rename(&file, dir.path().join("v/moved")).unwrap();
        assert_eq!(read("v/a.jpg").await.as_deref(), Some(&b"one"[..]));
        std::fs::rename(dir.path().join("v/moved"), &file).unwrap();

        // Replaced through object_store (a rename over it), or by hand.
        storage
            .put("v/a.jpg", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(read("v/a.jpg").await.as_deref(), Some(&b"two"[..]));
        std::fs::write(dir.path().join("v/tmp"), b"three").unwrap();
        std::fs::rename(dir.path().join("v/tmp"), &file).unwrap();
        assert_eq!(read("v/a.jpg").await.as_deref(), Some(&b"three"[..]));
        storage.delete("v/a.jpg").await.unwrap();
        assert_eq!(read("v/a.jpg").await, None);
        assert_eq!(storage.open_files.as_ref().unwrap().kept().await, 0);

        assert_eq!(
            storage.get_keeping_open("../x").await.unwrap_err().code(),
            "invalid-path"
        );
        // Any other store reads as `get` does.
        let memory = Storage::open("memory://")
            .unwrap()
            .keeping_files_open(10, Duration::from_secs(60));
        memory
            .put("v/a.jpg", Bytes::from_static(b"m"))
            .await
            .unwrap();
        assert!(memory.open_files.is_none());
        let got = memory.get_keeping_open("v/a.jpg").await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"m");
    }

    #[test]
    fn kept_descriptors_stay_under_the_process_limit() {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        assert_eq!(open_files::bounded(u64::MAX), limit / 4);
        assert_eq!(open_files::bounded(5), 5.min(limit / 4));
    }

    /// Two jobs that started from the same record each keep what the other
    /// wrote meanwhile, and their own changes win.
    #[test]
    fn a_rebased_record_keeps_what_another_job_wrote() {
        let done = |url: &str| Thumb {
            marking: "done".into(),
            url: Some(url.into()),
            ..Thumb::pending()
        };
        let mut base = MediaRecord::new("c0de", "acme", None);
        base.path = Some("acme/0/c0de.jpg".into());
        base.thumb_data.insert("small".into(), Thumb::pending());
        base.thumb_data.insert("large".into(), Thumb::pending());

        let mut theirs = base.clone();
        theirs.thumb_data.insert("large".into(), done("l"));
        theirs.resized.insert("large".into(), "l".into());
        theirs.blurhash = Some("theirs".into());
        theirs.marking = "resized".into();

        let mut ours = base.clone();
        ours.thumb_data.insert("small".into(), done("s"));
        ours.resized.insert("small".into(), "s".into());
        ours.blurhash = Some("ours".into());
        ours.updated_at += 5;

        let merged = ours.rebased(&base, theirs.clone());
        assert_eq!(merged.thumb_data["small"], done("s"));
        assert_eq!(merged.thumb_data["large"], done("l"));
        assert_eq!(merged.resized.len(), 2);
        assert_eq!(merged.blurhash.as_deref(), Some("ours"));
        assert_eq!(merged.updated_at, ours.updated_at);
        // Left alone by ours: theirs stands.
        assert_eq!(merged.marking, "resized");
        assert_eq!(merged.path, base.path);
        // Nothing changed since the base: the stored record as it is.
        assert_eq!(base.rebased(&base, theirs.clone()), theirs);

        // A job that only archived, or then failed, from the same base does
        // not take back what theirs finished.
        for marking in ["downloaded", "failed"] {
            let mut slower = base.clone();
            slower.marking = marking.into();
            let merged = slower.rebased(&base, theirs.clone());
            assert_eq!(merged.marking, "resized", "{marking}");
        }
    }

    /// Bytes the page cache does not hold come from the blocking pool.
    #[test]
    fn a_read_the_cache_cannot_finish_is_finished_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let local_read::Started::Done(object) = start_reading(&path).unwrap() else {
            panic!("a cached file is read at once");
        };
        assert_eq!(&object.bytes[..], b"0123456789");
        let rest = local_read::Rest::after(&path, 4).unwrap();
        let finished = rest.finish().unwrap();
        assert_eq!(&finished.bytes[..], b"0123456789");
        assert_eq!(finished.info, object.info);
        assert!(start_reading(&dir.path().join("none")).is_none());
    }

    fn start_reading(path: &std::path::Path) -> Option<local_read::Started> {
        let (open, metadata) = local_read::open_file(path).unwrap()?;
        Some(local_read::read(open, &metadata).unwrap())
    }

    /// tmpfs refuses RWF_NOWAIT, yet holds every byte in memory: its files
    /// are read at once, not on the blocking pool.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_tmpfs_file_is_read_at_once() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm, a tmpfs on Linux");
        let path = dir.path().join("f");
        let body: Vec<u8> = (0..200_000u32).map(|n| n as u8).collect();
        std::fs::write(&path, &body).unwrap();
        let local_read::Started::Done(object) = start_reading(&path).unwrap() else {
            panic!("a tmpfs file went to the blocking pool");
        };
        assert_eq!(object.bytes, body);
    }
}
