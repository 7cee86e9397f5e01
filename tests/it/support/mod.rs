//! Test fixtures for the integration suite: a throwaway `redis-server`, a
//! Test fixtures for the integration suite: a throwaway `redis-server`, a
//! throwaway S3 (`moto_server`) with a counting proxy, a loopback origin, a
//! callback sink, a caching nginx, a bounded `eventually`, and in-memory
//! image generators plus assertion helpers.
//!
//! Owns only test scaffolding; it must never depend on kiln internals, so a
//! fixture stays valid whatever the code under test does.
#![allow(dead_code)]

pub mod dns;
pub mod gate;
mod http;
pub mod images;
pub mod nginx;
pub mod origin;
pub mod redis;
pub mod s3;
pub mod sink;

// Re-exports are used by some tests and not others.
#[allow(unused_imports)]
pub use dns::{CountingListener, StubDns};
#[allow(unused_imports)]
pub use gate::Gate;
#[allow(unused_imports)]
pub use images::{
    decode, dimensions, format_of, gif, jpeg, jpeg_with_orientation, mean_rgb, png_header_claiming,
    png_noise, png_rgba, webp_lossless,
};
#[allow(unused_imports)]
pub use nginx::Nginx;
#[allow(unused_imports)]
pub use origin::{Origin, OriginRequest, OriginResponse};
#[allow(unused_imports)]
pub use redis::RedisServer;
#[allow(unused_imports)]
pub use s3::{CountingProxy, Moto};
#[allow(unused_imports)]
pub use sink::{CallbackSink, Received};

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read
/// the port, release it). Another process may still grab it before use.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Inodes of the sockets listening on 127.0.0.1:`port`, as the kernel lists
/// them in /proc/net/tcp: one per socket, whichever process holds it.
pub fn listening_sockets(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, then state 0A (LISTEN); the inode is the tenth field.
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

/// Polls `f` every 20 ms until it yields `Some`, and returns that value.
///
/// Panics with `what` once `timeout` has passed, including when a single
/// call of `f` is still pending at the deadline. Use this instead of sleeps.
pub async fn eventually<F, Fut, T>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_) => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "eventually: timed out after {:?} waiting for {what}",
        start.elapsed()
    );
}
