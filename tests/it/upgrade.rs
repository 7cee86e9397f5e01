//! Zero-downtime restart: `kiln serve --upgrade` takes the listening socket
//! of a running kiln when that one gets SIGQUIT, and no request fails across
//! the switch. SIGHUP does not kill kiln.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::distributed::{embedded_deployment, Process};
use crate::kiln::until_ready;
use crate::support::{eventually, jpeg};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_fails_no_request() {
    let sockets = tempfile::tempdir().unwrap();
    let d = embedded_deployment(&format!(
        "[server]\ngrace_period_secs = 1\nupgrade_sock = \"{}\"\n",
        sockets.path().join("upgrade.sock").display()
    ));
    let (base, config, storage) = (&d.base, &d.config, d.dir.path().join("storage"));
    let log = |name: &str| d.dir.path().join(format!("{name}.log"));
    let read_log = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();

    let mut old = Process::start("serve", config, &log("old"));
    until_ready(&format!("{base}/healthz")).await;
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

    let new = Process::start_with_args(&["serve", "--upgrade"], config, &log("new"));
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
