//! Listening sockets: one per front thread (`server.reuseport`), or one for
//! all. Zero-downtime restart: `kiln serve --upgrade` takes the listening
//! sockets of a running kiln when that one gets SIGQUIT, and no request fails
//! across the switch. SIGHUP does not kill kiln.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::distributed::{embedded_deployment, Process};
use crate::kiln::{test_config_toml, until_ready, Backend, Kiln};
use crate::support::{eventually, jpeg, listening_sockets};

const WAIT: Duration = Duration::from_secs(30);

/// Requests answered 200 and requests that failed in any way.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

/// A small steady load: clients on kept-alive connections and one that
/// opens a new connection per request.
fn load(url: String, tally: Arc<Tally>) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    let kept_alive = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    [kept_alive.clone(), kept_alive, fresh]
        .into_iter()
        .map(|client| {
            let (url, tally) = (url.clone(), tally.clone());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                while !tally.stop.load(Ordering::Relaxed) {
                    let answered = match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            r.bytes().await.map(|_| ()).map_err(|e| format!("{e:?}"))
                        }
                        Ok(r) => Err(format!("status {}", r.status())),
                        Err(e) => Err(format!("{e:?}")),
                    };
                    match answered {
                        Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e);
                            tally.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                errors
            })
        })
        .collect()
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_front_thread_listens_on_a_socket_of_its_own() {
    for (extra, sockets) in [
        ("[server]\nthreads = 3\n", 3),
        ("[server]\nthreads = 3\nreuseport = false\n", 1),
    ] {
        let kiln = Kiln::start_with(Backend::Embedded, extra).await;
        assert_eq!(
            listening_sockets(port_of(&kiln.base)).len(),
            sockets,
            "{extra}"
        );
        // Every socket answers: the kernel spreads new connections over them.
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        for _ in 0..30 {
            let status = fresh
                .get(kiln.url("/healthz"))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200, "{extra}");
        }
    }
}

/// `SO_REUSEPORT` sockets share a port silently: a second kiln started on a
/// port in use must fail, not take half of the first one's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_kiln_on_a_port_in_use_fails_to_start() {
    let d = embedded_deployment("");
    let log = |name: &str| d.dir.path().join(format!("{name}.log"));
    let _first = Process::start("serve", &d.config, &log("first"));
    until_ready(&format!("{}/healthz", d.base)).await;
    let listening = listening_sockets(port_of(&d.base));

    let mut second = Process::start("serve", &d.config, &log("second"));
    let status = second.wait_exit(WAIT).await;
    let text = std::fs::read_to_string(log("second")).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("is in use"), "{text}");
    assert_eq!(listening_sockets(port_of(&d.base)), listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_fails_no_request() {
    upgrade_under_load("", "", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_of_one_accept_loop_fails_no_request() {
    upgrade_under_load("reuseport = false\n", "reuseport = false\n", 1).await;
}

/// A kiln with one shared socket (`reuseport = false`, or a kiln from
/// before the setting) hands it to one with a socket per thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_one_accept_loop_to_a_socket_per_thread_fails_no_request() {
    upgrade_under_load("reuseport = false\n", "", 1).await;
}

/// Upgrades a kiln under load from one whose `[server]` table has the extra
/// TOML `old_server` to one with `new_server`, the old one listening on
/// `sockets` sockets.
async fn upgrade_under_load(old_server: &str, new_server: &str, sockets: usize) {
    let upgrade_sock = tempfile::tempdir().unwrap();
    let server = |extra: &str| {
        format!(
            "[server]\ngrace_period_secs = 1\nupgrade_sock = \"{}\"\n{extra}",
            upgrade_sock.path().join("upgrade.sock").display()
        )
    };
    let d = embedded_deployment(&server(old_server));
    let (base, config, storage) = (&d.base, &d.config, d.dir.path().join("storage"));
    let new_config = d.dir.path().join("new.toml");
    std::fs::write(
        &new_config,
        test_config_toml(port_of(base), &storage, None, &server(new_server)),
    )
    .unwrap();
    let log = |name: &str| d.dir.path().join(format!("{name}.log"));
    let read_log = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();

    let mut old = Process::start("serve", config, &log("old"));
    until_ready(&format!("{base}/healthz")).await;
    let listening = listening_sockets(port_of(base));
    assert_eq!(listening.len(), sockets, "{listening:?}");
    std::fs::create_dir_all(storage.join("a/0")).unwrap();
    std::fs::write(storage.join("a/0/p.jpg"), jpeg(600, 400, [90, 30, 160])).unwrap();
    let variant = format!("{base}/media/cache/small/a/0/p.jpg");
    until_ready(&variant).await;

    // SIGHUP is not fatal.
    old.signal("HUP");
    eventually(WAIT, "SIGHUP is logged", || {
        let text = read_log("old");
        async move { text.contains("SIGHUP ignored").then_some(()) }
    })
    .await;
    assert!(old.exited().is_none(), "SIGHUP killed kiln");

    let tally = Arc::new(Tally::default());
    let clients = load(variant.clone(), tally.clone());
    eventually(WAIT, "load is flowing", || {
        let ok = tally.ok.load(Ordering::Relaxed);
        async move { (ok >= 20).then_some(()) }
    })
    .await;

    let new = Process::start_with_args(&["serve", "--upgrade"], &new_config, &log("new"));
    old.signal("QUIT");
    let status = old.wait_exit(WAIT).await;
    assert!(
        status.success(),
        "old kiln exit: {status:?}\n{}",
        read_log("old")
    );
    assert!(
        read_log("old").contains("listener sockets sent"),
        "{}",
        read_log("old")
    );

    // The new kiln listens on the very sockets the old one handed over.
    assert_eq!(listening_sockets(port_of(base)), listening);

    // Only the new one is left to answer.
    let at_exit = tally.ok.load(Ordering::Relaxed);
    eventually(WAIT, "the new kiln answers the load", || {
        let ok = tally.ok.load(Ordering::Relaxed);
        async move { (ok >= at_exit + 50).then_some(()) }
    })
    .await;
    tally.stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for client in clients {
        errors.extend(client.await.unwrap());
    }
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "failed across the upgrade: {errors:?}\nold:\n{}\nnew:\n{}",
        read_log("old"),
        read_log("new")
    );
    assert!(
        read_log("new").contains("kiln starting"),
        "{}",
        read_log("new")
    );
    drop(new);
}
