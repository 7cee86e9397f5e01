//! The pingora HTTP front: routing, hits (ETag/304/HEAD) from hot memory,
//! the index or storage, misses answered 202 at once with a job enqueued,
//! `/metrics` and `/ui`, request accounting (counters, access log), and the
//! one place that turns an `Error` into a response. It never decodes,
//! resizes, downloads or calls back.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    LAST_MODIFIED, LOCATION, RETRY_AFTER, VARY, WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;

use crate::api::Context;
use crate::config::MissBody;
use crate::core_yield::CoreYield;
use crate::error::{Error, Result};
use crate::filter::OutputFormat;
use crate::index::{Failure, HotVariant, Located, VariantInfo};
use crate::keys;
use crate::metrics::{HitSource, Metrics, Route};
use crate::security::normalize_path;
use crate::storage::Sendable;
use crate::ui::Ui;

mod one_write;
use one_write::Body;

/// An answer before it is written: its head is built as it goes, so
/// writing it converts nothing.
pub struct Reply {
    head: http::response::Parts,
    body: Body,
    /// A header value that could not be encoded: the connection is dropped
    /// rather than answered without it.
    broken: bool,
    /// Where a variant hit came from, for metrics and the access log.
    hit: Option<HitSource>,
}

impl Reply {
    /// An answer with this body; `Content-Length` is its length (also for HEAD).
    fn new(status: u16, content_type: &str, body: Bytes) -> Reply {
        let length = HeaderValue::from(body.len());
        Reply::with_length(status, body, length).header(CONTENT_TYPE, content_type)
    }

    fn with_length(status: u16, body: impl Into<Body>, length: HeaderValue) -> Reply {
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Room for ours plus the Date and Connection added when it is written.
        head.headers.reserve(8);
        head.headers.insert(CONTENT_LENGTH, length);
        Reply {
            head,
            body: body.into(),
            broken: false,
            hit: None,
        }
    }

    fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_vec(value).unwrap_or_default();
        Reply::new(status, "application/json", Bytes::from(body))
            .header(CACHE_CONTROL, NO_STORE)
            // Errors quote the request's path: never let a browser run it as HTML.
            .header(X_CONTENT_TYPE_OPTIONS, NOSNIFF)
    }

    fn error(e: &Error) -> Reply {
        let reply = Reply::json(e.status(), &e.to_json());
        match e {
            Error::MethodNotAllowed { allow, .. } => reply.header(ALLOW, *allow),
            // RFC 9110 §11.6.1: a 401 names how to authenticate.
            Error::Unauthorized(_) => reply.header(WWW_AUTHENTICATE, BEARER),
            _ => reply,
        }
    }

    fn header<V>(mut self, name: HeaderName, value: V) -> Reply
    where
        V: TryInto<HeaderValue>,
    {
        match value.try_into() {
            Ok(value) => {
                self.head.headers.insert(name, value);
            }
            Err(_) => {
                tracing::warn!(header = %name, "header value cannot be encoded");
                self.broken = true;
            }
        }
        self
    }

    #[cfg(test)]
    fn header_text(&self, name: HeaderName) -> Option<&str> {
        self.head.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The methods a route takes, and how a 405's `Allow` header lists them.
struct Allowed {
    methods: &'static [Method],
    header: &'static str,
}

const READ: Allowed = Allowed {
    methods: &[Method::GET, Method::HEAD],
    header: "GET, HEAD",
};
/// Variants and media records, which `DELETE` purges.
const READ_OR_PURGE: Allowed = Allowed {
    methods: &[Method::GET, Method::HEAD, Method::DELETE],
    header: "GET, HEAD, DELETE",
};
const POST: Allowed = Allowed {
    methods: &[Method::POST],
    header: "POST",
};
const READ_OR_POST: Allowed = Allowed {
    methods: &[Method::GET, Method::HEAD, Method::POST],
    header: "GET, HEAD, POST",
};
/// `/request/<filter>`: HEAD would pre-heat as GET does, so it is not taken.
const PREHEAT: Allowed = Allowed {
    methods: &[Method::GET, Method::POST],
    header: "GET, POST",
};

/// `MethodNotAllowed` unless `method` is one of `allowed`.
fn allow(method: &Method, allowed: &Allowed) -> Result<()> {
    if allowed.methods.contains(method) {
        Ok(())
    } else {
        Err(Error::MethodNotAllowed {
            method: method.to_string(),
            allow: allowed.header,
        })
    }
}

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const BEARER: HeaderValue = HeaderValue::from_static("Bearer");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");
const ACCEPT_VALUE: HeaderValue = HeaderValue::from_static("Accept");

/// Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics text with the queue's streams read now; a queue that does
/// not answer leaves them out (`kiln_queue_up 0`) rather than failing the scrape.
pub async fn metrics_text(metrics: &Metrics, queue: &dyn crate::queue::Queue) -> String {
    let streams = match queue.streams().await {
        Ok(streams) => Some(streams),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: queue streams unreadable");
            None
        }
    };
    metrics.render_text(streams.as_deref())
}

/// Cloned once per listening thread (`reuseport`); clones share the context,
/// the preview cache and the counters.
#[derive(Clone)]
pub struct Front {
    ctx: Arc<Context>,
    placeholder: Bytes,
    /// Rendered preview placeholders by variant path.
    previews: moka::future::Cache<String, Bytes>,
    /// `Cache-Control` of a stored variant, formatted once.
    hit_cache_control: HeaderValue,
    /// `Retry-After` of a 202, formatted once.
    retry_after: HeaderValue,
    /// This process's counters; `/metrics` shows them.
    metrics: Arc<Metrics>,
    /// One log line per request (`log.access_log`).
    access_log: bool,
    /// Gives the thread's core up every `server.yield_every_responses` answers.
    core_yield: CoreYield,
    /// The `/ui` status page, when this process serves one.
    ui: Option<Arc<Ui>>,
}

impl Front {
    pub fn new(ctx: Arc<Context>) -> Front {
        let server = &ctx.config.server;
        let hit_cache_control = HeaderValue::from_str(&format!(
            "public, max-age={}, immutable",
            server.cache_max_age_secs
        ))
        .expect("digits and ASCII are a valid header value");
        let retry_after = HeaderValue::from(server.retry_after_secs);
        let previews = moka::future::Cache::builder()
            .max_capacity(server.placeholder_cache_bytes)
            .weigher(|key: &String, png: &Bytes| {
                (key.len() + png.len()).try_into().unwrap_or(u32::MAX)
            })
            .build();
        let access_log = ctx.config.log.access_log;
        let core_yield = CoreYield::new(server.yield_every_responses);
        Front {
            previews,
            ctx,
            placeholder: transparent_pixel_png(),
            hit_cache_control,
            retry_after,
            metrics: Arc::new(Metrics::new()),
            access_log,
            core_yield,
            ui: None,
        }
    }

    /// Counts into `metrics` (shared with this process's workers) and
    /// serves `ui` at `/ui`.
    pub fn observed(mut self, metrics: Arc<Metrics>, ui: Option<Arc<Ui>>) -> Front {
        self.metrics = metrics;
        self.ui = ui;
        self
    }

