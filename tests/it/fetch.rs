//! Downloading originals through the guard: redirect cap, denied redirect
//! targets, byte cap enforced while streaming, deadlines, content checks.

use std::time::Duration;

use kiln::config::{Config, Sources};
use kiln::fetch::Fetcher;
use kiln::security::NetworkPolicy;

use crate::support::{jpeg, CountingListener, Origin, OriginResponse, StubDns};

fn fetcher(tweak: impl FnOnce(&mut Config)) -> Fetcher {
    let mut config = Config::load_from(Sources::default()).unwrap();
    config.fetch.total_timeout_ms = 1500;
    tweak(&mut config);
    let policy = NetworkPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]);
    Fetcher::new(&config.fetch, policy).unwrap()
}

#[tokio::test]
async fn follows_redirects_up_to_the_cap() {
    let origin = Origin::start().await;
    origin.serve(
        "/img.jpg",
        OriginResponse::image("image/jpeg", jpeg(32, 32, [1, 2, 3])),
    );
    origin.redirect("/r1", &origin.url("/img.jpg"));
    origin.redirect("/r2", &origin.url("/r1"));
    origin.redirect("/r3", &origin.url("/r2"));
    let fetched = fetcher(|c| c.fetch.max_redirects = 2)
        .fetch(&origin.url("/r2"))
        .await
        .unwrap();
    assert_eq!(fetched.mime, "image/jpeg");
    let err = fetcher(|c| c.fetch.max_redirects = 2)
        .fetch(&origin.url("/r3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "too-many-redirects", "{err}");
}

#[tokio::test]
async fn a_redirect_to_a_denied_address_is_refused() {
    let origin = Origin::start().await;
    origin.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/");
    origin.redirect("/to-private", "http://10.0.0.1/x.jpg");
    for path in ["/to-metadata", "/to-private"] {
        let err = fetcher(|_| {}).fetch(&origin.url(path)).await.unwrap_err();
        assert_eq!(err.code(), "address-denied", "{path}: {err}");
    }
    // localhost is judged after DNS: not allowed when only another address is.
    let strict = {
        let config = Config::load_from(Sources::default()).unwrap();
        Fetcher::new(&config.fetch, NetworkPolicy::default()).unwrap()
    };
    let url = origin.url("/to-private").replace("127.0.0.1", "localhost");
    assert_eq!(
        strict.fetch(&url).await.unwrap_err().code(),
        "address-denied"
    );
}

#[tokio::test]
async fn byte_cap_deadline_and_content_checks() {
    let origin = Origin::start().await;
    origin.serve(
        "/big.jpg",
        OriginResponse::image("image/jpeg", jpeg(600, 600, [9, 9, 9])),
    );
    origin.serve(
        "/slow.jpg",
        OriginResponse::image("image/jpeg", jpeg(8, 8, [9, 9, 9]))
            .with_delay(Duration::from_secs(5)),
    );
    origin.serve(
        "/text",
        OriginResponse::image("image/jpeg", b"definitely not an image".to_vec()),
    );
    origin.serve("/boom", OriginResponse::status(503));
    let small_cap = fetcher(|c| c.fetch.max_bytes = 1000);
    assert_eq!(
        small_cap
            .fetch(&origin.url("/big.jpg"))
            .await
            .unwrap_err()
            .code(),
        "too-large"
    );
    let f = fetcher(|_| {});
    // The origin would answer after 5 s; the 1.5 s total deadline ends it first.
    let err = f.fetch(&origin.url("/slow.jpg")).await.unwrap_err();
    assert_eq!(err.code(), "timeout", "{err}");
    assert!(err.is_retryable());
    let err = f.fetch(&origin.url("/text")).await.unwrap_err();
    assert_eq!(err.code(), "unsupported-image");
    assert!(!err.is_retryable());
    let err = f.fetch(&origin.url("/boom")).await.unwrap_err();
    assert_eq!((err.code(), err.is_retryable()), ("origin-status", true));
    let err = f.fetch(&origin.url("/missing")).await.unwrap_err();
    assert_eq!((err.code(), err.is_retryable()), ("origin-status", false));
}

/// A fetcher resolving through `dns`, allowed to reach 127.0.0.1 only (plus
/// `allow_hosts`).
fn resolving_fetcher(dns: &StubDns, allow_hosts: &[&str]) -> Fetcher {
    let config = Config::load_from(Sources::default()).unwrap();
    let policy = NetworkPolicy::new(vec!["127.0.0.1/32".parse().unwrap()])
        .with_allowed_hosts(allow_hosts.iter().map(|h| h.to_string()).collect())
        .with_nameservers(vec![dns.addr()]);
    Fetcher::new(&config.fetch, policy).unwrap()
}

#[tokio::test]
async fn names_are_judged_by_what_they_resolve_to_on_every_connection() {
    let origin = Origin::start().await;
    origin.serve(
        "/a.jpg",
        OriginResponse::image("image/jpeg", jpeg(16, 16, [5, 5, 5])),
    );
    let port = origin.addr().port();
    // A service on another loopback address, same port: what rebinding is after.
    let secret =
        CountingListener::start("127.0.0.2", port, "image/jpeg", jpeg(8, 8, [1, 1, 1])).await;
    let dns = StubDns::start().await;
    dns.resolve("rebind.test", &["127.0.0.1", "127.0.0.2"]);
    dns.resolve("inside.test", &["127.0.0.2"]);
    dns.resolve("mapped.test", &["::ffff:127.0.0.2"]);
    dns.resolve("metadata.test", &["169.254.169.254"]);
    dns.resolve("store.internal", &["127.0.0.2"]);

    // First resolution: the allowed origin answers.
    let url = |host: &str| format!("http://{host}:{port}/a.jpg");
    let fetched = resolving_fetcher(&dns, &[])
        .fetch(&url("rebind.test"))
        .await
        .unwrap();
    assert_eq!(fetched.mime, "image/jpeg");
    assert_eq!(origin.hits("/a.jpg"), 1);
    // The same name now resolves inside: judged again, refused before dialling.
    for host in ["rebind.test", "inside.test", "mapped.test", "metadata.test"] {
        let err = resolving_fetcher(&dns, &[])
            .fetch(&url(host))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "address-denied", "{host}: {err}");
        assert!(!err.is_retryable());
    }
    // A redirect to a name that resolves inside is judged the same way.
    origin.redirect("/hop", &url("inside.test"));
    let err = resolving_fetcher(&dns, &[])
        .fetch(&origin.url("/hop"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "address-denied", "{err}");
    assert_eq!(secret.connections(), 0, "a refused address was dialled");
    assert!(dns.queries() >= 6, "the stub resolver was not asked");

    // Unless an operator names the host: then its inside address is reachable.
    let fetched = resolving_fetcher(&dns, &["store.internal"])
        .fetch(&url("store.internal"))
        .await
        .unwrap();
    assert_eq!(fetched.mime, "image/jpeg");
    assert_eq!(secret.connections(), 1);
    // A name the resolver does not know is unreachable (retryable), not denied.
    let err = resolving_fetcher(&dns, &[])
        .fetch(&url("unknown.test"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "origin-unreachable", "{err}");
}

#[tokio::test]
async fn an_origin_that_never_sends_headers_is_cut_off_by_the_first_byte_deadline() {
    let origin = Origin::start().await;
    origin.serve(
        "/stall.jpg",
        OriginResponse::image("image/jpeg", jpeg(8, 8, [9, 9, 9]))
            .with_delay(Duration::from_secs(10)),
    );
    // First-byte deadline shorter than the total one: the first fires.
    let err = fetcher(|c| {
        c.fetch.first_byte_timeout_ms = 300;
        c.fetch.total_timeout_ms = 20_000;
    })
    .fetch(&origin.url("/stall.jpg"))
    .await
    .unwrap_err();
    assert_eq!(err.code(), "timeout");
    assert!(err.to_string().contains("no response headers"), "{err}");
}

/// An origin that answers 200 with a chunked JPEG-looking body that never
/// ends: `chunk` bytes every `every`. Returns its URL.
async fn endless_origin(chunk: usize, every: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; chunk];
                body[..3].copy_from_slice(&[0xff, 0xd8, 0xff]);
                loop {
                    let framed = [format!("{chunk:x}\r\n").as_bytes(), &body, b"\r\n"].concat();
                    if stream.write_all(&framed).await.is_err() {
                        return; // the client hung up: what the test wants
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    format!("http://{addr}/forever.jpg")
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut_by_the_byte_cap_or_the_deadline() {
    // No Content-Length to trust: the cap is counted while streaming.
    let fast = endless_origin(64 * 1024, Duration::from_millis(1)).await;
    let err = fetcher(|c| {
        c.fetch.max_bytes = 1024 * 1024;
        c.fetch.total_timeout_ms = 20_000;
    })
    .fetch(&fast)
    .await
    .unwrap_err();
    assert_eq!(err.code(), "too-large", "{err}");
    // A trickle under the cap is ended by the total deadline.
    let slow = endless_origin(16, Duration::from_millis(50)).await;
    let err = fetcher(|c| c.fetch.total_timeout_ms = 800)
        .fetch(&slow)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "timeout", "{err}");
}

#[tokio::test]
async fn webhooks_are_judged_by_the_same_resolver_and_rules() {
    use kiln::callback::{Delivery, Notifier};
    let sink = crate::support::CallbackSink::start().await;
    let port = sink.addr().port();
    let secret = CountingListener::start("127.0.0.2", port, "text/plain", b"ok".to_vec()).await;
    let dns = StubDns::start().await;
    dns.resolve("hooks.test", &["127.0.0.1"]);
    dns.resolve("inside.test", &["127.0.0.2"]);
    let config = Config::load_from(Sources::default()).unwrap();
    let policy = NetworkPolicy::new(vec!["127.0.0.1/32".parse().unwrap()])
        .with_nameservers(vec![dns.addr()]);
    let notifier = Notifier::new(&config.callback, policy, "kiln-test").unwrap();
    let delivery = |url: String| Delivery {
        id: "msg_test".into(),
        url,
        root: "acme".into(),
        body: "{}".into(),
        attempts: 0,
        last_error: None,
    };
    notifier
        .attempt(&delivery(format!("http://hooks.test:{port}/cb")), None)
        .await
        .unwrap();
    assert_eq!(sink.count(), 1);
    let err = notifier
        .attempt(&delivery(format!("http://inside.test:{port}/cb")), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "address-denied", "{err}");
    assert_eq!(
        secret.connections(),
        0,
        "a refused webhook address was dialled"
    );
}
