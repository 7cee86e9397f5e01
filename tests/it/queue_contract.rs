//! One contract for both queue backends: dedupe with attached callbacks,
//! urgent before pre-heat, reclaim after the visibility timeout, retries
//! after a backoff, dead letters.

use std::sync::Arc;
use std::time::Duration;

use kiln::config::{Config, Sources};
use kiln::queue::{Claimed, EmbeddedQueue, Finish, Job, Priority, Queue, RedisQueue};
use kiln::redis_conn::RedisHandle;

use crate::support::RedisServer;

struct Fixture {
    queue: Arc<dyn Queue>,
    _redis: Option<RedisServer>,
}

impl Fixture {
    /// The next job for `consumer`, if one comes within `wait`.
    async fn claim(&self, consumer: &str, wait: Duration) -> Option<Claimed> {
        self.queue.claim(consumer, wait).await.expect("claim")
    }

    /// Completes the job as a worker does: takes the callbacks the queue
    /// hands back until none is left unfiled, and returns them.
    async fn complete(&self, claimed: &Claimed) -> Vec<String> {
        let mut filed = Vec::new();
        loop {
            match self.queue.complete(claimed, filed.len()).await.unwrap() {
                Finish::Done => return filed,
                Finish::Unfiled(all) => filed = all,
            }
        }
    }
}

fn fixture(redis: bool, visibility_secs: u64) -> Fixture {
    fixture_with(redis, |c| c.queue.visibility_timeout_secs = visibility_secs)
}

fn fixture_with(redis: bool, tweak: impl FnOnce(&mut Config)) -> Fixture {
    let mut config = Config::load_from(Sources::default()).unwrap();
    tweak(&mut config);
    if !redis {
        return Fixture {
            queue: Arc::new(EmbeddedQueue::new(&config.queue)),
            _redis: None,
        };
    }
    let server = RedisServer::start();
    config.redis.url = server.url();
    let handle = Arc::new(RedisHandle::new(&config.redis).unwrap());
    Fixture {
        queue: Arc::new(RedisQueue::new(handle, &config.redis, &config.queue)),
        _redis: Some(server),
    }
}

fn job(original: &str, priority: Priority) -> Job {
    Job::new(
        priority,
        original,
        None,
        None,
        "r",
        "0123456789abcdef",
        vec!["small".to_string()],
    )
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name(false).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name(true).await
                }
            }
        )*
    };
}

both!(
    one_job_per_variant_and_every_callback_kept,
    urgent_is_drained_before_preheat,
    unacked_jobs_are_reclaimed_after_the_visibility_timeout,
    dead_letters_keep_the_reason_and_hand_back_callbacks,
    retried_jobs_wait_out_their_backoff_and_count_attempts,
    dead_letters_are_capped,
    no_ack_drops_a_callback_that_was_not_filed,
    a_held_job_is_not_taken_over,
);

