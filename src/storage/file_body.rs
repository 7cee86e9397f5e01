//! A stored object's bytes left in their file: part of an open local file
//! whose pages the page cache holds, for the front to hand to the socket
//! with `sendfile` (as nginx does) instead of reading them into memory
//! and copying them out again.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::local_read::{self, OpenFile};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct FileBody {
    open: Arc<OpenFile>,
    start: u64,
    len: u64,
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileBody({}, {}+{})",
            self.open.path.display(),
            self.start,
            self.len
        )
    }
}

impl FileBody {
    /// The first `len` bytes of `open`.
    pub(super) fn new(open: Arc<OpenFile>, len: u64) -> FileBody {
        FileBody {
            open,
            start: 0,
            len,
        }
    }

    /// All of the file at `path` (tests).
    #[cfg(test)]
    pub fn whole(path: &std::path::Path) -> FileBody {
        let (open, metadata) = local_read::open_file(path).unwrap().expect("a file");
        FileBody::new(open, metadata.len())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where in the file these bytes start.
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn file(&self) -> &File {
        &self.open.file
    }

    /// These bytes' `range` (relative to them, within them).
    pub fn slice(&self, range: Range<u64>) -> FileBody {
        debug_assert!(range.start <= range.end && range.end <= self.len);
        FileBody {
            open: self.open.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    /// Reads `len` of these bytes from `offset` (relative to them): from
    /// the page cache on this thread, the rest on the blocking pool.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        debug_assert!(offset + len as u64 <= self.len);
        let at = self.start + offset;
        let mut bytes = vec![0; len];
        let read = local_read::read_cached_at(&self.open.file, &mut bytes, at);
        if read == len {
            return Ok(Bytes::from(bytes));
        }
        let open = self.open.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            open.file
                .read_exact_at(&mut bytes[read..], at + read as u64)
                .map_err(|e| local_read::failed(&open.path, e))?;
            Ok(Bytes::from(bytes))
        })
        .await
        .map_err(|e| Error::Internal(format!("storage read task: {e}")))?
    }

    /// All of these bytes in memory (for writers that cannot send a file).
    pub async fn read_all(&self) -> Result<Bytes> {
        let len = usize::try_from(self.len)
            .map_err(|_| Error::Storage(format!("{}: too large", self.open.path.display())))?;
        self.read(0, len).await
    }
}

/// Whether the page cache holds every page of the file's first `len`
/// bytes, so `sendfile` will not wait for the disk on an async thread.
/// Asks `cachestat` (Linux 6.5); where the kernel or a seccomp filter
/// refuses it, answers false from then on and the bytes are read instead.
#[cfg(target_os = "linux")]
pub(super) fn resident(file: &File, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    static REFUSED: AtomicBool = AtomicBool::new(false);
    // The same number on every Linux architecture kiln builds for.
    const SYS_CACHESTAT: libc::c_long = 451;

    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }

    if len == 0 {
        return true;
    }
    if REFUSED.load(Ordering::Relaxed) {
        return false;
    }
    let range = CachestatRange { off: 0, len };
    let mut stat = Cachestat::default();
    // SAFETY: both pointers are to live, properly laid out structs, and
    // the kernel writes only `stat`.
    #[allow(unsafe_code)]
    let answer = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if answer != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS) | Some(libc::EPERM)) {
            REFUSED.store(true, Ordering::Relaxed);
        }
        return false;
    }
    stat.nr_cache >= len.div_ceil(rustix::param::page_size() as u64)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn resident(_file: &File, _len: u64) -> bool {
    false
}
