//! A throwaway S3-compatible server (`moto_server` from PyPI's
//! `moto[server]`) on a free loopback port, a plain-HTTP client for looking
//! into its buckets, and a counting HTTP proxy to put between kiln and it.
//!
//! Owns the child's lifetime (killed and reaped on drop) and the proxy's
//! tasks. It must not depend on kiln or object_store, so a fixture cannot
//! share bugs with the code under test: requests here are raw HTTP/1.0
//! with a dummy signature, which moto accepts.

use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::task::JoinHandle;

/// How long `start` waits for moto to answer (it is a Python program).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports `start` tries when the chosen one was taken.
const PORT_ATTEMPTS: usize = 5;
/// Read/write timeout of one raw HTTP exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The credentials and region test kilns sign with; moto accepts any.
pub const ACCESS_KEY_ID: &str = "kiln-test-key";
pub const SECRET_ACCESS_KEY: &str = "kiln-test-secret";
pub const REGION: &str = "us-east-1";

/// The `moto_server` binary: `$MOTO_SERVER` (set by
/// `scripts/test`), else the venv `scripts/test` installs into.
fn binary() -> PathBuf {
    let path = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server")
        });
    assert!(
        path.is_file(),
        "moto_server not found at {}: run scripts/test once (it installs moto[server] \
         into target/moto-venv), or point MOTO_SERVER at a moto_server binary",
        path.display()
    );
    path
}

