//! The pingora HTTP front: routing, hits (ETag/304/HEAD) from hot memory,
//! the index or storage, misses answered 202 at once with a job enqueued,
//! and the one place that turns an `Error` into a response. It never
//! decodes, resizes, downloads or calls back.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;

use crate::api::Context;
use crate::error::{Error, Result};
use crate::index::{Failure, VariantInfo};
use crate::keys;
use crate::security::normalize_path;

/// An answer before it is written.
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    /// Content-Length to announce when the body is left out (HEAD).
    length: usize,
}

impl Reply {
    fn new(status: u16, content_type: &str, body: Bytes) -> Reply {
        Reply {
            status,
            length: body.len(),
            headers: vec![("content-type", content_type.to_string())],
            body,
        }
    }

    fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_vec(value).unwrap_or_default();
        Reply::new(status, "application/json", Bytes::from(body))
            .header("cache-control", "no-store")
    }

    fn error(e: &Error) -> Reply {
        Reply::json(e.status(), &e.to_json())
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

pub struct Front {
    ctx: Arc<Context>,
    placeholder: Bytes,
}

impl Front {
    pub fn new(ctx: Arc<Context>) -> Front {
        Front {
            ctx,
            placeholder: transparent_pixel_png(),
        }
    }

    /// Routes one request to its answer.
    pub async fn answer(&self, request: &Request) -> Reply {
        let result = self.route(request).await;
        result.unwrap_or_else(|e| {
            if e.status() >= 500 {
                tracing::warn!(code = e.code(), error = %e, "request failed");
            }
            Reply::error(&e)
        })
    }

    async fn route(&self, request: &Request) -> Result<Reply> {
        let method = &request.method;
        let path = request.path.as_str();
        let allow = |allowed: &[Method]| {
            if allowed.contains(method) {
                Ok(())
            } else {
                Err(Error::MethodNotAllowed(method.to_string()))
            }
        };
        const READ: &[Method] = &[Method::GET, Method::HEAD];
        const POST: &[Method] = &[Method::POST];
        const READ_OR_POST: &[Method] = &[Method::GET, Method::POST];
        let if_none_match = request.if_none_match.as_deref();
        match path {
            "/healthz" => {
                allow(READ)?;
                return Ok(Reply::json(200, &serde_json::json!({"status": "ok"})));
            }
            "/readyz" => {
                allow(READ)?;
                return self.ready().await;
            }
            "/status" => {
                allow(READ)?;
                return Ok(Reply::json(200, &self.ctx.status().await?));
            }
            "/account_setup" | "/account_setup.json" => {
                allow(POST)?;
                let setup = request.json()?;
                let caller = self.ctx.caller(request.key()).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.account_setup(&caller, setup).await?,
                ));
            }
            "/dispatch_process" | "/dispatch_process.json" => {
                allow(POST)?;
                let payload: crate::api::sais::ProcessPayload = request.json()?;
                let key = request.key().or(payload.api_key.as_deref());
                let caller = self.ctx.caller(key).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.dispatch(&caller, payload).await?,
                ));
            }
            "/fetch/media/by-ids" => {
                allow(READ_OR_POST)?;
                let ids = request.ids()?;
                let caller = self.ctx.caller(request.key()).await?;
                return Ok(Reply::json(
                    200,
                    &self.ctx.media_by_ids(&caller, &ids).await?,
                ));
            }
            "/tools" | "/mcp" => {
                allow(POST)?;
                request.require_json()?;
                return Ok(
                    match crate::api::tools::handle(&self.ctx, request.key(), &request.body).await {
                        Some(answer) => Reply::json(200, &answer),
                        None => Reply::new(202, "application/json", Bytes::new())
                            .header("cache-control", "no-store"),
                    },
                );
            }
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/media/cache/resolve/") {
            allow(READ)?;
            self.cache(rest, if_none_match, true).await
        } else if let Some(rest) = path.strip_prefix("/media/cache/") {
            allow(READ)?;
            self.cache(rest, if_none_match, false).await
        } else if let Some(code) = path.strip_prefix("/media/") {
            allow(READ)?;
            let caller = self.ctx.caller(request.key()).await?;
            let code = code.trim_end_matches('/');
            Ok(Reply::json(200, &self.ctx.media(&caller, code).await?))
        } else if let Some(filter) = path.strip_prefix("/request/") {
            allow(READ_OR_POST)?;
            self.request(filter, request).await
        } else {
            Err(Error::NoRoute(path.chars().take(200).collect()))
        }
    }

    async fn ready(&self) -> Result<Reply> {
        self.ctx.storage.ping().await?;
        self.ctx.queue.ping().await?;
        Ok(Reply::json(200, &serde_json::json!({"status": "ready"})))
    }

    async fn request(&self, filter: &str, request: &Request) -> Result<Reply> {
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

    /// `<filter>/<path>`: a hit, or a 202 with one job enqueued.
    async fn cache(&self, rest: &str, if_none_match: Option<&str>, resolve: bool) -> Result<Reply> {
        let (filter, raw_path) = rest
            .split_once('/')
            .ok_or_else(|| Error::InvalidPath("expected <filter>/<path>".into()))?;
        self.ctx.filters.get(filter)?;
        let path = normalize_path(raw_path, self.ctx.config.server.max_path_bytes)?;
        let variant = keys::variant_path(filter, &path);
        let index = &self.ctx.index;

        if let Some((info, _source, bytes)) = index.locate(&self.ctx.storage, &variant).await? {
            if resolve {
                let location = keys::variant_url(&self.ctx.public_base, filter, &path);
                return Ok(Reply::new(302, "text/plain", Bytes::new())
                    .header("location", location)
                    .header("cache-control", "no-store"));
            }
            let bytes = match bytes {
                Some(bytes) => Some(bytes),
                None => self.variant_bytes(&variant).await?,
            };
            // An index entry whose bytes are gone is treated as a miss.
            if let Some(bytes) = bytes {
                return Ok(self.hit(&info, bytes, if_none_match));
            }
        }

        if let Some(failure) = index.failure(&variant).await {
            return Ok(self.failed(&failure));
        }
        let original_absent = format!("original:{path}");
        if index.is_known_absent(&original_absent).await {
            return Err(Error::SourceNotFound(path));
        }
        let source_url = if self.ctx.storage.head(&path).await?.is_some() {
            None
        } else {
            match self.ctx.pending_source(&path).await? {
                Some(url) => Some(url),
                None => {
                    index.remember_absent(&original_absent).await;
                    return Err(Error::SourceNotFound(path));
                }
            }
        };
        self.ctx.enqueue_miss(filter, &path, source_url).await?;
        Ok(self.busy())
    }

    async fn variant_bytes(&self, variant: &str) -> Result<Option<Bytes>> {
        if let Some(bytes) = self.ctx.index.hot_get(variant).await {
            return Ok(Some(bytes));
        }
        let Some(object) = self.ctx.storage.get(variant).await? else {
            return Ok(None);
        };
        self.ctx.index.hot_put(variant, object.bytes.clone()).await;
        Ok(Some(object.bytes))
    }

    fn hit(&self, info: &VariantInfo, bytes: Bytes, if_none_match: Option<&str>) -> Reply {
        let max_age = self.ctx.config.server.cache_max_age_secs;
        let last_modified = httpdate::fmt_http_date(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(info.last_modified.max(0) as u64),
        );
        let cache_control = format!("public, max-age={max_age}, immutable");
        if if_none_match.is_some_and(|header| etag_matches(header, &info.etag)) {
            let mut reply = Reply::new(304, &info.content_type, Bytes::new());
            reply.length = 0;
            return reply
                .header("etag", info.etag.clone())
                .header("cache-control", cache_control)
                .header("last-modified", last_modified);
        }
        Reply::new(200, &info.content_type, bytes)
            .header("etag", info.etag.clone())
            .header("cache-control", cache_control)
            .header("last-modified", last_modified)
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
        .header("cache-control", cache_control)
    }

    fn busy(&self) -> Reply {
        Reply::new(202, "image/png", self.placeholder.clone())
            .header("cache-control", "no-store")
            .header(
                "retry-after",
                self.ctx.config.server.retry_after_secs.to_string(),
            )
    }
}

