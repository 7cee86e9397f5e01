//! Builds everything from a `Config` and runs the front (a pingora `Server`)
//! and/or the workers (a runtime of their own), stopping on SIGTERM
//! (graceful: drain), SIGINT or a signal passed in (fast).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::ShutdownWatch;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use tokio::sync::watch;

use crate::api::Context;
use crate::callback::{Deliverer, EmbeddedOutbox, Notifier, Outbox, RedisOutbox};
use crate::config::{Config, QueueBackend};
use crate::error::{Error, Result};
use crate::filter::FilterSet;
use crate::front::Front;
use crate::index::Index;
use crate::keys::RedisKeys;
use crate::metrics::Metrics;
use crate::queue::{EmbeddedQueue, Queue, RedisQueue};
use crate::redis_conn::RedisHandle;
use crate::shared_lock::RedisRecordLock;
use crate::storage::Storage;
use crate::ui::{RecentJobs, Ui};
use crate::worker::Worker;

/// Which parts of kiln this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Front and workers.
    Serve,
    /// HTTP front only (workers run elsewhere; needs the redis backend).
    Front,
    /// Workers only.
    Worker,
}

/// A queue, an index and a webhook outbox, embedded or sharing Redis connections (one per runtime).
struct Backends {
    queue: Arc<dyn Queue>,
    index: Arc<Index>,
    outbox: Arc<dyn Outbox>,
    /// Finished jobs for `/ui`: in memory, or a capped list in Redis.
    recent: Arc<RecentJobs>,
    redis: Option<Arc<RedisHandle>>,
}

/// `front`: the index of this process's front, whose memory (queued marks,
/// entries, hot bytes) a worker's index shares.
fn backends(config: &Config, front: Option<&Index>) -> Result<Backends> {
    Ok(match config.queue.backend {
        QueueBackend::Embedded => Backends {
            queue: Arc::new(EmbeddedQueue::new(&config.queue)),
            index: Arc::new(Index::new(&config.index, None)),
            outbox: Arc::new(EmbeddedOutbox::new()),
            recent: Arc::new(RecentJobs::new(config.ui.recent_jobs, None)),
            redis: None,
        },
        QueueBackend::Redis => {
            let handle = Arc::new(RedisHandle::new(&config.redis)?);
            Backends {
                queue: Arc::new(RedisQueue::new(
                    handle.clone(),
                    &config.redis,
                    &config.queue,
                )),
                index: Arc::new({
                    let mut index = Index::new(
                        &config.index,
                        Some((handle.clone(), RedisKeys::new(&config.redis.prefix))),
                    );
                    if let Some(front) = front {
                        index.share_memory_with(front);
                    }
                    index
                }),
                outbox: Arc::new(RedisOutbox::new(
                    handle.clone(),
                    &config.redis.prefix,
                    Duration::from_millis(config.callback.poll_ms),
                )),
                recent: Arc::new(RecentJobs::new(
                    config.ui.recent_jobs,
                    Some((
                        handle.clone(),
                        RedisKeys::new(&config.redis.prefix).recent_jobs(),
                    )),
                )),
                redis: Some(handle),
            }
        }
    })
}

impl Backends {
    /// `storage` for this runtime's parts: with Redis, where several
    /// processes share it, changing a media record also holds its lock in
    /// Redis, over this runtime's own connection (one opened on the front's
    /// runtime would not outlive it while the workers drain).
    fn locking_records(&self, storage: &Storage, config: &Config) -> Storage {
        let Some(handle) = &self.redis else {
            return storage.clone();
        };
        storage
            .clone()
            .sharing_record_locks(Arc::new(RedisRecordLock::new(
                handle.clone(),
                RedisKeys::new(&config.redis.prefix),
                Duration::from_millis(config.storage.record_lock_ttl_ms),
                Duration::from_millis(config.storage.record_lock_wait_ms),
            )))
    }
}

/// With the embedded backend, what waits in memory is lost when the process
/// exits (as the README says): said once, with the counts, in the log.
async fn report_lost(worker: &Worker, deliverer: &Deliverer) {
    let jobs = worker
        .queue
        .depths()
        .await
        .map(|d| d.urgent + d.preheat + d.delayed)
        .unwrap_or(0);
    let webhooks = deliverer.outbox.pending().await.unwrap_or(0);
    if jobs + webhooks > 0 {
        tracing::warn!(
            jobs,
            webhooks,
            "embedded backend: jobs and webhooks still waiting are lost with this process"
        );
    }
}

