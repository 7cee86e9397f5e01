//! A throwaway `redis-server` child process on a free loopback port, with a
//! tiny raw-RESP client for assertions (`XLEN`, `GET`, ...).
//!
//! Owns the child's lifetime (killed and reaped on drop, or killed and
//! started again on the same port and dir) and its temp dir.
//! It must not depend on the `redis` crate, so fixtures cannot share bugs
//! with the code under test.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `start` waits for the server to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports `start` tries when the chosen one was taken.
const PORT_ATTEMPTS: usize = 5;
/// Read/write timeout of one raw RESP exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Read/write timeout of one readiness probe; short, so a foreign listener
/// on a reused port cannot stall start-up.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A `redis-server` child bound to 127.0.0.1, persistence off (or the
/// append-only file on: `start_with_aof`), data in a temp dir. The binary
/// is `$REDIS_SERVER` if set, else `redis-server` on `PATH`. Killed and
/// reaped on drop; `kill` and `restart` keep the port and the data dir.
pub struct RedisServer {
    /// The port the server listens on.
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    /// Started with the append-only file on (kept across restarts).
    aof: bool,
}

impl RedisServer {
    /// Spawns the server and blocks until it answers `PING` with `+PONG`
    /// (at most 10 s per attempt). Retries on a new port when the chosen one
    /// was taken; panics with the server log on any other failure.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Like [`RedisServer::start`], with the append-only file on and fsynced
    /// on every write (`--appendonly yes --appendfsync always`): whatever
    /// Redis acknowledged survives a SIGKILL and a [`RedisServer::restart`].
    pub fn start_with_aof() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> RedisServer {
        for attempt in 1..=PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("kiln-redis-")
                .tempdir()
                .expect("create redis temp dir");
            let port = super::free_port();
            let child = spawn(port, dir.path(), aof);
            let mut server = RedisServer {
                port,
                child,
                dir,
                aof,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(reason) => {
                    let log = server.log();
                    let port_taken = log.contains("Address already in use")
                        || reason.contains("another process");
                    if port_taken && attempt < PORT_ATTEMPTS {
                        continue; // `server` drops here: child killed, dir removed.
                    }
                    panic!("redis-server on port {port} did not start: {reason}\n--- redis.log ---\n{log}");
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Kills the server with SIGKILL (no chance to save anything beyond what
    /// it already wrote) and reaps it. Clients see the connection drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server (SIGKILL) if it still runs, and starts a new one on
    /// the same port with the same data dir and options, so whatever it
    /// persisted is loaded again. Blocks until it answers `PING`; panics
    /// with the log if it does not.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.port, self.dir.path(), self.aof);
        if let Err(reason) = self.wait_ready() {
            panic!(
                "redis-server did not restart on port {}: {reason}\n--- redis.log ---\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Path of the server's log file inside its temp dir.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Sends one command over a fresh connection as raw RESP and returns the
    /// raw reply, minus its final CRLF: `+PONG`, `:3`, `-ERR ...`,
    /// `$5\r\nhello`, `$-1`, or for arrays the whole nested reply text.
    pub fn redis_cli(&self, args: &[&str]) -> String {
        resp_command(self.addr(), args, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}", self.port))
    }

    /// How often Redis has run `command` (also from scripts), per `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let stats = self.redis_cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().expect("a call count"))
    }

    /// Runs a command that must answer an integer (`XLEN`, `DBSIZE`, ...).
    pub fn redis_int(&self, args: &[&str]) -> i64 {
        let reply = self.redis_cli(args);
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("redis command {args:?}: expected an integer, got {reply:?}"))
    }

    /// Runs a command that must answer a bulk string (`GET`, `HGET`, ...);
    /// `None` for a nil reply.
    pub fn redis_bulk(&self, args: &[&str]) -> Option<String> {
        let reply = self.redis_cli(args);
        if reply == "$-1" {
            return None;
        }
        match reply.strip_prefix('$').and_then(|r| r.split_once("\r\n")) {
            Some((_, payload)) => Some(payload.to_owned()),
            None => panic!("redis command {args:?}: expected a bulk string, got {reply:?}"),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits until our own child answers PING. Checks the child's pid via
    /// `INFO server`, so a foreign server on a reused port is not mistaken
    /// for ours.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("never tried");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            match resp_command(self.addr(), &["PING"], PROBE_TIMEOUT) {
                Ok(reply) if reply == "+PONG" => {
                    let info = resp_command(self.addr(), &["INFO", "server"], PROBE_TIMEOUT)
                        .map_err(|e| format!("INFO server: {e}"))?;
                    let ours = format!("process_id:{}\r\n", self.child.id());
                    return if info.contains(&ours) {
                        Ok(())
                    } else {
                        Err("the port answers for another process".to_owned())
                    };
                }
                Ok(reply) => last_error = format!("PING answered {reply:?}"),
                Err(e) => last_error = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "no +PONG within {READY_TIMEOUT:?}; last error: {last_error}"
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` on 127.0.0.1:`port` with its data and log in
/// `dir`; the log is appended to, so it spans restarts.
fn spawn(port: u16, dir: &Path, aof: bool) -> Child {
    let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .expect("open redis.log");
    let persistence: &[&str] = if aof {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    Command::new(&bin)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(persistence)
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone redis.log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin:?} (is redis-server installed?): {e}"))
}

/// One request/reply exchange over a fresh connection.
fn resp_command(addr: SocketAddr, args: &[&str], timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&encode_command(args))?;
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    read_reply(&mut reader, &mut raw)?;
    raw.truncate(raw.len() - 2); // every reply ends in CRLF
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Encodes a command as a RESP array of bulk strings.
fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Appends one complete RESP2 reply (recursing into arrays) to `raw`.
fn read_reply(reader: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<()> {
    let start = raw.len();
    if reader.read_until(b'\n', raw)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    let line = String::from_utf8_lossy(&raw[start..]).trim_end().to_owned();
    let invalid = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad RESP line {line:?}"),
        )
    };
    let len = || line[1..].parse::<i64>().map_err(|_| invalid());
    match line.as_bytes().first() {
        Some(b'+' | b'-' | b':') => Ok(()),
        Some(b'$') => match usize::try_from(len()?) {
            Ok(n) => {
                let at = raw.len();
                raw.resize(at + n + 2, 0);
                reader.read_exact(&mut raw[at..])
            }
            Err(_) => Ok(()), // $-1: nil
        },
        Some(b'*') => {
            for _ in 0..len()?.max(0) {
                read_reply(reader, raw)?;
            }
            Ok(())
        }
        _ => Err(invalid()),
    }
}