    /// Routes one request to its answer.
    pub async fn answer(&self, request: &Request<'_>) -> Reply {
        let result = self.route(request).await;
        result.unwrap_or_else(|e| {
            if e.status() >= 500 {
                tracing::warn!(code = e.code(), error = %e, "request failed");
            }
            Reply::error(&e)
        })
    }

    async fn route(&self, request: &Request<'_>) -> Result<Reply> {
        let method = &request.method;
        let path = request.path;
        let allow = |allowed: &Allowed| allow(method, allowed);
        let conditions = &request.conditions;
        if request.method != Method::DELETE {
            if let Some(rest) = path.strip_prefix("/media/cache/resolve/") {
                allow(&READ)?;
                return self.cache(rest, None, conditions, true).await;
            }
            if let Some(rest) = path.strip_prefix("/media/cache/") {
                allow(&READ_OR_PURGE)?;
                // The URL path is the variant's storage path when nothing in it
                // needs decoding: `media/cache/<filter>/<path>`.
                return self.cache(rest, Some(&path[1..]), conditions, false).await;
            }
        }
        // Boxed: the hits' future stays small (see `cache_variant`).
        Box::pin(self.route_other(request)).await
    }

    /// Every route but the variants'.
    async fn route_other(&self, request: &Request<'_>) -> Result<Reply> {
        let method = &request.method;
        let path = request.path;
        let allow = |allowed: &Allowed| allow(method, allowed);
        match path {
            "/healthz" => {
                allow(&READ)?;
                return Ok(Reply::json(200, &serde_json::json!({"status": "ok"})));
            }
            "/readyz" => {
                allow(&READ)?;
                return self.ready().await;
            }
            "/status" => {
                allow(&READ)?;
                return Ok(Reply::json(200, &self.ctx.status().await?));
            }
            "/metrics" => {
                allow(&READ)?;
                let text = metrics_text(&self.metrics, &*self.ctx.queue).await;
                return Ok(Reply::new(200, METRICS_CONTENT_TYPE, Bytes::from(text))
                    .header(CACHE_CONTROL, NO_STORE));
            }
            "/ui" => {
                allow(&READ)?;
                let Some(ui) = &self.ui else {
                    return Err(Error::NoRoute(path.into()));
                };
                let page = ui.page(&*self.ctx.queue).await;
                return Ok(
                    Reply::new(200, "text/html; charset=utf-8", Bytes::from(page))
                        .header(CACHE_CONTROL, NO_STORE),
                );
            }
            "/account_setup" | "/account_setup.json" => {
                allow(&POST)?;
                let setup = request.json()?;
                let caller = self.ctx.caller(request.key()).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.account_setup(&caller, setup).await?,
                ));
            }
            "/dispatch_process" | "/dispatch_process.json" => {
                allow(&POST)?;
                let payload: crate::api::sais::ProcessPayload = request.json()?;
                let key = request.key().or(payload.api_key.as_deref());
                let caller = self.ctx.caller(key).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.dispatch(&caller, payload).await?,
                ));
            }
            "/fetch/media/by-ids" => {
                allow(&READ_OR_POST)?;
                let ids = request.ids()?;
                let caller = self.ctx.caller(request.key()).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.media_by_ids(&caller, &ids).await?,
                ));
            }
            "/tools" | "/mcp" => {
                allow(&POST)?;
                request.require_json()?;
                return Ok(
                    match crate::api::tools::handle(&self.ctx, request.key(), &request.body).await {
                        Some(answer) => Reply::json(200, &answer),
                        None => Reply::new(202, "application/json", Bytes::new())
                            .header(CACHE_CONTROL, NO_STORE),
                    },
                );
            }
            _ => {}
        }
        if request.method == Method::DELETE {
            return self.purge(request).await;
        }
        if let Some(code) = path.strip_prefix("/media/") {
            allow(&READ_OR_PURGE)?;
            let caller = self.ctx.caller(request.key()).await?;
            let code = code.trim_end_matches('/');
            Ok(Reply::json(200, &self.ctx.media(&caller, code).await?))
        } else if let Some(filter) = path.strip_prefix("/request/") {
            allow(&PREHEAT)?;
            self.request(filter, request).await
        } else {
            Err(Error::NoRoute(path.chars().take(200).collect()))
        }
    }

    /// `DELETE /media/<code>`, `/media/cache/<filter|*>/<path>` or
    /// `/media/cache/<filter>`; `?original=1` removes the original too.
    async fn purge(&self, request: &Request<'_>) -> Result<Reply> {
        let with_original = request
            .query_pairs()
            .any(|(k, v)| k == "original" && matches!(v.as_ref(), "1" | "true" | "yes"));
        let caller = self.ctx.caller(request.key()).await?;
        let path = request.path;
        let purged = if let Some(rest) = path.strip_prefix("/media/cache/") {
            match rest.trim_end_matches('/').split_once('/') {
                Some((filter, original)) => {
                    let filter = (filter != "*").then_some(filter);
                    self.ctx
                        .purge_path(&caller, filter, original, with_original)
                        .await?
                }
                None => {
                    self.ctx
                        .purge_filter(&caller, rest.trim_end_matches('/'))
                        .await?
                }
            }
        } else if let Some(code) = path.strip_prefix("/media/") {
            self.ctx
                .purge_media(&caller, code.trim_end_matches('/'), with_original)
                .await?
        } else {
            let route = if path.starts_with("/request/") {
                PREHEAT
            } else {
                READ
            };
            return Err(Error::MethodNotAllowed {
                method: Method::DELETE.to_string(),
                allow: route.header,
            });
        };
        Ok(Reply::json(200, &purged))
    }

    async fn ready(&self) -> Result<Reply> {
        self.ctx.storage.ping().await?;
        self.ctx.queue.ping().await?;
        Ok(Reply::json(200, &serde_json::json!({"status": "ready"})))
    }

    async fn request(&self, filter: &str, request: &Request<'_>) -> Result<Reply> {
        let mut url = None;
        let mut callback = None;
        let mut root = None;
        for (key, value) in request.query_pairs() {
            let value = Some(value.into_owned()).filter(|v| !v.is_empty());
            match key.as_ref() {
                "url" => url = value,
                "callback" | "callbackUrl" => callback = value,
                "root" => root = value,
                _ => {}
            }
        }
        let caller = self.ctx.caller(request.key()).await?;
        let answer = self
            .ctx
            .preheat(
                &caller,
                filter,
                url.as_deref(),
                callback.as_deref(),
                root.as_deref(),
            )
            .await?;
        let status = match (answer.status, answer.failure_status) {
            ("done", _) => 200,
            (_, Some(failed)) => failed,
            _ => 202,
        };
        Ok(Reply::json(status, &answer))
    }

    /// `<filter>/<path>`: a hit, or a 202 with one job enqueued. `as_stored`
    /// is the request path without its leading slash, when the variant's
    /// storage path may be spelled like it.
    async fn cache(
        &self,
        rest: &str,
        as_stored: Option<&str>,
        conditions: &Conditions<'_>,
        resolve: bool,
    ) -> Result<Reply> {
        let (filter, raw_path) = rest
            .split_once('/')
            .ok_or_else(|| Error::InvalidPath("expected <filter>/<path>".into()))?;
        let preset = self.ctx.filters.get(filter)?;
        if preset.format != OutputFormat::Auto {
            return self
                .cache_variant(filter, raw_path, as_stored, conditions, resolve)
                .await;
        }
        // The variant of the format Accept picks; every answer says it varies.
        let negotiated =
            negotiated_extension(conditions.accept, self.ctx.filters.avif_allowed(&preset));
        let qualified;
        let (filter, as_stored) = match negotiated {
            Some(extension) => {
                qualified = crate::filter::negotiated_segment(filter, extension);
                (qualified.as_str(), None)
            }
            None => (filter, as_stored),
        };
        let reply = self
            .cache_variant(filter, raw_path, as_stored, conditions, resolve)
            .await?;
        Ok(reply.header(VARY, ACCEPT_VALUE))
    }

    /// `cache` for one stored variant: `filter` is the variant's filter
    /// segment (`small`, or `small.webp` when negotiated).
    async fn cache_variant(
        &self,
        filter: &str,
        raw_path: &str,
        as_stored: Option<&str>,
        conditions: &Conditions<'_>,
        resolve: bool,
    ) -> Result<Reply> {
        let path = normalize_path(raw_path, self.ctx.config.server.max_path_bytes)?;
        keys::validate_original_path(&path)?;
        let variant = match (&path, as_stored) {
            // Nothing was decoded: the URL path spells the storage path.
            (Cow::Borrowed(_), Some(stored)) => Cow::Borrowed(stored),
            _ => Cow::Owned(keys::variant_path(filter, &path)),
        };
        debug_assert_eq!(variant, keys::variant_path(filter, &path));
        let variant = variant.as_ref();
        let index = &self.ctx.index;

        // Hot bytes carry their index entry: one look-up answers. A missing
        // variant's look-up also answers whether its last job failed.
        let mut looked_up_failure = None;
        let found = match index.hot_get(variant).await {
            Some(hot) => Some((hot.info.clone(), Found::Hot(hot))),
            // Asked again just after this front queued it: answered from
            // memory, with no look-up in Redis (a storm of misses would
            // otherwise ask once per request). A render or failure recorded
            // by this process clears the mark at once; one recorded by
            // another is seen when it expires (index.negative_ttl_secs).
            None if index.is_recently_queued(variant) => {
                self.metrics.miss();
                return Ok(Box::pin(self.busy(filter, &path, variant)).await);
            }
            None => match index.locate(&self.ctx.storage, variant).await? {
                Located::Stored(info, _source, bytes) => {
                    Some((info, bytes.map_or(Found::Entry, Found::Bytes)))
                }
                Located::Missing(failure) => {
                    looked_up_failure = Some(failure);
                    None
                }
            },
        };
        if let Some((info, found)) = found {
            if resolve {
                let location = keys::variant_url(&self.ctx.public_base, filter, &path);
                return Ok(Reply::new(302, "text/plain", Bytes::new())
                    .header(LOCATION, location)
                    .header(CACHE_CONTROL, NO_STORE));
            }
            let (body, source) = match found {
                Found::Hot(hot) => return Ok(self.hot_hit(&hot, conditions)),
                Found::Bytes(bytes) => (Some(Body::Memory(bytes)), HitSource::Storage),
                Found::Entry => (self.variant_body(variant, &info).await?, HitSource::Index),
            };
            if let Some(body) = body {
                let mut reply = self.hit(&info, body, conditions);
                reply.hit = Some(source);
                return Ok(reply);
            }
            // The index outlived the bytes (deleted behind kiln's back): a
            // miss, and every process forgets the entry, so the job renders
            // it again instead of trusting the index.
            Box::pin(self.forget_vanished(variant)).await;
        }
        self.metrics.miss();
        // Boxed, as every path rarely taken here is: a hit's future stays
        // small, and each request moves it (memcpy) as it is started.
        Box::pin(self.miss(filter, path.into_owned(), variant, looked_up_failure)).await
    }

    /// Forgets an index entry whose bytes storage no longer has.
    async fn forget_vanished(&self, variant: &str) {
        tracing::warn!(
            variant,
            "indexed variant missing from storage; rendering it again"
        );
        if let Err(e) = self.ctx.index.forget(variant).await {
            tracing::warn!(variant, error = %e, "could not forget a vanished variant");
        }
    }

    /// A miss's answer: its failure, or 202 with one job queued.
    async fn miss(
        &self,
        filter: &str,
        path: String,
        variant: &str,
        looked_up_failure: Option<Option<Arc<Failure>>>,
    ) -> Result<Reply> {
        let index = &self.ctx.index;
        let failure = match looked_up_failure {
            Some(failure) => failure,
            // An index entry whose bytes are gone: not looked up yet.
            None => index.failure(variant).await,
        };
        if let Some(failure) = failure {
            return Ok(self.failed(&failure));
        }
        // Concurrent misses of one variant share one look at its original
        // (an S3 request on S3) and one enqueue.
        index
            .queue_once(variant, self.queue_miss_job(filter, path.clone(), variant))
            .await?;
        Ok(self.busy(filter, &path, variant).await)
    }

    /// Enqueues a miss's job: of a stored original, or of one a pre-heat is
    /// still downloading; `SourceNotFound` (remembered briefly, the
    /// variant's absence too) for neither.
    async fn queue_miss_job(&self, filter: &str, path: String, variant: &str) -> Result<()> {
        let index = &self.ctx.index;
        let original_absent = format!("original:{path}");
        if index.is_known_absent(&original_absent).await {
            index.mark_unrendered(variant).await;
            return Err(Error::SourceNotFound(path));
        }
        let source_url = if self.ctx.storage.head(&path).await?.is_some() {
            None
        } else {
            match self.ctx.pending_source(&path).await? {
                Some(url) => Some(url),
                None => {
                    index.remember_absent(&original_absent).await;
                    index.mark_unrendered(variant).await;
                    return Err(Error::SourceNotFound(path));
                }
            }
        };
        if self.ctx.enqueue_miss(filter, &path, source_url).await? {
            self.metrics.enqueued();
        }
        Ok(())
    }

    /// The body of a variant the index knows, from storage: read and kept
    /// hot when it fits the hot cache, else (local storage, page cache
    /// holding it) its file, for the kernel to send without a copy.
    async fn variant_body(&self, variant: &str, info: &Arc<VariantInfo>) -> Result<Option<Body>> {
        let storage = &self.ctx.storage;
        let index = &self.ctx.index;
        if !index.keeps_hot(info.size) {
            return Ok(storage
                .get_for_sending(variant)
                .await?
                .map(|sendable| match sendable {
                    Sendable::Bytes(object) => Body::Memory(object.bytes),
                    Sendable::File(file) => Body::File(file),
                }));
        }
        let Some(object) = Box::pin(storage.get_keeping_open(variant)).await? else {
            return Ok(None);
        };
        index
            .hot_put_known(variant, info.clone(), object.bytes.clone())
            .await;
        Ok(Some(Body::Memory(object.bytes)))
    }

    /// A hit from memory.
    fn hot_hit(&self, hot: &HotVariant, conditions: &Conditions<'_>) -> Reply {
        let mut reply = self.hit(&hot.info, Body::Memory(hot.bytes.clone()), conditions);
        reply.hit = Some(HitSource::Memory);
        reply
    }

    /// A hit, with the header values its index entry keeps formatted.
    fn hit(&self, info: &VariantInfo, body: Body, conditions: &Conditions<'_>) -> Reply {
        let Some(headers) = info.hit_headers() else {
            // A field that cannot be a header value: formatted here, and refused.
            let last_modified = info.http_last_modified();
            let length = HeaderValue::from(body.len());
            return self.hit_reply(
                conditions,
                info,
                body,
                length,
                [
                    info.content_type.as_str(),
                    info.etag.as_str(),
                    last_modified.as_str(),
                ],
            );
        };
        // The body read may differ from the entry (its file replaced since).
        let length = if body.len() == info.size {
            headers.content_length.clone()
        } else {
            HeaderValue::from(body.len())
        };
        self.hit_reply(
            conditions,
            info,
            body,
            length,
            [
                headers.content_type.clone(),
                headers.etag.clone(),
                headers.last_modified.clone(),
            ],
        )
    }

    /// A hit's answer, `[content type, etag, last modified]` on each: 304
    /// when the client's copy is current (`Conditions::not_modified`), 206
    /// or 416 for a `Range` (unless `If-Range` names other bytes), else 200
    /// with the bytes.
    fn hit_reply<V: TryInto<HeaderValue>>(
        &self,
        conditions: &Conditions<'_>,
        info: &VariantInfo,
        body: Body,
        length: HeaderValue,
        [content_type, etag, last_modified]: [V; 3],
    ) -> Reply {
        let not_modified = conditions.not_modified(info);
        let range = match conditions.range {
            Some(range) if !not_modified && conditions.range_applies(info) => {
                byte_range(range, body.len() as usize)
            }
            _ => ByteRange::Whole,
        };
        let reply = if not_modified {
            // A 304's Content-Length, if any, must be the 200's (RFC 9110
            // §8.6): a cache that takes it over must not store a 0.
            Reply::with_length(304, Bytes::new(), length)
        } else {
            match range {
                ByteRange::Whole => Reply::with_length(200, body, length),
                ByteRange::Part(part) => {
                    let content_range =
                        format!("bytes {}-{}/{}", part.start, part.end - 1, body.len());
                    let part = body.slice(part.start as u64..part.end as u64);
                    let length = HeaderValue::from(part.len());
                    Reply::with_length(206, part, length).header(CONTENT_RANGE, content_range)
                }
                ByteRange::Unsatisfiable => {
                    Reply::with_length(416, Bytes::new(), HeaderValue::from_static("0"))
                        .header(CONTENT_RANGE, format!("bytes */{}", body.len()))
                }
            }
        };
        // A 416 is about one request's Range: no cache keeps it for the URL.
        let cache_control = match reply.head.status {
            StatusCode::RANGE_NOT_SATISFIABLE => NO_STORE,
            _ => self.hit_cache_control.clone(),
        };
        reply
            .header(CONTENT_TYPE, content_type)
            .header(ETAG, etag)
            .header(CACHE_CONTROL, cache_control)
            .header(LAST_MODIFIED, last_modified)
            .header(ACCEPT_RANGES, BYTES)
    }

    /// A variant whose job failed for good: its error. A client error (bad
    /// original) is cacheable while kiln remembers it, so a CDN does not ask
    /// again meanwhile; a server-side one (origin down) is not.
    fn failed(&self, failure: &Failure) -> Reply {
        let body = serde_json::json!({"error": failure.code, "message": failure.message});
        let cache_control = if failure.status < 500 {
            format!("public, max-age={}", self.ctx.config.index.failure_ttl_secs)
        } else {
            "no-store".to_string()
        };
        Reply::new(
            failure.status,
            "application/json",
            Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        )
        .header(CACHE_CONTROL, cache_control)
    }

    /// A miss's answer: 202 with what `server.miss_body` says, never cached.
    async fn busy(&self, filter: &str, path: &str, variant: &str) -> Reply {
        let server = &self.ctx.config.server;
        let reply = match server.miss_body {
            MissBody::None => Reply::with_length(202, Bytes::new(), HeaderValue::from_static("0")),
            MissBody::Redirect => Reply::new(302, "text/plain", Bytes::new())
                .header(LOCATION, server.placeholder_redirect_url.as_str()),
            MissBody::Pixel => Reply::new(202, "image/png", self.placeholder.clone()),
            MissBody::Preview => {
                let body = match self.preview(filter, path, variant).await {
                    Some(png) => png,
                    None => self.placeholder.clone(),
                };
                Reply::new(202, "image/png", body)
            }
        };
        reply
            .header(CACHE_CONTROL, NO_STORE)
            .header(RETRY_AFTER, self.retry_after.clone())
    }

    /// The variant's preview from its original's media record (BlurHash and
    /// size), when there is one; rendered once per variant and kept.
    async fn preview(&self, filter: &str, path: &str, variant: &str) -> Option<Bytes> {
        if let Some(png) = self.previews.get(variant).await {
            return Some(png);
        }
        let code = keys::code_from_path(path)?;
        let unknown = format!("preview:{code}");
        let index = &self.ctx.index;
        if index.is_known_absent(&unknown).await {
            return None;
        }
        let Some(record) = self.ctx.storage.media_record(code).await.ok().flatten() else {
            index.remember_absent(&unknown).await;
            return None;
        };
        // No BlurHash yet: its render is under way, so ask again next time.
        let (blurhash, width, height) = (
            record.blurhash?,
            record.original_width?,
            record.original_height?,
        );
        let preset = self.ctx.filters.get(filter).ok()?;
        let max_side = self.ctx.config.server.placeholder_max_side;
        let png = crate::imaging::placeholder_png(&blurhash, (width, height), &preset, max_side)
            .map_err(|e| tracing::debug!(error = %e, code, "no preview placeholder"))
            .ok()?;
        let png = Bytes::from(png);
        self.previews.insert(variant.to_string(), png.clone()).await;
        Some(png)
    }
}