/// The workers and their webhook deliverer, on a runtime of their own so
/// that a graceful stop can outlast the front's grace period: on SIGTERM
/// they stop claiming, get `queue.shutdown_deadline_secs` to finish their
/// jobs, then send the webhooks those jobs scheduled.
struct Workers {
    drain: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl Workers {
    fn start(worker: Worker, deliverer: Deliverer, config: &Config) -> Result<Workers> {
        let (drain, drain_rx) = watch::channel(false);
        let (abandon, mut abandon_rx) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.queue.worker_threads)
            .max_blocking_threads(config.imaging.render_threads.max(1) + 8)
            .thread_name("kiln-worker")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("worker runtime: {e}")))?;
        let flush_deadline = Duration::from_millis(config.callback.timeout_ms);
        let in_memory = config.queue.backend == QueueBackend::Embedded;
        let worker = Arc::new(worker);
        let deliverer = Arc::new(deliverer);
        let draining = drain_rx.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-workers".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let work = async {
                        let (stop_delivering, delivering_rx) = watch::channel(false);
                        let delivering = tokio::spawn(deliverer.clone().run(delivering_rx));
                        worker.clone().run(drain_rx).await;
                        let _ = stop_delivering.send(true);
                        let _ = delivering.await;
                        deliverer.clone().flush(flush_deadline).await;
                        if in_memory {
                            report_lost(&worker, &deliverer).await;
                        }
                    };
                    tokio::select! {
                        () = work => {}
                        // A fast stop: unfinished jobs stay unacked for others.
                        _ = abandon_rx.wait_for(|now| *now) => {}
                        () = another_stop_signal(draining) => {
                            tracing::warn!("second stop signal: the jobs in hand are left to the queue");
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::ZERO);
            })
            .map_err(|e| Error::Internal(format!("spawn workers: {e}")))?;
        Ok(Workers {
            drain,
            abandon,
            thread,
        })
    }

    fn handle(&self) -> WorkersHandle {
        WorkersHandle {
            drain: self.drain.clone(),
            abandon: self.abandon.clone(),
        }
    }

    fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("worker thread panicked");
        }
    }
}

/// Returns at a SIGTERM, SIGINT or SIGQUIT that comes once `draining` is
/// set: a graceful stop waits for the jobs in hand, and a second signal
/// (Ctrl-C again) means now. The workers' runtime listens, since it
/// outlives the front's, which ends after its grace period.
async fn another_stop_signal(mut draining: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    if draining.wait_for(|now| *now).await.is_err() {
        return std::future::pending().await;
    }
    // Made after the first signal was delivered, so they see only later ones.
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = quit.recv() => {}
    }
}

/// What the stop signal tells the workers.
#[derive(Clone)]
struct WorkersHandle {
    drain: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
}

/// Applies purges published by other processes (see `index::follow_purges`).
struct PurgeFollower {
    indexes: Vec<Arc<Index>>,
    handle: Arc<RedisHandle>,
    keys: RedisKeys,
    retry_after: Duration,
}

#[async_trait]
impl BackgroundService for PurgeFollower {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::index::follow_purges(
            self.indexes.clone(),
            self.handle.clone(),
            self.keys.clone(),
            self.retry_after,
            shutdown,
        )
        .await;
    }
}

