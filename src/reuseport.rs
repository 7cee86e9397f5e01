//! The front's listening sockets: one `SO_REUSEPORT` socket and one
//! single-threaded pingora service per front thread, so the kernel spreads
//! connections over the threads and each is served on the thread that
//! accepted it, as nginx does with `reuseport`.
//!
//! pingora's own listener runs one accept loop and spawns each connection on a
//! random thread while its socket stays registered with the accepting
//! thread's reactor, so half the connections' reads cost a cross-thread
//! wake-up (README.md, "Benchmarks").

use std::net::ToSocketAddrs;
use std::os::fd::IntoRawFd;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::ListenerConfig;
use pingora_core::server::{Fds, ListenFds, ShutdownWatch};
use pingora_core::services::listening::Service as ListeningService;
use pingora_core::services::Service;

use crate::error::{Error, Result};

/// pingora's backlog for its own listeners.
const LISTENER_BACKLOG: u32 = 65535;

/// One thread's share of a listening address.
pub struct ReuseportShard<A> {
    inner: ListeningService<A>,
    addr: String,
    index: usize,
}

/// `threads` shards of `listener`'s address, each serving `app` (a clone per
/// shard, so it should share its state behind `Arc`s).
///
/// A port of 0 gets one shard: each socket would get a port of its own.
pub fn shards<A, F>(
    name: &str,
    addr: &str,
    threads: usize,
    listener: F,
    app: A,
) -> Vec<ReuseportShard<A>>
where
    A: ServerApp + Clone + Send + Sync + 'static,
    F: Fn() -> ListenerConfig,
{
    let threads = if addr.ends_with(":0") {
        1
    } else {
        threads.max(1)
    };
    (0..threads)
        .map(|index| {
            let mut inner = ListeningService::new(format!("{name} {index}"), app.clone());
            inner.add_listener(listener());
            ReuseportShard {
                inner,
                addr: addr.to_string(),
                index,
            }
        })
        .collect()
}

impl<A: ServerApp + Send + Sync + 'static> ReuseportShard<A> {
    /// The key this shard's socket is filed under in pingora's table of
    /// sockets handed to the next process on a zero-downtime upgrade.
    fn upgrade_key(&self) -> String {
        format!("{}#reuseport{}", self.addr, self.index)
    }

    /// The socket handed over by the previous process, else a new one;
    /// `None` when this shard must stay idle (see `legacy_socket`).
    fn socket(&self, inherited: Option<&ListenFds>) -> Result<Option<i32>> {
        let key = self.upgrade_key();
        if let Some(fds) = inherited {
            let fds = fds.lock();
            if let Some(fd) = fds.get(&key).copied().or_else(|| self.legacy_socket(&fds)) {
                return Ok(Some(fd));
            }
            if fds.get(&self.addr).is_some() {
                tracing::warn!(
                    service = %self.name(),
                    "took over one shared socket: its first thread serves every connection until kiln restarts"
                );
                return Ok(None);
            }
        }
        let fd = bind_reuseport(&self.addr)?;
        if let Some(fds) = inherited {
            fds.lock().add(key, fd);
        }
        Ok(Some(fd))
    }

    /// A kiln with `reuseport = false`, or from before it existed, hands
    /// over one socket filed under the bare address, and nothing else can
    /// bind that port while it is open: the first shard serves it alone.
    fn takes_legacy_socket(&self) -> bool {
        self.index == 0
    }

    fn legacy_socket(&self, inherited: &Fds) -> Option<i32> {
        self.takes_legacy_socket()
            .then(|| inherited.get(&self.addr).copied())
            .flatten()
    }
}

/// Fails when something already listens on `addr`, the value of setting
/// `key`. `SO_REUSEPORT` sockets of the same user share a port silently, so
/// a second kiln started on a port by mistake would take half of the first
/// one's connections instead of failing to bind. A `--upgrade` start skips
/// this: it inherits the sockets.
pub fn ensure_unused(key: &str, addr: &str) -> Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::Config(format!(
            "{key}: {addr} is in use (to take over a running kiln's sockets, start with --upgrade)"
        ))),
        Err(e) => Err(Error::Config(format!("{key}: {addr}: {e}"))),
    }
}

fn bind_reuseport(addr: &str) -> Result<i32> {
    let failed = |e: std::io::Error| Error::Internal(format!("listen on {addr}: {e}"));
    let sock_addr = addr
        .to_socket_addrs()
        .map_err(failed)?
        .next()
        .ok_or_else(|| Error::Internal(format!("listen on {addr}: no address")))?;
    let socket = if sock_addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(failed)?;
    socket.set_reuseaddr(true).map_err(failed)?;
    socket.set_reuseport(true).map_err(failed)?;
    socket.bind(sock_addr).map_err(failed)?;
    let listener = socket.listen(LISTENER_BACKLOG).map_err(failed)?;
    // pingora adopts the descriptor (and owns it from then on).
    Ok(listener.into_std().map_err(failed)?.into_raw_fd())
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> Service for ReuseportShard<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let fd = match self.socket(fds.as_ref()) {
            Ok(Some(fd)) => fd,
            Ok(None) => return,
            Err(e) => {
                // As pingora's own listener does when it cannot bind.
                tracing::error!(service = %self.name(), error = %e, "cannot listen");
                panic!("{}: {e}", self.name());
            }
        };
        // The inner service finds its address already bound in this table.
        let mut own = Fds::new();
        own.add(self.addr.clone(), fd);
        self.inner
            .start_service(Some(Arc::new(Mutex::new(own))), shutdown, listeners_per_fd)
            .await;
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        let mut keys = vec![self.upgrade_key()];
        if self.takes_legacy_socket() {
            keys.push(self.addr.clone());
        }
        Some(keys)
    }
}