/// What the index had of a variant it knows.
enum Found {
    /// Bytes and header values in memory.
    Hot(Arc<HotVariant>),
    /// Bytes just read from storage.
    Bytes(Bytes),
    /// Only the entry: the bytes are in storage.
    Entry,
}

/// `If-None-Match` against a strong ETag (weak comparison, as RFC 9110 asks for GET).
fn etag_matches(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

/// The format an `auto` filter answers with, from `Accept`: AVIF when
/// allowed and accepted, else WebP when accepted, else none (the source
/// format). Only these three outcomes reach the variant key, so however
/// varied clients' `Accept` headers are, an original has at most three
/// stored variants per filter.
fn negotiated_extension(accept: Option<&str>, avif_allowed: bool) -> Option<&'static str> {
    let accept = accept?;
    let accepts = |mime: &str| {
        accept.split(',').any(|item| {
            let mut parts = item.split(';');
            let matches = parts
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case(mime));
            // `q=0` means "not this one".
            let refused = parts.any(|param| {
                param
                    .trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            matches && !refused
        })
    };
    if avif_allowed && accepts("image/avif") {
        Some("avif")
    } else if accepts("image/webp") {
        Some("webp")
    } else {
        None
    }
}

/// The request headers that make a hit conditional or partial.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    /// `If-None-Match`'s first line: one line is what clients send.
    pub if_none_match: Option<&'a str>,
    /// The headers, when `If-None-Match` has more lines, which together
    /// make one list (RFC 9110 §5.3).
    pub if_none_match_lines: Option<&'a http::HeaderMap>,
    /// `If-Modified-Since`, which counts only without `If-None-Match`.
    pub if_modified_since: Option<&'a str>,
    /// `Range`, for GET only.
    pub range: Option<&'a str>,
    pub if_range: Option<&'a str>,
    /// `Accept`, which picks the format of an `auto` filter.
    pub accept: Option<&'a str>,
}