/// A `moto_server` child bound to 127.0.0.1. Killed and reaped on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Moto {
    /// Spawns moto and blocks until it answers HTTP; retries on a new port
    /// when the chosen one was taken, panics with its log otherwise.
    pub fn start() -> Moto {
        let bin = binary();
        for attempt in 1..=PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("kiln-moto-")
                .tempdir()
                .expect("create moto temp dir");
            let port = super::free_port();
            let log = File::create(dir.path().join("moto.log")).expect("create moto.log");
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone moto.log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut moto = Moto { port, child, dir };
            match moto.wait_ready() {
                Ok(()) => return moto,
                Err(reason) => {
                    let log = moto.log();
                    if log.contains("Address already in use") && attempt < PORT_ATTEMPTS {
                        continue;
                    }
                    panic!("moto_server on port {port} did not start: {reason}\n--- moto.log ---\n{log}");
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("never tried");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            // The bucket listing is moto's own answer, not some other server's.
            match http(self.addr(), "GET", "/", b"") {
                Ok((200, body)) if String::from_utf8_lossy(&body).contains("ListAllMyBuckets") => {
                    return Ok(())
                }
                Ok((status, _)) => last_error = format!("GET / answered {status}"),
                Err(e) => last_error = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no answer within {READY_TIMEOUT:?}; last error: {last_error}"
        ))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// moto's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Kills moto (SIGKILL) and reaps it: S3 is gone mid-test.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Creates a bucket (`PUT /<bucket>`); panics unless moto says 200.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.addr(), "PUT", &format!("/{bucket}"), b"")
            .unwrap_or_else(|e| panic!("PUT /{bucket}: {e}"));
        assert_eq!(
            status,
            200,
            "create bucket {bucket}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Every key in `bucket` that starts with `prefix`, sorted
    /// (ListObjectsV2; the fixture's buckets stay under one page).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("list-type", "2")
            .append_pair("prefix", prefix)
            .finish();
        let (status, body) = http(self.addr(), "GET", &format!("/{bucket}?{query}"), b"")
            .unwrap_or_else(|e| panic!("list {bucket}: {e}"));
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "list {bucket}: {body}");
        assert!(
            !body.contains("<IsTruncated>true"),
            "listing of {bucket} is paged"
        );
        let mut keys: Vec<String> = body
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| unescape(key)))
            .collect();
        keys.sort();
        keys
    }

    /// Puts an object straight into the bucket, as another system would.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let (status, body) = http(self.addr(), "PUT", &format!("/{bucket}/{key}"), bytes)
            .unwrap_or_else(|e| panic!("PUT {bucket}/{key}: {e}"));
        assert_eq!(
            status,
            200,
            "PUT {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// An object's bytes, `None` when moto answers 404.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (status, body) = http(self.addr(), "GET", &format!("/{bucket}/{key}"), b"")
            .unwrap_or_else(|e| panic!("GET {bucket}/{key}: {e}"));
        match status {
            200 => Some(body),
            404 => None,
            other => panic!(
                "GET {bucket}/{key}: {other} {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unescape(xml: &str) -> String {
    xml.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Names the test key with a dummy signature: moto (which checks no
/// signatures) then answers as the bucket's owner, where an anonymous
/// caller gets 403 for every private object.
const AUTHORIZATION: &str = "Authorization: AWS4-HMAC-SHA256 \
    Credential=kiln-test-key/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

/// One HTTP/1.0 exchange over a fresh connection (no chunking, the body
/// runs to the close): status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = format!(
        // A typed body: moto (werkzeug) would read a form body as a form.
        "{method} {target} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         {AUTHORIZATION}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// One request the proxy passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The upstream's status, 502 when it could not be reached.
    pub status: u16,
    /// The access key id the request was signed with, if signed.
    pub key_id: Option<String>,
}

/// A loopback HTTP proxy that passes every request on to `upstream`
/// unchanged (the `Host` header too, so signatures hold) and records it.
/// Its tasks are aborted on drop.
pub struct CountingProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Proxied>>>,
    /// When non-zero, every request is answered with this status instead
    /// of being passed on (an S3 having a bad time).
    fail_with: Arc<AtomicU16>,
    /// Milliseconds each PUT is held before it is passed on (a slow write).
    put_delay_ms: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: SocketAddr) -> CountingProxy {
        let seen: Arc<Mutex<Vec<Proxied>>> = Arc::default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(IO_TIMEOUT)
            .build()
            .expect("proxy client");
        let record = seen.clone();
        let fail_with = Arc::new(AtomicU16::new(0));
        let failing = fail_with.clone();
        let put_delay_ms = Arc::new(AtomicU64::new(0));
        let put_delay = put_delay_ms.clone();
        let (addr, task) =
            super::http::serve_http(move |request: Request<hyper::body::Incoming>| {
                let client = client.clone();
                let record = record.clone();
                let fail = failing.load(Ordering::SeqCst);
                let delay = match request.method() == hyper::Method::PUT {
                    true => Duration::from_millis(put_delay.load(Ordering::SeqCst)),
                    false => Duration::ZERO,
                };
                async move {
                    tokio::time::sleep(delay).await;
                    let response = if fail == 0 {
                        forward(&client, upstream, request).await
                    } else {
                        Ok(refuse(request, fail))
                    };
                    let (proxied, response) = match response {
                        Ok(answer) => answer,
                        Err((proxied, e)) => (
                            proxied,
                            Response::builder()
                                .status(502)
                                .body(Full::new(Bytes::from(e)))
                                .expect("502"),
                        ),
                    };
                    record.lock().unwrap().push(proxied);
                    Ok::<_, Infallible>(response)
                }
            })
            .await;
        CountingProxy {
            addr,
            seen,
            fail_with,
            put_delay_ms,
            task,
        }
    }

    /// Holds every PUT from now on for `delay` before passing it on.
    pub fn delay_puts(&self, delay: Duration) {
        self.put_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers every request from now on with `status` (0: pass them on again).
    pub fn fail_with(&self, status: u16) {
        self.fail_with.store(status, Ordering::SeqCst);
    }

    /// `http://127.0.0.1:<port>`: the endpoint kiln is configured with.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in the order they were answered.
    pub fn requests(&self) -> Vec<Proxied> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests so far whose path is `path` (`/<bucket>/<key>`).
    pub fn requests_for(&self, path: &str) -> Vec<Proxied> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = (Proxied, Response<Full<Bytes>>);

fn refuse(request: Request<hyper::body::Incoming>, status: u16) -> Answer {
    let proxied = Proxied {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        status,
        key_id: None,
    };
    let body = "<Error><Code>ServiceUnavailable</Code><Message>proxy says no</Message></Error>";
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("refusal");
    (proxied, response)
}

async fn forward(
    client: &reqwest::Client,
    upstream: SocketAddr,
    request: Request<hyper::body::Incoming>,
) -> Result<Answer, (Proxied, String)> {
    let (parts, body) = request.into_parts();
    // `AWS4-HMAC-SHA256 Credential=<key id>/<date>/<region>/s3/aws4_request, …`
    let key_id = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once("Credential=")?.1.split('/').next())
        .map(str::to_owned);
    let mut proxied = Proxied {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        status: 502,
        key_id,
    };
    let target = format!(
        "http://{upstream}{}",
        super::http::path_and_query(&parts.uri)
    );
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Err((proxied, format!("request body: {e}"))),
    };
    let mut upstream_request = client.request(parts.method.clone(), &target).body(body);
    for (name, value) in &parts.headers {
        // reqwest frames the body itself.
        if name != hyper::header::CONTENT_LENGTH && name != hyper::header::TRANSFER_ENCODING {
            upstream_request = upstream_request.header(name, value);
        }
    }
    let answer = match upstream_request.send().await {
        Ok(answer) => answer,
        Err(e) => return Err((proxied, format!("upstream: {e}"))),
    };
    proxied.status = answer.status().as_u16();
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        // hyper frames the body; a HEAD answer keeps the object's length.
        let framing = name == hyper::header::TRANSFER_ENCODING
            || (name == hyper::header::CONTENT_LENGTH && parts.method != hyper::Method::HEAD);
        if !framing && name != hyper::header::CONNECTION {
            response = response.header(name, value);
        }
    }
    let bytes = match answer.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => return Err((proxied, format!("upstream body: {e}"))),
    };
    let response = response
        .body(Full::new(bytes))
        .map_err(|e| (proxied.clone(), e.to_string()))?;
    Ok((proxied, response))
}