async fn one_job_per_variant_and_every_callback_kept(redis: bool) {
    let f = fixture(redis, 30);
    // Each of 50 callers twice (a client retrying its batch): one webhook each.
    let added = futures::future::join_all((0..100).map(|n| {
        let queue = f.queue.clone();
        async move {
            let mut j = job("a/0/x.jpg", Priority::Urgent);
            j.id = format!("job-{n}");
            queue
                .enqueue(&j, Some(&format!("http://cb/{}", n % 50)))
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(added.iter().filter(|a| **a).count(), 1);
    let claimed = f
        .claim("c1", Duration::from_millis(500))
        .await
        .expect("a job");
    assert_eq!(claimed.attempt, 1);
    assert!(f.claim("c1", Duration::from_millis(200)).await.is_none());
    let mut callbacks = f.complete(&claimed).await;
    callbacks.sort();
    let mut expected: Vec<String> = (0..50).map(|n| format!("http://cb/{n}")).collect();
    expected.sort();
    assert_eq!(callbacks, expected);
    // Done: the next miss makes a new job.
    assert!(f
        .queue
        .enqueue(&job("a/0/x.jpg", Priority::Urgent), None)
        .await
        .unwrap());
}

async fn urgent_is_drained_before_preheat(redis: bool) {
    let f = fixture(redis, 30);
    f.queue
        .enqueue(&job("p/1.jpg", Priority::Preheat), None)
        .await
        .unwrap();
    f.queue
        .enqueue(&job("p/2.jpg", Priority::Preheat), None)
        .await
        .unwrap();
    f.queue
        .enqueue(&job("u/1.jpg", Priority::Urgent), None)
        .await
        .unwrap();
    let depths = f.queue.depths().await.unwrap();
    assert_eq!((depths.urgent, depths.preheat), (1, 2));
    let mut order = Vec::new();
    for _ in 0..3 {
        let claimed = f.claim("c", Duration::from_millis(500)).await.unwrap();
        order.push(claimed.job.original.clone());
        assert_eq!(f.queue.complete(&claimed, 0).await.unwrap(), Finish::Done);
    }
    assert_eq!(order, ["u/1.jpg", "p/1.jpg", "p/2.jpg"]);
}

async fn unacked_jobs_are_reclaimed_after_the_visibility_timeout(redis: bool) {
    let f = fixture(redis, 1);
    f.queue
        .enqueue(&job("r/1.jpg", Priority::Urgent), Some("http://cb/1"))
        .await
        .unwrap();
    let first = f
        .claim("crashed", Duration::from_millis(500))
        .await
        .unwrap();
    // The first consumer never acks; another takes the job over after the timeout.
    let second = f
        .claim("alive", Duration::from_secs(5))
        .await
        .expect("reclaimed");
    assert_eq!(second.job.id, first.job.id);
    assert_eq!(second.attempt, 2);
    assert_eq!(f.complete(&second).await, ["http://cb/1"]);
}

async fn dead_letters_keep_the_reason_and_hand_back_callbacks(redis: bool) {
    let f = fixture(redis, 30);
    f.queue
        .enqueue(&job("d/1.jpg", Priority::Preheat), Some("http://cb/d"))
        .await
        .unwrap();
    let claimed = f.claim("c", Duration::from_millis(500)).await.unwrap();
    let reason = "origin-status: 404";
    assert_eq!(
        f.queue.dead_letter(&claimed, reason, 0).await.unwrap(),
        Finish::Unfiled(vec!["http://cb/d".to_string()])
    );
    assert_eq!(
        f.queue.depths().await.unwrap().dead,
        0,
        "not before it is filed"
    );
    assert_eq!(
        f.queue.dead_letter(&claimed, reason, 1).await.unwrap(),
        Finish::Done
    );
    let depths = f.queue.depths().await.unwrap();
    assert_eq!((depths.preheat, depths.dead), (0, 1));
    assert!(f.claim("c", Duration::from_millis(200)).await.is_none());
}

async fn retried_jobs_wait_out_their_backoff_and_count_attempts(redis: bool) {
    let f = fixture(redis, 30);
    let original = job("b/1.jpg", Priority::Preheat);
    f.queue
        .enqueue(&original, Some("http://cb/b"))
        .await
        .unwrap();
    let first = f.claim("c", Duration::from_millis(500)).await.unwrap();
    assert_eq!(first.attempt, 1);

    // Due at once: back on the stream, the attempt counted.
    f.queue.retry_later(&first, Duration::ZERO).await.unwrap();
    let second = f.claim("c", Duration::from_secs(5)).await.expect("retried");
    assert_eq!(
        (second.job.id.as_str(), second.attempt),
        (original.id.as_str(), 2)
    );

    // Due in an hour: nobody can claim it meanwhile, it is counted as delayed,
    // and a new miss for the same variant attaches to it instead of enqueueing.
    f.queue
        .retry_later(&second, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(f.claim("c", Duration::from_millis(300)).await.is_none());
    let depths = f.queue.depths().await.unwrap();
    assert_eq!((depths.preheat, depths.delayed), (0, 1));
    let again = job("b/1.jpg", Priority::Urgent);
    assert!(!f
        .queue
        .enqueue(&again, Some("http://cb/late"))
        .await
        .unwrap());
}

async fn dead_letters_are_capped(redis: bool) {
    let f = fixture_with(redis, |c| c.queue.dead_letter_max = 2);
    for n in 0..3 {
        f.queue
            .enqueue(&job(&format!("x/{n}.jpg"), Priority::Preheat), None)
            .await
            .unwrap();
        let claimed = f.claim("c", Duration::from_millis(500)).await.unwrap();
        let finished = f.queue.dead_letter(&claimed, "decode-failed", 0).await;
        assert_eq!(finished.unwrap(), Finish::Done);
    }
    assert_eq!(f.queue.depths().await.unwrap().dead, 2);
}

/// A subscriber that attaches while the worker files the others' webhooks
/// keeps the job from being acked until it is filed too: nothing is dropped
/// between handing back the callbacks and the ack.
async fn no_ack_drops_a_callback_that_was_not_filed(redis: bool) {
    let f = fixture(redis, 30);
    let original = job("l/1.jpg", Priority::Urgent);
    let late = job("l/1.jpg", Priority::Urgent);
    assert!(f
        .queue
        .enqueue(&original, Some("http://cb/early"))
        .await
        .unwrap());
    let claimed = f.claim("c", Duration::from_millis(500)).await.unwrap();
    let early = vec!["http://cb/early".to_string()];
    assert_eq!(
        f.queue.complete(&claimed, 0).await.unwrap(),
        Finish::Unfiled(early.clone())
    );

    // Attaches after the worker read the first one, before it acks.
    assert!(!f
        .queue
        .enqueue(&late, Some("http://cb/late"))
        .await
        .unwrap());
    let both = vec!["http://cb/early".to_string(), "http://cb/late".to_string()];
    assert_eq!(
        f.queue.complete(&claimed, early.len()).await.unwrap(),
        Finish::Unfiled(both.clone())
    );
    // Not acked: still in flight, so a miss attaches instead of enqueueing.
    assert!(!f.queue.enqueue(&late, None).await.unwrap());

    assert_eq!(
        f.queue.complete(&claimed, both.len()).await.unwrap(),
        Finish::Done
    );
    assert!(
        f.queue.enqueue(&late, None).await.unwrap(),
        "done: a miss enqueues again"
    );
    let fresh = f.claim("c", Duration::from_millis(500)).await.unwrap();
    assert_eq!(
        f.complete(&fresh).await,
        Vec::<String>::new(),
        "the callbacks went with the job"
    );
}

/// A worker still on a job holds it: however long past the visibility
/// timeout, nobody takes it over. Once it stops holding, another does, and
/// the first learns the job is no longer its own.
async fn a_held_job_is_not_taken_over(redis: bool) {
    let f = fixture(redis, 1);
    f.queue
        .enqueue(&job("h/1.jpg", Priority::Urgent), None)
        .await
        .unwrap();
    let first = f.claim("busy", Duration::from_millis(500)).await.unwrap();
    for _ in 0..6 {
        assert!(f.queue.hold(&first, "busy").await.unwrap());
        assert!(
            f.claim("idle", Duration::from_millis(400)).await.is_none(),
            "held past the timeout, not taken over"
        );
    }
    let second = f
        .claim("idle", Duration::from_secs(5))
        .await
        .expect("taken over once no longer held");
    assert_eq!(
        (second.job.id.as_str(), second.attempt),
        (first.job.id.as_str(), 2)
    );
    assert!(
        !f.queue.hold(&first, "busy").await.unwrap(),
        "no longer the first's"
    );
    assert!(f.queue.hold(&second, "idle").await.unwrap());
}

/// A stream entry that holds no job (another version's, or written by hand)
/// is dead-lettered with its reason where a claim meets it, instead of
/// failing every claim and staying pending forever; the jobs behind it
/// are claimed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_is_not_a_job_is_dead_lettered() {
    let f = fixture(true, 30);
    let redis = f._redis.as_ref().expect("a Redis fixture");
    let config = Config::load_from(Sources::default()).unwrap();
    let stream = kiln::keys::RedisKeys::new(&config.redis.prefix).stream("urgent");
    redis.redis_cli(&["XADD", &stream, "*", "job", "not a job"]);
    f.queue
        .enqueue(&job("g/1.jpg", Priority::Urgent), None)
        .await
        .unwrap();
    let claimed = f.claim("c", Duration::from_secs(2)).await.expect("the job");
    assert_eq!(claimed.job.original, "g/1.jpg");
    assert_eq!(f.queue.depths().await.unwrap().dead, 1);
    let dead_letters = kiln::keys::RedisKeys::new(&config.redis.prefix).dead_letter();
    let dead = redis.redis_cli(&["XRANGE", &dead_letters, "-", "+"]);
    assert!(dead.contains("not a job"), "{dead}");
    assert_eq!(f.queue.complete(&claimed, 0).await.unwrap(), Finish::Done);
    assert_eq!(
        redis.redis_int(&["XLEN", &stream]),
        0,
        "nothing left behind"
    );
}

/// A script that fails midway (here the dead-letter stream's key holds a
/// string) keeps what it wrote before: the job is never acked before its
/// copy is kept, so it stays pending and is dead-lettered once it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_leaves_the_job_pending() {
    let f = fixture(true, 30);
    let redis = f._redis.as_ref().expect("a Redis fixture");
    let config = Config::load_from(Sources::default()).unwrap();
    let keys = kiln::keys::RedisKeys::new(&config.redis.prefix);
    let (stream, dead) = (keys.stream("preheat"), keys.dead_letter());
    f.queue
        .enqueue(&job("w/1.jpg", Priority::Preheat), None)
        .await
        .unwrap();
    let claimed = f.claim("c", Duration::from_millis(500)).await.unwrap();
    redis.redis_cli(&["SET", &dead, "not a stream"]);
    assert!(f
        .queue
        .dead_letter(&claimed, "decode-failed", 0)
        .await
        .is_err());
    let pending = redis.redis_cli(&["XPENDING", &stream, &config.redis.group, "-", "+", "10"]);
    assert!(
        pending.contains(&claimed.receipt),
        "still pending: {pending}"
    );
    redis.redis_cli(&["DEL", &dead]);
    let finished = f.queue.dead_letter(&claimed, "decode-failed", 0).await;
    assert_eq!(finished.unwrap(), Finish::Done);
    assert_eq!(f.queue.depths().await.unwrap().dead, 1);
}