impl Conditions<'_> {
    /// Whether the client's copy is current: its ETag is named, or without
    /// an `If-None-Match`, it is at least as recent as Last-Modified (RFC
    /// 9110 §13.1.3; a date that does not parse is ignored).
    fn not_modified(&self, info: &VariantInfo) -> bool {
        match (self.if_none_match, self.if_modified_since) {
            (Some(tags), _) => {
                etag_matches(tags, &info.etag)
                    || self.if_none_match_lines.is_some_and(|headers| {
                        headers
                            .get_all(http::header::IF_NONE_MATCH)
                            .iter()
                            .skip(1)
                            .filter_map(|line| line.to_str().ok())
                            .any(|tags| etag_matches(tags, &info.etag))
                    })
            }
            (None, Some(date)) => httpdate::parse_http_date(date.trim())
                .ok()
                .and_then(|since| since.duration_since(std::time::UNIX_EPOCH).ok())
                .is_some_and(|since| info.last_modified <= since.as_secs() as i64),
            (None, None) => false,
        }
    }

    /// `If-Range` lets a range through only for the same bytes: their
    /// strong ETag, or exactly their Last-Modified date.
    fn range_applies(&self, info: &VariantInfo) -> bool {
        match self.if_range.map(str::trim) {
            None => true,
            Some(tag) if tag.starts_with('"') => tag == info.etag,
            Some(tag) if tag.starts_with("W/") => false,
            Some(date) => date == info.http_last_modified(),
        }
    }
}

