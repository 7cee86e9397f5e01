//! Descriptors of recently read local files, kept open so reading one again
//! costs an `fstat` and a read instead of a path walk, an `open` and a
//! `close` (nginx's `open_file_cache`). A kept descriptor is used only
//! while its file is still linked: objects are replaced by a rename over
//! them and deleted by an unlink, and either leaves the old file with no
//! link, so the `fstat` of each read notices a change made by any process
//! (a re-render, a purge) without being told.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use super::local_read::{self, OpenFile};
use crate::error::Result;

pub struct OpenFiles {
    files: Cache<String, Arc<OpenFile>>,
}

impl OpenFiles {
    /// Keeps at most `max` descriptors, each closed once unread for `idle`
    /// (so a deleted file's space is not held for long).
    pub fn new(max: u64, idle: Duration) -> OpenFiles {
        OpenFiles {
            files: Cache::builder()
                .max_capacity(max)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// The object `key`'s open file and its `fstat`: the kept descriptor
    /// while that file is still linked, else the file `path` names (kept
    /// open); None when there is no such file.
    pub async fn open(
        &self,
        key: &str,
        path: impl FnOnce() -> Result<PathBuf>,
    ) -> Result<Option<(Arc<OpenFile>, Metadata)>> {
        if let Some(open) = self.files.get(key).await {
            let metadata = open
                .file
                .metadata()
                .map_err(|e| local_read::failed(&open.path, e))?;
            if metadata.nlink() > 0 {
                return Ok(Some((open, metadata)));
            }
            self.files.invalidate(key).await;
        }
        // Boxed: rare once warm, and a kept descriptor's future stays small.
        Box::pin(self.reopen(key, path)).await
    }

    /// Opens the file `path` names and keeps its descriptor under `key`.
    async fn reopen(
        &self,
        key: &str,
        path: impl FnOnce() -> Result<PathBuf>,
    ) -> Result<Option<(Arc<OpenFile>, Metadata)>> {
        let Some((open, metadata)) = local_read::open_file(&path()?)? else {
            return Ok(None);
        };
        self.files.insert(key.to_string(), open.clone()).await;
        Ok(Some((open, metadata)))
    }

    /// How many descriptors are kept (tests).
    #[cfg(test)]
    pub async fn kept(&self) -> u64 {
        self.files.run_pending_tasks().await;
        self.files.entry_count()
    }
}

/// The most descriptors to keep: `wanted`, but at most a quarter of the
/// process's descriptor limit, which connections and the stores share.
pub fn bounded(wanted: u64) -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    wanted.min(limit / 4)
}
