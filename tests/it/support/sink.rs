//! A loopback HTTP server that records every callback request (path, headers,
//! body) and answers a configurable status (200 by default), or holds its
//! answer behind a `Gate` (a receiver that hangs).
//!
//! Owns only its listener and connection tasks, all aborted on drop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use tokio::task::JoinHandle;

use super::Gate;

/// One request the sink received.
#[derive(Clone, Debug)]
pub struct Received {
    /// HTTP method, normally `POST`.
    pub method: String,
    /// Path plus query, e.g. `/hook?id=7`.
    pub path_and_query: String,
    /// Request headers, names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or `Null` when it is not JSON.
    pub body: serde_json::Value,
    /// The body as received.
    pub raw: Bytes,
}

impl Received {
    /// Checks the Standard Webhooks signature: `webhook-signature` holds a
    /// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` where the
    /// key is the base64 after `whsec_` in `secret`.
    pub fn signature_valid(&self, secret: &str) -> bool {
        use base64::Engine as _;
        use hmac::Mac as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let (Some(id), Some(timestamp), Some(signatures)) = (
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            self.header("webhook-signature"),
        ) else {
            return false;
        };
        let key = engine
            .decode(secret.trim_start_matches("whsec_"))
            .expect("secret is base64");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&self.raw);
        let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
        signatures.split(' ').any(|s| s == expected)
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    status: AtomicU16,
    /// Requests still to answer with `failure_status` before `status` applies.
    failures_left: AtomicUsize,
    failure_status: AtomicU16,
    /// While set, each request is recorded, then answered only once it opens.
    hold: Mutex<Option<Gate>>,
}

/// The callback sink. Accepts any method on any path.
pub struct CallbackSink {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl CallbackSink {
    /// Binds 127.0.0.1 on a free port and starts recording.
    pub async fn start() -> CallbackSink {
        let state = Arc::new(State {
            received: Mutex::default(),
            status: AtomicU16::new(200),
            failures_left: AtomicUsize::new(0),
            failure_status: AtomicU16::new(500),
            hold: Mutex::default(),
        });
        let handler_state = state.clone();
        let (addr, task) = super::http::serve_http(move |req| {
            let state = handler_state.clone();
            async move {
                let method = req.method().to_string();
                let path_and_query = super::http::path_and_query(req.uri());
                let headers = super::http::header_pairs(req.headers());
                let raw = match req.into_body().collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(_) => Bytes::new(),
                };
                let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
                state.received.lock().unwrap().push(Received {
                    method,
                    path_and_query,
                    headers,
                    body,
                    raw,
                });
                let hold = state.hold.lock().unwrap().clone();
                if let Some(gate) = hold {
                    gate.passed().await;
                }
                let failing = state
                    .failures_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let status = if failing {
                    state.failure_status.load(Ordering::SeqCst)
                } else {
                    state.status.load(Ordering::SeqCst)
                };
                let mut response = Response::builder().status(status);
                if (300..400).contains(&status) {
                    // A redirect names where to go: here, a path of this sink.
                    response = response.header("location", "/moved");
                }
                Ok(response
                    .body(Full::new(Bytes::new()))
                    .expect("valid sink status"))
            }
        })
        .await;
        CallbackSink { addr, state, task }
    }

    /// Answers `status` to every later request.
    pub fn set_status(&self, status: u16) {
        assert!(
            (100..1000).contains(&status),
            "invalid HTTP status {status}"
        );
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Answers `status` to the next `n` requests, then as before (a 3xx
    /// with a `Location` of this sink's `/moved`).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state.failure_status.store(status, Ordering::SeqCst);
        self.state.failures_left.store(n, Ordering::SeqCst);
    }

    /// Holds the answer to every later request until `gate` opens: the
    /// request is recorded at once, the client hears nothing. A gate never
    /// opened is a receiver that hangs forever.
    pub fn hold_until(&self, gate: &Gate) {
        *self.state.hold.lock().unwrap() = Some(gate.clone());
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// Every request recorded so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// How many requests were recorded.
    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// Waits (bounded by `timeout`) until at least `n` requests arrived and
    /// returns all of them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let what = format!("{n} callback request(s) at {}", self.addr);
        super::eventually(timeout, &what, || async {
            let received = self.received();
            (received.len() >= n).then_some(received)
        })
        .await
    }
}

impl Drop for CallbackSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