/// What a `Range` header asks of a body.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    /// No usable single range: the whole body (RFC 9110 lets a server
    /// ignore a malformed or multi-part `Range`).
    Whole,
    Part(std::ops::Range<usize>),
    Unsatisfiable,
}

/// Parses a single `bytes=` range (`a-b`, `a-`, `-n`) against a body of `len` bytes.
fn byte_range(header: &str, len: usize) -> ByteRange {
    let Some((unit, spec)) = header.trim().split_once('=') else {
        return ByteRange::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Whole;
    };
    let number = |text: &str| -> Option<usize> {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // A position past usize is past any body: saturate.
        Some(text.parse().unwrap_or(usize::MAX))
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // `-n`: the last n bytes.
        (true, _, Some(suffix)) => {
            if suffix == 0 || len == 0 {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part(len.saturating_sub(suffix)..len)
            }
        }
        (false, Some(start), None) if last.trim().is_empty() => {
            if start >= len {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part(start..len)
            }
        }
        (false, Some(start), Some(end)) if start <= end => {
            if start >= len {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part(start..end.min(len - 1) + 1)
            }
        }
        _ => ByteRange::Whole,
    }
}

/// The 202 body: a valid 1x1 transparent PNG that an `<img>` can show.
fn transparent_pixel_png() -> Bytes {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(image::RgbaImage::new(1, 1))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encoding a 1x1 PNG cannot fail");
    Bytes::from(out)
}

/// A request as the routes see it: head fields they use, borrowed from the
/// session, and the whole body.
pub struct Request<'a> {
    pub method: Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Headers that decide between 200, 206, 304 and 416 on a hit.
    pub conditions: Conditions<'a>,
    /// The `Authorization: Bearer` key, else `?token=`.
    pub bearer: Option<Cow<'a, str>>,
    pub content_type: Option<&'a str>,
    pub body: Bytes,
}

impl<'a> Request<'a> {
    /// The head fields of a request whose body was read.
    fn new(header: &'a pingora_http::RequestHeader, body: Bytes) -> Request<'a> {
        let header_text = |name: HeaderName| header.headers.get(name).and_then(|v| v.to_str().ok());
        let bearer = header_text(http::header::AUTHORIZATION).and_then(|value| {
            let (scheme, key) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| Cow::Borrowed(key.trim()))
        });
        // One look-up of If-None-Match on the hit path: its first line, and
        // whether more follow.
        let mut lines = header.headers.get_all(http::header::IF_NONE_MATCH).iter();
        let if_none_match = lines.next().and_then(|v| v.to_str().ok());
        let if_none_match_lines = lines.next().is_some().then_some(&header.headers);
        let mut request = Request {
            method: header.method.clone(),
            path: header.uri.path(),
            query: header.uri.query(),
            conditions: Conditions {
                if_none_match,
                if_none_match_lines,
                if_modified_since: header_text(http::header::IF_MODIFIED_SINCE),
                // A byte range is only served to GET; HEAD describes the whole.
                range: (header.method == Method::GET)
                    .then(|| header_text(http::header::RANGE))
                    .flatten(),
                if_range: header_text(http::header::IF_RANGE),
                accept: header_text(http::header::ACCEPT),
            },
            bearer,
            content_type: header_text(CONTENT_TYPE),
            body,
        };
        if request.bearer.is_none() && request.query.is_some() {
            request.bearer = request
                .query_pairs()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| Cow::Owned(v.into_owned()));
        }
        request
    }

    pub fn query_pairs(&self) -> url::form_urlencoded::Parse<'_> {
        url::form_urlencoded::parse(self.query.unwrap_or("").as_bytes())
    }

    /// The key from the head: `Authorization: Bearer`, else `?token=`.
    pub fn key(&self) -> Option<&str> {
        self.bearer.as_deref().filter(|k| !k.is_empty())
    }

    /// A JSON body, or none at all; a form or anything else is refused.
    pub fn require_json(&self) -> Result<()> {
        match self.content_type {
            Some(ct) if !ct.to_ascii_lowercase().contains("json") && !self.body.is_empty() => {
                Err(Error::UnsupportedContentType(ct.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// The body as `T`: malformed JSON is 400, JSON of the wrong shape 422.
    pub fn json<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T> {
        self.require_json()?;
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        let mut reader = serde_json::Deserializer::from_slice(&self.body);
        let read = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
            let field = e.path().to_string();
            shape_or_syntax_error(e.into_inner(), &field)
        })?;
        reader.end().map_err(|e| shape_or_syntax_error(e, "."))?;
        Ok(read)
    }

    /// Media ids from `?id=a,b` (also `ids=`) or a JSON body `{"ids": [...]}`.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .query_pairs()
            .filter(|(k, _)| k == "id" || k == "ids" || k == "ids[]")
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        if self.method == Method::POST {
            #[derive(serde::Deserialize, Default)]
            #[serde(default)]
            struct Ids {
                ids: Option<Vec<String>>,
            }
            let body: Ids = self.json()?;
            ids.extend(body.ids.unwrap_or_default());
        }
        Ok(ids)
    }
}

/// Malformed JSON is 400; JSON of the wrong shape is 422 with SAIS's
/// `Validation error: <field> - <message>`, `field` the path to the value
/// (`.` for the whole body).
fn shape_or_syntax_error(e: serde_json::Error, field: &str) -> Error {
    if e.classify() != serde_json::error::Category::Data {
        return Error::BadRequest(format!("malformed JSON: {e}"));
    }
    let field = if field == "." { "body" } else { field };
    // serde_json ends its message with where in the text it was.
    let message = e.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(message, _)| message);
    Error::InvalidPayload(format!("{field} - {message}"))
}

