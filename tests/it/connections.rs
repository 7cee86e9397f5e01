//! How answers leave a kept-open HTTP/1.1 connection (each in one write,
//! straight from its bytes): in order when requests are pipelined, with
//! `Date` and `Connection` as pingora wrote them, closed when the client
//! asks or HTTP/1.0 does not ask to keep it, and whole when the body is
//! large and read late; and, when bodies are not kept in memory, sent
//! from their files as well.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::kiln::{until_ready, Backend, Kiln};
use crate::support::{png_noise, png_rgba};

/// One answer as read off the wire.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the next answer; None at the end of the connection. The answer to
/// a HEAD has no body whatever its `Content-Length` says.
async fn read_answer(reader: &mut BufReader<TcpStream>, to_head: bool) -> Option<Answer> {
    let read = async {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap() == 0 {
            return None;
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(": ").expect("a header line");
            headers.push((name.to_string(), value.to_string()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        let length: usize = answer
            .header("content-length")
            .expect("every answer has a Content-Length")
            .parse()
            .unwrap();
        // A 304 ends with its head, whatever its Content-Length (the 200's).
        if !to_head && answer.status != 304 {
            answer.body = vec![0; length];
            reader.read_exact(&mut answer.body).await.unwrap();
        }
        Some(answer)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer or the end of the connection within 10 s")
}

async fn connect(kiln: &Kiln) -> BufReader<TcpStream> {
    let addr = kiln.url("").trim_start_matches("http://").to_string();
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

/// A connection whose receive buffer is small, so an answer not read yet
/// fills the socket and kiln's writes wait.
async fn connect_small_window(kiln: &Kiln) -> BufReader<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = kiln.url("").trim_start_matches("http://").parse().unwrap();
    BufReader::new(socket.connect(addr).await.unwrap())
}

async fn send(connection: &mut BufReader<TcpStream>, text: &str) {
    connection
        .get_mut()
        .write_all(text.as_bytes())
        .await
        .unwrap();
}

fn request(method: &str, path: &str, version: &str, extra: &str) -> String {
    format!("{method} {path} {version}\r\nHost: kiln\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let kiln = Kiln::start(Backend::Embedded).await;
    kiln.store("acme/0/logo.png", &png_rgba(900, 600, [20, 200, 40, 255]));
    kiln.store("acme/0/other.png", &png_rgba(300, 300, [200, 20, 40, 255]));
    let hit_path = "/media/cache/medium/acme/0/logo.png";
    let expected = until_ready(&kiln.url(hit_path))
        .await
        .bytes()
        .await
        .unwrap();

    // Four requests in one packet: a hit, a miss, a HEAD of the hit, and a
    // last one asking to close.
    let mut connection = connect(&kiln).await;
    let pipelined = [
        request("GET", hit_path, "HTTP/1.1", ""),
        request("GET", "/media/cache/small/acme/0/other.png", "HTTP/1.1", ""),
        request("HEAD", hit_path, "HTTP/1.1", ""),
        request("GET", "/healthz", "HTTP/1.1", "Connection: close\r\n"),
    ]
    .concat();
    send(&mut connection, &pipelined).await;

    let hit = read_answer(&mut connection, false).await.expect("the hit");
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, expected, "the variant's bytes");
    assert_eq!(hit.header("content-type"), Some("image/png"));
    assert_eq!(hit.header("connection"), Some("keep-alive"));
    let date = hit.header("date").expect("a Date header");
    assert!(date.ends_with(" GMT"), "an HTTP date: {date}");

    let miss = read_answer(&mut connection, false).await.expect("the miss");
    assert_eq!(miss.status, 202);
    assert_eq!(miss.header("cache-control"), Some("no-store"));
    assert_eq!(miss.header("connection"), Some("keep-alive"));

    let head = read_answer(&mut connection, true).await.expect("the HEAD");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), hit.header("etag"));

    let last = read_answer(&mut connection, false).await.expect("the last");
    assert_eq!(last.status, 200);
    assert_eq!(last.body, br#"{"status":"ok"}"#);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(
        read_answer(&mut connection, false).await.is_none(),
        "kiln closes after the answer to Connection: close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_connections_close_unless_asked_to_stay_open() {
    let kiln = Kiln::start(Backend::Embedded).await;

    let mut plain = connect(&kiln).await;
    let ask = request("GET", "/healthz", "HTTP/1.0", "");
    send(&mut plain, &ask).await;
    let answer = read_answer(&mut plain, false).await.expect("an answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(
        read_answer(&mut plain, false).await.is_none(),
        "then closed"
    );

    let mut kept = connect(&kiln).await;
    let ask = request("GET", "/healthz", "HTTP/1.0", "Connection: keep-alive\r\n");
    for _ in 0..2 {
        send(&mut kept, &ask).await;
        let answer = read_answer(&mut kept, false).await.expect("an answer");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("connection"), Some("keep-alive"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_read_late_arrives_whole() {
    let kiln = Kiln::start(Backend::Embedded).await;
    kiln.store("acme/0/noise.png", &png_noise(1200, 800));
    let path = "/media/cache/large/acme/0/noise.png";
    until_ready(&kiln.url(path)).await;
    let stored = std::fs::read(kiln.storage_path(path.trim_start_matches('/'))).unwrap();
    assert!(stored.len() > 1_000_000, "{} bytes", stored.len());

    // A small receive buffer and a late reader: the answer waits in the
    // socket before it is read, and the connection then carries the next
    // one intact. (Short writes themselves: `one_write`'s unit test.)
    let mut connection = connect_small_window(&kiln).await;
    let ask = request("GET", path, "HTTP/1.1", "");
    for _ in 0..2 {
        send(&mut connection, &ask).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = read_answer(&mut connection, false)
            .await
            .expect("an answer");
        assert_eq!(answer.status, 200);
        assert!(answer.body == stored, "the stored bytes, whole");
    }
}

/// With no hot cache (`hot_max_object_bytes = 0`) every hit comes from the
/// variant's file, handed to the socket by `sendfile` where the page cache
/// holds it: whole bodies, ranges, HEAD and 304 answer as from memory, a
/// closing HTTP/1.0 connection (written by pingora) gets the same bytes,
/// and a large body read late arrives whole with the next answer after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_not_kept_in_memory_are_sent_from_their_files() {
    let kiln = Kiln::start_with(Backend::Embedded, "[index]\nhot_max_object_bytes = 0\n").await;
    kiln.store("acme/0/noise.png", &png_noise(1200, 800));
    let small = "/media/cache/small/acme/0/noise.png";
    let large = "/media/cache/large/acme/0/noise.png";
    until_ready(&kiln.url(small)).await;
    until_ready(&kiln.url(large)).await;
    let small_bytes = std::fs::read(kiln.storage_path(small.trim_start_matches('/'))).unwrap();
    let large_bytes = std::fs::read(kiln.storage_path(large.trim_start_matches('/'))).unwrap();
    assert!(large_bytes.len() > 1_000_000, "{} bytes", large_bytes.len());

    let mut connection = connect_small_window(&kiln).await;
    let whole = read_after(
        &mut connection,
        request("GET", small, "HTTP/1.1", ""),
        false,
    )
    .await;
    assert_eq!(whole.status, 200);
    assert!(whole.body == small_bytes, "the stored bytes");
    let etag = whole.header("etag").expect("an ETag").to_string();

    let part = read_after(
        &mut connection,
        request("GET", small, "HTTP/1.1", "Range: bytes=100-1099\r\n"),
        false,
    )
    .await;
    assert_eq!(part.status, 206);
    assert!(part.body == small_bytes[100..1100], "the range's bytes");
    let range = format!("bytes 100-1099/{}", small_bytes.len());
    assert_eq!(part.header("content-range"), Some(range.as_str()));

    let head = read_after(
        &mut connection,
        request("HEAD", small, "HTTP/1.1", ""),
        true,
    )
    .await;
    assert_eq!(head.status, 200);
    let length = small_bytes.len().to_string();
    assert_eq!(head.header("content-length"), Some(length.as_str()));

    let unchanged = format!("If-None-Match: {etag}\r\n");
    let not_modified = read_after(
        &mut connection,
        request("GET", small, "HTTP/1.1", &unchanged),
        false,
    )
    .await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    // The 200's length, and nothing follows the head: the connection
    // carries on with the next answers below.
    assert_eq!(not_modified.header("content-length"), Some(length.as_str()));

    // Pipelined behind a large body that waits in the socket.
    let pipelined = [
        request("GET", large, "HTTP/1.1", ""),
        request("GET", small, "HTTP/1.1", ""),
    ]
    .concat();
    send(&mut connection, &pipelined).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = read_answer(&mut connection, false)
        .await
        .expect("the large one");
    assert_eq!(first.status, 200);
    assert!(first.body == large_bytes, "the large variant, whole");
    let second = read_answer(&mut connection, false).await.expect("the next");
    assert!(second.body == small_bytes, "then the small one");

    let mut closing = connect(&kiln).await;
    let answer = read_after(&mut closing, request("GET", large, "HTTP/1.0", ""), false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(
        answer.body == large_bytes,
        "the same bytes through pingora's writer"
    );
    assert!(
        read_answer(&mut closing, false).await.is_none(),
        "then closed"
    );
}

/// Sends one request and reads its answer.
async fn read_after(connection: &mut BufReader<TcpStream>, ask: String, to_head: bool) -> Answer {
    send(connection, &ask).await;
    read_answer(connection, to_head).await.expect("an answer")
}

/// A client that sends `Expect: 100-continue` is told to send its body at
/// once (curl would otherwise wait a second, other clients longer), gets
/// its answer, and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_100_continue_is_told_to_send_its_body() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let mut connection = connect(&kiln).await;
    let body = r#"{"root": "expecting", "approx": 10}"#;
    let head = request(
        "POST",
        "/account_setup",
        "HTTP/1.1",
        &format!(
            "Authorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n",
            crate::kiln::ADMIN_KEY,
            body.len()
        ),
    );
    send(&mut connection, &head).await;
    let mut interim = String::new();
    tokio::time::timeout(Duration::from_secs(5), connection.read_line(&mut interim))
        .await
        .expect("100 Continue before the body is sent")
        .unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");
    let mut blank = String::new();
    connection.read_line(&mut blank).await.unwrap();
    assert_eq!(blank, "\r\n");

    send(&mut connection, body).await;
    let answer = read_answer(&mut connection, false)
        .await
        .expect("the answer");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let account: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(account["root"], "expecting");

    send(&mut connection, &request("GET", "/healthz", "HTTP/1.1", "")).await;
    let next = read_answer(&mut connection, false)
        .await
        .expect("a second answer");
    assert_eq!(next.status, 200);
}

/// A request head kiln cannot parse is answered 400 before the connection
/// closes (RFC 9112 §6.3), not dropped without a word, which a CDN would
/// count against the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_request_is_answered_400_then_closed() {
    let kiln = Kiln::start(Backend::Embedded).await;
    for unreadable in [
        request(
            "POST",
            "/healthz",
            "HTTP/1.1",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ),
        request("GET", "/healthz", "HTTP/1.1", "Transfer-Encoding: gzip\r\n"),
        "GARBAGE\r\n\r\n".to_string(),
    ] {
        let mut connection = connect(&kiln).await;
        send(&mut connection, &unreadable).await;
        let answer = read_answer(&mut connection, false)
            .await
            .expect("an answer");
        assert_eq!(answer.status, 400, "{unreadable:?}");
        assert_eq!(answer.header("connection"), Some("close"));
        let error: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(error["error"], "bad-request");
        assert!(
            read_answer(&mut connection, false).await.is_none(),
            "closed after"
        );
    }
}