/// Stops on SIGTERM (graceful), SIGQUIT (graceful, handing the listening
/// sockets to a `--upgrade` kiln first), SIGINT or the caller's signal
/// (fast), telling the workers first. SIGHUP is logged and ignored: config
/// changes need a restart, which `--upgrade` makes seamless.
struct StopSignal {
    external: Option<watch::Receiver<bool>>,
    workers: Option<WorkersHandle>,
}

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        let external = async {
            match self.external.clone() {
                Some(mut rx) => {
                    let _ = rx.wait_for(|stop| *stop).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(external);
        let signal = loop {
            tokio::select! {
                _ = term.recv() => break ShutdownSignal::GracefulTerminate,
                _ = quit.recv() => break ShutdownSignal::GracefulUpgrade,
                _ = int.recv() => break ShutdownSignal::FastShutdown,
                () = &mut external => break ShutdownSignal::FastShutdown,
                _ = hangup.recv() => tracing::warn!(
                    "SIGHUP ignored: config is read at start; restart with `kiln serve --upgrade` and SIGQUIT this process"
                ),
            }
        };
        if let Some(workers) = &self.workers {
            let _ = workers.drain.send(true);
            if matches!(signal, ShutdownSignal::FastShutdown) {
                let _ = workers.abandon.send(true);
            }
        }
        signal
    }
}

/// `config` as this role uses it: a worker-only process serves nothing, so
/// keeping its renders' bytes hot would hold up to `index.hot_bytes` of
/// memory that nothing reads.
fn settings_for_role(mut config: Config, role: Role) -> Config {
    if role == Role::Worker {
        config.index.hot_bytes = 0;
    }
    config
}

/// Runs until stopped. Validates everything before any port binds. With
/// `upgrade`, takes over the listening sockets of a running kiln (sent when
/// that one gets SIGQUIT) instead of binding them.
pub fn run(
    config: Config,
    role: Role,
    upgrade: bool,
    stop: Option<watch::Receiver<bool>>,
) -> Result<()> {
    config.validate()?;
    if role == Role::Front && config.queue.backend == QueueBackend::Embedded {
        return Err(Error::Config(
            "`kiln front` needs queue.backend = \"redis\": an embedded queue has no workers in another process".into(),
        ));
    }
    if role == Role::Worker && config.queue.backend == QueueBackend::Embedded {
        return Err(Error::Config(
            "`kiln worker` needs queue.backend = \"redis\": an embedded queue gets no jobs from another process".into(),
        ));
    }
    let config = Arc::new(settings_for_role(config, role));
    let filters = Arc::new(FilterSet::from_config(&config)?);
    for name in &config.sais.default_filters {
        filters.get(name).map_err(|_| {
            Error::Config(format!("sais.default_filters: no filter named {name:?}"))
        })?;
    }
    let storage = Storage::from_config(&config.storage)?;
    let policy = config.network_policy()?;
    // pingora binds inside a task whose panic only that task sees: a port
    // in use would leave kiln running without that listener.
    if role != Role::Worker && config.metrics.listen == config.server.listen {
        return Err(Error::Config(format!(
            "metrics.listen: {} is server.listen too; give it a port of its own",
            config.metrics.listen
        )));
    }
    if !upgrade {
        if role != Role::Worker {
            crate::reuseport::ensure_unused("server.listen", &config.server.listen)?;
        }
        if !config.metrics.listen.is_empty() {
            crate::reuseport::ensure_unused("metrics.listen", &config.metrics.listen)?;
        }
    }

    let front_backends = backends(&config, None)?;
    // Embedded parts must be shared in-process; Redis clients stay per runtime.
    let worker_backends = match config.queue.backend {
        QueueBackend::Embedded => Backends {
            queue: front_backends.queue.clone(),
            index: front_backends.index.clone(),
            outbox: front_backends.outbox.clone(),
            recent: front_backends.recent.clone(),
            redis: None,
        },
        QueueBackend::Redis => backends(&config, Some(&front_backends.index))?,
    };
    let front_storage = front_backends.locking_records(&storage, &config);
    let worker_storage = worker_backends.locking_records(&storage, &config);

    let mut conf = ServerConf {
        threads: config.server.threads,
        work_stealing: config.server.work_stealing,
        // The grace period keeps the front answering what it already
        // accepted; a worker-only process has nothing to serve.
        grace_period_seconds: Some(if role == Role::Worker {
            0
        } else {
            config.server.grace_period_secs
        }),
        graceful_shutdown_timeout_seconds: Some(config.server.graceful_shutdown_timeout_secs),
        upgrade_sock: config.server.upgrade_sock.clone(),
        // pingora retries the upgrade socket once a second.
        upgrade_sock_connect_accept_max_retries: Some(config.server.upgrade_wait_secs as usize),
        ..ServerConf::default()
    };
    conf.max_blocking_threads = Some(8);
    let options = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(options, conf);
    server.bootstrap();
    // One set of counters per process, shared by its front and workers.
    let metrics = Arc::new(Metrics::new());
    if !config.metrics.listen.is_empty() {
        let queue = match role {
            Role::Worker => worker_backends.queue.clone(),
            _ => front_backends.queue.clone(),
        };
        let mut service = Service::new(
            "kiln metrics".to_string(),
            MetricsEndpoint {
                metrics: metrics.clone(),
                queue,
            },
        );
        service.add_tcp(&config.metrics.listen);
        server.add_service(service);
    }

    // Purges from any process reach this one's in-memory indexes.
    if let Some(handle) = &front_backends.redis {
        let mut indexes = Vec::new();
        if role != Role::Worker {
            indexes.push(front_backends.index.clone());
        }
        if role != Role::Front {
            indexes.push(worker_backends.index.clone());
        }
        server.add_service(background_service(
            "purge follower",
            PurgeFollower {
                indexes,
                handle: handle.clone(),
                keys: RedisKeys::new(&config.redis.prefix),
                retry_after: Duration::from_millis(config.redis.breaker_cooldown_ms.max(100)),
            },
        ));
    }

    if role != Role::Worker {
        let admin_key = if config.auth.admin_key.is_empty() {
            let key = crate::security::new_api_key();
            tracing::warn!(admin_key = %key, "auth.admin_key is not set; generated one for this run (set KILN_AUTH__ADMIN_KEY to keep one)");
            key
        } else {
            config.auth.admin_key.clone()
        };
        let ctx = Arc::new(Context::new(
            config.clone(),
            filters.clone(),
            front_storage.clone(),
            front_backends.index,
            front_backends.queue,
            policy.clone(),
            admin_key,
        ));
        let ui = config.ui.enabled.then(|| {
            Arc::new(Ui::new(
                filters.clone(),
                front_storage,
                front_backends.recent.clone(),
                config.ui.throughput_window_secs,
            ))
        });
        let front = Front::new(ctx).observed(metrics.clone(), ui);
        let name = "kiln front";
        let listener = || {
            ListenerConfig::tcp(config.server.listen.clone())
                .l4_buffer(L4BufferSettings::default().write(config.server.write_buffer_bytes))
        };
        if config.server.reuseport {
            for shard in crate::reuseport::shards(
                name,
                &config.server.listen,
                config.server.threads,
                listener,
                front,
            ) {
                server.add_service(shard);
            }
        } else {
            let mut service = Service::new(name.to_string(), front);
            service.add_listener(listener());
            server.add_service(service);
        }
    }
    let workers = if role != Role::Front {
        let mut worker = Worker::new(
            &config,
            worker_backends.queue,
            worker_storage.clone(),
            worker_backends.index,
            filters,
            worker_backends.outbox.clone(),
        )?;
        worker.metrics = metrics.clone();
        worker.recent = Some(worker_backends.recent);
        let notifier = Notifier::new(&config.callback, policy, &config.fetch.user_agent)?;
        let mut deliverer = Deliverer::new(
            &config.callback,
            worker_backends.outbox,
            notifier,
            worker_storage,
        );
        deliverer.metrics = metrics;
        Some(Workers::start(worker, deliverer, &config)?)
    } else {
        None
    };
    tracing::info!(listen = %config.server.listen, ?role, backend = ?config.queue.backend, "kiln starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(StopSignal {
            external: stop,
            workers: workers.as_ref().map(Workers::handle),
        }),
    });
    // The front is down; workers finish within their own deadline.
    if let Some(workers) = workers {
        workers.join();
    }
    tracing::info!("kiln stopped");
    Ok(())
}