/// `Expect: 100-continue` on an HTTP/1.1 request.
fn is_expect_continue(header: &pingora_http::RequestHeader) -> bool {
    header.version == http::Version::HTTP_11
        && header
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

enum ReadFailure {
    /// Answer this instead of routing (e.g. a body over the limit).
    Reply(Reply),
    Connection,
}

impl Front {
    /// Reads the body, up to `server.max_body_bytes`.
    async fn read_body(
        &self,
        session: &mut ServerSession,
    ) -> std::result::Result<Bytes, ReadFailure> {
        let limit = self.ctx.config.server.max_body_bytes;
        let too_large = || {
            ReadFailure::Reply(Reply::error(&Error::TooLarge(format!(
                "request body over {limit} bytes"
            ))))
        };
        let announced = session
            .req_header()
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if announced.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        // Most requests (every GET) have none: nothing to read.
        if session.is_body_empty() {
            return Ok(Bytes::new());
        }
        // A client that waits for leave to send its body gets it (RFC 9110
        // §10.1.1) instead of waiting out its own timer; one over the
        // limit got its 413 above without sending it.
        if is_expect_continue(session.req_header()) {
            // The body follows the 100: it does not make the connection
            // one to close, as an answer before the body would.
            session.set_close_on_response_before_downstream_finish(false);
            let continued = session.write_continue_response().await;
            session.set_close_on_response_before_downstream_finish(true);
            continued.map_err(|_| ReadFailure::Connection)?;
        }
        let mut body = bytes::BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read request body");
                    return Err(ReadFailure::Connection);
                }
            }
        }
        Ok(body.freeze())
    }
}

#[async_trait]
impl HttpServerApp for Front {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "could not read request");
                // A head kiln cannot parse (bad framing, too large) is the
                // client's fault: say so before closing (RFC 9112 §6.3), or
                // a CDN counts it as the origin failing.
                if *e.etype() == pingora_core::ErrorType::InvalidHTTPHeader {
                    let reply = Reply::error(&Error::BadRequest(format!(
                        "unreadable request: {}",
                        e.context.as_ref().map_or(String::new(), |c| c.to_string())
                    )));
                    session.set_keepalive(None);
                    let _ =
                        send_through_pingora(session, ResponseHeader::from(reply.head), reply.body)
                            .await;
                }
                return None;
            }
        }
        // Kept open unless the client asked to close (or, on HTTP/1.0, did
        // not ask to keep it) or kiln is stopping.
        let keep = session.get_keepalive().is_some() && !*shutdown.borrow();
        session.set_keepalive(keep.then_some(60));
        // The clock is read only when the access log wants a duration.
        let started = self.access_log.then(std::time::Instant::now);
        let route = Route::of(session.req_header().uri.path());
        let head = session.req_header().method == Method::HEAD;
        let reply = match self.read_body(&mut session).await {
            Ok(body) => {
                let request = Request::new(session.req_header(), body);
                self.answer(&request).await
            }
            Err(ReadFailure::Reply(reply)) => {
                // The rest of an over-long body is not read: do not reuse the connection.
                session.set_keepalive(None);
                reply
            }
            Err(ReadFailure::Connection) => return None,
        };
        let status = reply.head.status.as_u16();
        self.metrics.request(route, status, reply.hit);
        if reply.broken {
            return None;
        }

        let with_body = !head && !reply.body.is_empty();
        let bytes = if with_body { reply.body.len() } else { 0 };
        let hit = reply.hit;
        let body = if with_body {
            reply.body
        } else {
            Body::Memory(Bytes::new())
        };
        let response = ResponseHeader::from(reply.head);
        // Taken now: sending gives the session up.
        let logged = started.map(|started| {
            let header = session.req_header();
            (
                started,
                header.method.clone(),
                header.uri.path().to_string(),
            )
        });
        let (written, reused) = if one_write::applies(&session) {
            let reused = one_write::send(session, response, body).await;
            (reused.is_some(), reused)
        } else {
            send_through_pingora(session, response, body).await
        };
        if let Some((started, method, path)) = logged {
            tracing::info!(
                target: "kiln::access",
                method = %method,
                path,
                route = route.as_str(),
                status,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                hit = hit.map(HitSource::as_str),
                bytes,
                written,
                "request"
            );
        }
        if !written {
            return None;
        }
        // After the answer went out: it leaves before the yield.
        self.core_yield.answered();
        reused
    }
}