/// `If-None-Match` against a strong ETag (weak comparison, as RFC 9110 asks for GET).
fn etag_matches(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

/// The 202 body: a valid 1x1 transparent PNG that an `<img>` can show.
fn transparent_pixel_png() -> Bytes {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(image::RgbaImage::new(1, 1))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encoding a 1x1 PNG cannot fail");
    Bytes::from(out)
}

/// A request as the routes see it: head fields they use and the whole body.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub if_none_match: Option<String>,
    /// The `Authorization: Bearer` key, else `?token=`.
    pub bearer: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Request {
    pub fn query_pairs(&self) -> url::form_urlencoded::Parse<'_> {
        url::form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
    }

    /// The key from the head: `Authorization: Bearer`, else `?token=`.
    pub fn key(&self) -> Option<&str> {
        self.bearer.as_deref().filter(|k| !k.is_empty())
    }

    /// A JSON body, or none at all; a form or anything else is refused.
    pub fn require_json(&self) -> Result<()> {
        match self.content_type.as_deref() {
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
        serde_json::from_slice(&self.body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Error::InvalidPayload(e.to_string()),
            _ => Error::BadRequest(format!("malformed JSON: {e}")),
        })
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

enum ReadFailure {
    /// Answer this instead of routing (e.g. a body over the limit).
    Reply(Method, Reply),
    Connection,
}

impl Front {
    /// Reads the head fields the routes use and the body, up to `server.max_body_bytes`.
    async fn read(&self, session: &mut ServerSession) -> std::result::Result<Request, ReadFailure> {
        let header = session.req_header();
        let method = header.method.clone();
        let header_text = |name: http::header::HeaderName| {
            header
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let if_none_match = header_text(http::header::IF_NONE_MATCH);
        let content_type = header_text(http::header::CONTENT_TYPE);
        let bearer = header_text(http::header::AUTHORIZATION).and_then(|value| {
            let (scheme, key) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| key.trim().to_string())
        });
        let path = header.uri.path().to_string();
        let query = header.uri.query().map(str::to_string);
        let limit = self.ctx.config.server.max_body_bytes;
        let too_large = |method: &Method| {
            ReadFailure::Reply(
                method.clone(),
                Reply::error(&Error::TooLarge(format!("request body over {limit} bytes"))),
            )
        };
        let announced =
            header_text(http::header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
        if announced.is_some_and(|n| n > limit) {
            return Err(too_large(&method));
        }
        let mut body = bytes::BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large(&method));
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
        let mut request = Request {
            method,
            path,
            query,
            if_none_match,
            bearer,
            content_type,
            body: body.freeze(),
        };
        if request.bearer.is_none() {
            request.bearer = request
                .query_pairs()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned());
        }
        Ok(request)
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
                return None;
            }
        }
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let (method, reply) = match self.read(&mut session).await {
            Ok(request) => {
                let reply = self.answer(&request).await;
                (request.method, reply)
            }
            Err(ReadFailure::Reply(method, reply)) => {
                // The rest of an over-long body is not read: do not reuse the connection.
                session.set_keepalive(None);
                (method, reply)
            }
            Err(ReadFailure::Connection) => return None,
        };

        let mut response =
            ResponseHeader::build(reply.status, Some(reply.headers.len() + 2)).ok()?;
        for (name, value) in &reply.headers {
            response.insert_header(*name, value.as_str()).ok()?;
        }
        response
            .insert_header("content-length", reply.length.to_string())
            .ok()?;
        let head = method == Method::HEAD;
        let with_body = !head && !reply.body.is_empty();
        if session
            .write_response_header(Box::new(response))
            .await
            .is_err()
        {
            return None;
        }
        if with_body && session.write_response_body(reply.body, true).await.is_err() {
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent)),
            Err(_) => None,
        }
    }
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
    fn placeholder_is_a_png() {
        let png = transparent_pixel_png();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (1, 1));
    }
}
