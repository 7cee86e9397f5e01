//! A loopback HTTP/1.1 origin whose routes are registered at runtime: serves
//! generated images, and can delay, stall behind a `Gate`, fail, redirect or
//! lie about headers.
//!
//! Owns only its listener and connection tasks, all aborted on drop. It
//! records hits per path and every request, for assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::task::JoinHandle;

use super::Gate;

/// What the origin answers on one path.
#[derive(Clone, Debug)]
pub struct OriginResponse {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` header; not sent when empty.
    pub content_type: String,
    /// Response body.
    pub body: Bytes,
    /// Wait this long before answering (slow-origin tests).
    pub delay: Option<Duration>,
    /// Extra response headers, sent as given (may duplicate or contradict).
    pub headers: Vec<(String, String)>,
    /// Answer only once this gate is open (after any `delay`). A request
    /// held here is already counted in `hits`, so a test can wait for it.
    pub gate: Option<Gate>,
}

impl OriginResponse {
    /// `200` with the given content type and body.
    pub fn image(content_type: impl Into<String>, bytes: impl Into<Bytes>) -> Self {
        OriginResponse {
            status: 200,
            content_type: content_type.into(),
            body: bytes.into(),
            delay: None,
            headers: Vec::new(),
            gate: None,
        }
    }

    /// Just a status code, empty body, no content type.
    pub fn status(code: u16) -> Self {
        OriginResponse {
            status: code,
            content_type: String::new(),
            body: Bytes::new(),
            delay: None,
            headers: Vec::new(),
            gate: None,
        }
    }

    /// Same response, answered after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Same response, held until `gate` opens; a gate never opened stalls
    /// every request for this path forever.
    pub fn with_gate(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    /// Same response with one more header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One request the origin received.
#[derive(Clone, Debug)]
pub struct OriginRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path plus query, e.g. `/a.jpg?v=1`.
    pub path_and_query: String,
    /// Request headers, names lowercased.
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, OriginResponse>>,
    hits: Mutex<HashMap<String, usize>>,
    requests: Mutex<Vec<OriginRequest>>,
}

/// The loopback origin server. Unknown paths answer `404`.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Origin {
    /// Binds 127.0.0.1 on a free port and starts serving on a tokio task.
    pub async fn start() -> Origin {
        let state = Arc::new(State::default());
        let handler_state = state.clone();
        let (addr, task) = super::http::serve_http(move |req| {
            let state = handler_state.clone();
            async move { Ok(handle(&state, req).await) }
        })
        .await;
        Origin { addr, state, task }
    }

    /// Registers (or replaces) the response for `path` (no query string).
    pub fn serve(&self, path: &str, response: OriginResponse) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), response);
    }

    /// Makes `from` answer `302` with `Location: to_url`.
    pub fn redirect(&self, from: &str, to_url: &str) {
        self.serve(
            from,
            OriginResponse::status(302).with_header("location", to_url),
        );
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests arrived for `path` (query ignored), known or not.
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    state.requests.lock().unwrap().push(OriginRequest {
        method: req.method().to_string(),
        path_and_query: super::http::path_and_query(req.uri()),
        headers: super::http::header_pairs(req.headers()),
    });
    let route = state.routes.lock().unwrap().get(&path).cloned();
    let Some(route) = route else {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found")))
            .unwrap();
    };
    if let Some(delay) = route.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(gate) = &route.gate {
        gate.passed().await;
    }
    let mut builder = Response::builder().status(route.status);
    if !route.content_type.is_empty() {
        builder = builder.header("content-type", &route.content_type);
    }
    for (name, value) in &route.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(route.body))
        .unwrap_or_else(|e| panic!("origin: invalid response for {path}: {e}"))
}
