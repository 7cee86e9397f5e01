//! kiln: an edge-cached image proxy with async pre-heat. See DESIGN.md in the
//! shared folder and the README for the shape; each module's header says
//! what it owns.
// Denied, not forbidden: `imaging::decode_webp` calls libwebp's scaled
// decoder, `storage::file_body` the kernel's `cachestat`, and `one_write`
// borrows pingora's socket by its descriptor for `sendfile`; no safe
// wrapper offers these.
#![deny(unsafe_code)]

pub mod api;
pub mod app;
pub mod callback;
pub mod config;
pub mod core_yield;
pub mod error;
pub mod fetch;
pub mod filter;
pub mod front;
pub mod heartbeat;
pub mod imaging;
pub mod index;
pub mod keys;
pub mod metrics;
pub mod queue;
pub mod redis_conn;
pub mod reuseport;
pub mod security;
pub mod shared_lock;
pub mod storage;
pub mod ui;
pub mod worker;

pub use error::{Error, Result};