/// Writes an answer the way pingora does (a closing connection, HTTP/2):
/// whether it was written, and the connection if it stays open.
async fn send_through_pingora(
    mut session: ServerSession,
    response: ResponseHeader,
    body: Body,
) -> (bool, Option<ReusedHttpStream>) {
    let Some(body) = body.into_bytes().await else {
        return (false, None);
    };
    let mut written = session
        .write_response_header(Box::new(response))
        .await
        .is_ok();
    if written && !body.is_empty() {
        written = session.write_response_body(body, true).await.is_ok();
    }
    if !written {
        return (false, None);
    }
    let persistent = HttpPersistentSettings::for_session(&session);
    let reused = match session.finish().await {
        Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent)),
        Err(_) => None,
    };
    (true, reused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_compare() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", W/\"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    #[test]
    fn byte_ranges_parse_as_rfc_9110_says() {
        use ByteRange::*;
        let cases: &[(&str, usize, ByteRange)] = &[
            ("bytes=0-99", 1000, Part(0..100)),
            ("bytes=990-2000", 1000, Part(990..1000)),
            ("bytes=500-", 1000, Part(500..1000)),
            ("bytes=-100", 1000, Part(900..1000)),
            ("bytes=-5000", 1000, Part(0..1000)),
            ("Bytes = 0-0", 1000, Part(0..1)),
            ("bytes=999-999", 1000, Part(999..1000)),
            ("bytes=1000-", 1000, Unsatisfiable),
            ("bytes=1000-1001", 1000, Unsatisfiable),
            ("bytes=99999999999999999999999-", 1000, Unsatisfiable),
            ("bytes=-0", 1000, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            // Ignored: the whole body.
            ("bytes=5-1", 1000, Whole),
            ("bytes=0-1,5-9", 1000, Whole),
            ("items=0-1", 1000, Whole),
            ("bytes=a-b", 1000, Whole),
            ("bytes=-", 1000, Whole),
            ("bytes=+1-2", 1000, Whole),
            ("0-1", 1000, Whole),
        ];
        for (header, len, want) in cases {
            assert_eq!(byte_range(header, *len), *want, "{header} of {len}");
        }
    }

    #[test]
    fn accept_picks_one_of_three_formats() {
        let cases = [
            (
                Some("image/avif,image/webp,image/apng,*/*;q=0.8"),
                true,
                Some("avif"),
            ),
            (Some("image/avif,image/webp,*/*"), false, Some("webp")),
            (Some("image/webp,*/*"), true, Some("webp")),
            (Some("IMAGE/WEBP"), true, Some("webp")),
            (Some("image/avif;q=0, image/webp;q=0.5"), true, Some("webp")),
            (Some("image/webp;q=0.0"), true, None),
            (Some("image/png,image/*;q=0.8,*/*;q=0.5"), true, None),
            (Some("*/*"), true, None),
            (None, true, None),
        ];
        for (accept, avif_allowed, want) in cases {
            assert_eq!(
                negotiated_extension(accept, avif_allowed),
                want,
                "{accept:?}"
            );
        }
    }

    #[test]
    fn placeholder_is_a_png() {
        let png = transparent_pixel_png();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (1, 1));
    }

    fn front(extra_toml: &str) -> Front {
        front_with_queue(extra_toml, |config| {
            Arc::new(crate::queue::EmbeddedQueue::new(&config.queue))
        })
    }

    fn front_with_queue(
        extra_toml: &str,
        queue: impl FnOnce(&crate::config::Config) -> Arc<dyn crate::queue::Queue>,
    ) -> Front {
        use crate::config::{Config, Sources};
        let toml = format!("[storage]\nurl = \"memory://\"\n{extra_toml}");
        let config = Arc::new(
            Config::load_from(Sources {
                extra_toml: Some(&toml),
                ..Default::default()
            })
            .unwrap(),
        );
        let ctx = Context::new(
            config.clone(),
            Arc::new(crate::filter::FilterSet::from_config(&config).unwrap()),
            crate::storage::Storage::open("memory://").unwrap(),
            Arc::new(crate::index::Index::new(&config.index, None)),
            queue(&config),
            crate::security::NetworkPolicy::default(),
            "test-admin-key".into(),
        );
        Front::new(Arc::new(ctx))
    }

    fn get<'a>(path: &'a str, if_none_match: Option<&'a str>) -> Request<'a> {
        Request {
            method: Method::GET,
            path,
            query: None,
            conditions: Conditions {
                if_none_match,
                ..Default::default()
            },
            bearer: None,
            content_type: None,
            body: Bytes::new(),
        }
    }

    const HIT_HEADERS: [HeaderName; 5] = [
        CONTENT_TYPE,
        CONTENT_LENGTH,
        ETAG,
        CACHE_CONTROL,
        LAST_MODIFIED,
    ];

    fn headers(reply: &Reply) -> Vec<Option<String>> {
        HIT_HEADERS
            .iter()
            .map(|name| reply.header_text(name.clone()).map(str::to_string))
            .collect()
    }

    /// Each request moves its answer's future (a memcpy of the whole of
    /// it) as it starts it, so the routes and branches a hit does not take
    /// are boxed. Unboxed, the future was 8.6 KB in a release build and a
    /// profile of cold hits showed the copies (now 1.8 KB).
    #[test]
    fn a_hits_future_stays_small() {
        let front = front("");
        let request = get("/media/cache/small/a/b.png", None);
        let size = std::mem::size_of_val(&front.answer(&request));
        eprintln!("answer future: {size} bytes");
        assert!(size <= 3 * 1024, "{size} bytes");
    }

    /// A first miss's future is moved (copied) by every layer that awaits
    /// it; the enqueue-and-mark run inside `queue_once` is boxed, since
    /// unboxed it made this future 14.7 KB (2 KB boxed) in a debug build
    /// and its copies showed in a profile of a miss storm.
    #[test]
    fn a_miss_future_stays_small() {
        let front = front("");
        let variant = "media/cache/small/a/b.png";
        let miss = front.miss("small", "a/b.png".into(), variant, None);
        let size = std::mem::size_of_val(&miss);
        assert!(size <= 4 * 1024, "{size} bytes");
    }

    /// A hit answers the same whether its bytes were just read from storage,
    /// kept hot with their header values, or read again (hot cache too small).
    #[tokio::test]
    async fn hits_answer_alike_from_storage_and_memory() {
        for extra in ["", "[index]\nhot_max_object_bytes = 0\n"] {
            let front = front(extra);
            let png = transparent_pixel_png();
            let stored = "media/cache/small/a/b-c.png";
            front.ctx.storage.put(stored, png.clone()).await.unwrap();
            // Spelled as stored, and with a byte that needs decoding.
            for url in [
                "/media/cache/small/a/b-c.png",
                "/media/cache/small/a/b%2Dc.png",
            ] {
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let reply = front.answer(&get(url, None)).await;
                    assert_eq!(reply.head.status, 200, "{extra:?} {url}");
                    assert_eq!(reply.body, png);
                    assert!(!reply.broken);
                    seen.push(headers(&reply));
                }
                assert!(
                    seen.iter().all(|h| *h == seen[0]),
                    "{extra:?} {url}: {seen:?}"
                );
                let [content_type, length, etag, cache_control, last_modified] =
                    seen[0].clone().try_into().unwrap();
                assert_eq!(content_type.as_deref(), Some("image/png"));
                assert_eq!(length, Some(png.len().to_string()));
                assert_eq!(
                    cache_control.as_deref(),
                    Some("public, max-age=31536000, immutable")
                );
                assert!(last_modified.unwrap().ends_with(" GMT"));

                let etag = etag.unwrap();
                for _ in 0..2 {
                    let reply = front
                        .answer(&get(url, Some(&format!("W/\"x\", {etag}"))))
                        .await;
                    assert_eq!(reply.head.status, 304, "{extra:?} {url}");
                    assert!(reply.body.is_empty());
                    // The 200's headers, Content-Length too (RFC 9110 §8.6).
                    assert_eq!(headers(&reply), seen[0]);
                }

                // Without If-None-Match, a date no older than Last-Modified.
                let modified = seen[0][4].clone().unwrap();
                let stamp = httpdate::parse_http_date(&modified).unwrap();
                let second = std::time::Duration::from_secs(1);
                let later = httpdate::fmt_http_date(stamp + second);
                let earlier = httpdate::fmt_http_date(stamp - second);
                for (if_none_match, since, status) in [
                    (None, modified.as_str(), 304),
                    (None, later.as_str(), 304),
                    (None, earlier.as_str(), 200),
                    (None, "yesterday", 200),
                    (Some("\"other\""), later.as_str(), 200),
                ] {
                    let mut request = get(url, if_none_match);
                    request.conditions.if_modified_since = Some(since);
                    let reply = front.answer(&request).await;
                    assert_eq!(reply.head.status, status, "{if_none_match:?} {since}");
                }
            }
        }
    }

    /// Ranges of a hit, from storage and from memory alike: 206 with the
    /// slice, 416 past the end, the whole body when `If-Range` names other
    /// bytes or `If-None-Match` matches first (304).
    #[tokio::test]
    async fn hits_answer_ranges() {
        let front = front("");
        let body: Bytes = (0..=255u8).cycle().take(5000).collect::<Vec<_>>().into();
        let stored = "media/cache/small/r/body.bin";
        front.ctx.storage.put(stored, body.clone()).await.unwrap();
        let url = "/media/cache/small/r/body.bin";
        let ask = |range: &'static str, if_range: Option<String>, if_none_match: Option<String>| {
            let front = &front;
            async move {
                let request = Request {
                    conditions: Conditions {
                        if_none_match: if_none_match.as_deref(),
                        range: Some(range),
                        if_range: if_range.as_deref(),
                        ..Default::default()
                    },
                    ..get(url, None)
                };
                front.answer(&request).await
            }
        };
        // First from storage, then from memory.
        for _ in 0..2 {
            let reply = ask("bytes=100-199", None, None).await;
            assert_eq!(reply.head.status, 206);
            assert_eq!(reply.body, body.slice(100..200));
            assert_eq!(reply.header_text(CONTENT_RANGE), Some("bytes 100-199/5000"));
            assert_eq!(reply.header_text(CONTENT_LENGTH), Some("100"));
            assert_eq!(reply.header_text(ACCEPT_RANGES), Some("bytes"));
            let etag = reply.header_text(ETAG).unwrap().to_string();

            let reply = ask("bytes=-10", Some(etag.clone()), None).await;
            assert_eq!(reply.head.status, 206);
            assert_eq!(reply.body, body.slice(4990..));

            let reply = ask("bytes=5000-", None, None).await;
            assert_eq!(reply.head.status, 416);
            assert_eq!(reply.header_text(CONTENT_RANGE), Some("bytes */5000"));
            assert_eq!(reply.header_text(CACHE_CONTROL), Some("no-store"));
            assert!(reply.body.is_empty());

            let reply = ask("bytes=0-9", Some("\"other\"".into()), None).await;
            assert_eq!(reply.head.status, 200);
            assert_eq!(reply.body, body);

            let reply = ask("bytes=0-9", None, Some(etag)).await;
            assert_eq!(reply.head.status, 304);
        }
        assert!(front.ctx.index.hot_get(stored).await.is_some());
    }

    #[tokio::test]
    async fn hot_bytes_follow_a_changed_index_entry() {
        let front = front("");
        let index = &front.ctx.index;
        let variant = "media/cache/small/a/b.png";
        let old = Bytes::from_static(b"\x89PNG\r\n\x1a\nold");
        let info = VariantInfo::of_bytes(&old, 1);
        index.mark(variant, info.clone()).await.unwrap();
        index.hot_put(variant, old.clone()).await;
        assert_eq!(index.hot_get(variant).await.unwrap().bytes, old);
        // Marked again with other bytes: the hot copy no longer describes them.
        let new = Bytes::from_static(b"\x89PNG\r\n\x1a\nnew");
        index
            .mark(variant, VariantInfo::of_bytes(&new, 2))
            .await
            .unwrap();
        assert!(index.hot_get(variant).await.is_none());
        // Marked again with the same: kept.
        index.hot_put(variant, new.clone()).await;
        index
            .mark(variant, VariantInfo::of_bytes(&new, 2))
            .await
            .unwrap();
        assert_eq!(index.hot_get(variant).await.unwrap().bytes, new);
    }

    /// Counts enqueue calls on the way to an embedded queue.
    struct CountingQueue {
        inner: crate::queue::EmbeddedQueue,
        enqueues: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl crate::queue::Queue for CountingQueue {
        async fn enqueue_marked(
            &self,
            job: &crate::queue::Job,
            callback: Option<&str>,
            marker: Option<&crate::keys::ExpiringMarker>,
        ) -> Result<bool> {
            self.enqueues
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.enqueue_marked(job, callback, marker).await
        }
        async fn claim(
            &self,
            consumer: &str,
            wait: std::time::Duration,
        ) -> Result<Option<crate::queue::Claimed>> {
            self.inner.claim(consumer, wait).await
        }
        async fn complete(
            &self,
            claimed: &crate::queue::Claimed,
            filed: usize,
        ) -> Result<crate::queue::Finish> {
            self.inner.complete(claimed, filed).await
        }
        async fn dead_letter(
            &self,
            claimed: &crate::queue::Claimed,
            reason: &str,
            filed: usize,
        ) -> Result<crate::queue::Finish> {
            self.inner.dead_letter(claimed, reason, filed).await
        }
        async fn hold(&self, claimed: &crate::queue::Claimed, consumer: &str) -> Result<bool> {
            self.inner.hold(claimed, consumer).await
        }
        async fn retry_later(
            &self,
            claimed: &crate::queue::Claimed,
            delay: std::time::Duration,
        ) -> Result<()> {
            self.inner.retry_later(claimed, delay).await
        }
        async fn depths(&self) -> Result<crate::queue::Depths> {
            self.inner.depths().await
        }
        async fn ping(&self) -> Result<()> {
            self.inner.ping().await
        }
    }

    /// Misses of a variant whose job was just queued answer 202 from memory;
    /// the variant, once stored and marked, is served at once.
    #[tokio::test]
    async fn repeated_misses_ask_the_queue_once() {
        let queue = Arc::new(CountingQueue {
            inner: crate::queue::EmbeddedQueue::new(
                &crate::config::Config::load_from(Default::default())
                    .unwrap()
                    .queue,
            ),
            enqueues: Default::default(),
        });
        let front = front_with_queue("", |_| queue.clone());
        let png = transparent_pixel_png();
        front
            .ctx
            .storage
            .put("default/x.png", png.clone())
            .await
            .unwrap();
        let url = "/media/cache/small/default/x.png";
        for _ in 0..5 {
            let reply = front.answer(&get(url, None)).await;
            assert_eq!(reply.head.status, 202);
            assert_eq!(reply.header_text(CACHE_CONTROL), Some("no-store"));
        }
        assert_eq!(queue.enqueues.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            crate::queue::Queue::depths(&*queue).await.unwrap().urgent,
            1
        );

        let variant = "media/cache/small/default/x.png";
        front.ctx.storage.put(variant, png.clone()).await.unwrap();
        front
            .ctx
            .index
            .mark(variant, VariantInfo::of_bytes(&png, 1))
            .await
            .unwrap();
        let reply = front.answer(&get(url, None)).await;
        assert_eq!(reply.head.status, 200);
        assert_eq!(reply.body, png);
    }
}