/// The `metrics.listen` listener: `/metrics` and `/healthz` only, so a
/// worker-only process, which has no front, can be scraped too.
struct MetricsEndpoint {
    metrics: Arc<Metrics>,
    queue: Arc<dyn Queue>,
}

#[async_trait]
impl pingora_core::apps::HttpServerApp for MetricsEndpoint {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: pingora_core::protocols::http::ServerSession,
        _shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::apps::ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        session.set_keepalive(None);
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (
                200,
                crate::front::METRICS_CONTENT_TYPE,
                crate::front::metrics_text(&self.metrics, &*self.queue).await,
            ),
            "/healthz" => (200, "application/json", r#"{"status":"ok"}"#.to_string()),
            _ => (404, "text/plain", "not found\n".to_string()),
        };
        let mut head = pingora_http::ResponseHeader::build(status, Some(3)).ok()?;
        head.insert_header(http::header::CONTENT_TYPE, content_type)
            .ok()?;
        head.insert_header(http::header::CONTENT_LENGTH, body.len())
            .ok()?;
        head.insert_header(http::header::CACHE_CONTROL, "no-store")
            .ok()?;
        session.write_response_header(Box::new(head)).await.ok()?;
        session
            .write_response_body(bytes::Bytes::from(body), true)
            .await
            .ok()?;
        let _ = session.finish().await;
        None
    }
}

/// kiln running on a thread of this process (tests, embedding).
pub struct Running {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// Starts kiln on a background thread; `Running::stop` ends it.
///
/// The front runs with work stealing whatever `server.work_stealing` says:
/// pingora's no-steal runtime files its thread handles process-wide by
/// thread id, and ids are reused, so after one such front stopped, a later
/// one in the same process could hand its connections to the dead threads.
/// `kiln serve|front` run one front per process and honour the setting.
pub fn spawn(mut config: Config, role: Role) -> Result<Running> {
    config.validate()?;
    config.server.work_stealing = true;
    let (stop, stop_rx) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("kiln".into())
        .spawn(move || run(config, role, false, Some(stop_rx)))
        .map_err(|e| Error::Internal(format!("spawn: {e}")))?;
    Ok(Running {
        stop,
        thread: Some(thread),
    })
}

impl Running {
    /// Stops quickly and waits for the server thread.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let _ = self.stop.send(true);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| Error::Internal("kiln thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_process_that_serves_keeps_renders_hot() {
        let config = Config::load_from(Default::default()).unwrap();
        for (role, keeps_hot) in [
            (Role::Serve, true),
            (Role::Front, true),
            (Role::Worker, false),
        ] {
            let config = settings_for_role(config.clone(), role);
            let index = Index::new(&config.index, None);
            assert_eq!(index.keeps_hot(1024), keeps_hot, "{role:?}");
        }
    }
}
