//! The one error type. Every variant has a stable kebab-case `code()`, an
//! HTTP `status()` and says whether a job failing with it may be retried.
//! Modules map their backend errors into it at their boundary.

use serde_json::json;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("unknown filter {0:?}")]
    UnknownFilter(String),
    #[error("size {0} is over the largest allowed")]
    SizeTooLarge(String),
    #[error("size {0} is not one of the allowed sizes")]
    SizeNotAllowed(String),
    #[error("Validation error: {0}")]
    InvalidPayload(String),
    #[error("unsupported content type {0:?}: send application/json")]
    UnsupportedContentType(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("unknown account {0:?}: set it up with /account_setup first")]
    UnknownAccount(String),
    #[error("unknown media {0:?}")]
    UnknownMedia(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method {method} not allowed here")]
    MethodNotAllowed {
        method: String,
        /// The methods the route takes, as the `Allow` header lists them.
        allow: &'static str,
    },
    #[error("original not found: {0}")]
    SourceNotFound(String),
    #[error("address not allowed: {0}")]
    AddressDenied(String),
    #[error("origin answered HTTP {status} for {url}")]
    OriginStatus { status: u16, url: String },
    #[error("origin unreachable: {0}")]
    OriginUnreachable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("too many redirects (more than {0})")]
    TooManyRedirects(usize),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("not a supported image: {0}")]
    UnsupportedImage(String),
    #[error("image exceeds limits: {0}")]
    ImageTooLarge(String),
    #[error("cannot decode image: {0}")]
    DecodeFailed(String),
    #[error("cannot encode image: {0}")]
    EncodeFailed(String),
    #[error("renderer crashed: {0}")]
    RenderPanicked(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("queue unavailable: {0}")]
    Queue(String),
    #[error("callback failed: {0}")]
    Callback(String),
    /// The receiver answered 410 Gone: it says it will never take this.
    #[error("callback refused for good: {0}")]
    CallbackGone(String),
    #[error("shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Stable machine-readable code, used in JSON bodies, callbacks and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(_) => "invalid-config",
            Error::BadRequest(_) => "bad-request",
            Error::InvalidPath(_) => "invalid-path",
            Error::InvalidUrl(_) => "invalid-url",
            Error::UnknownFilter(_) => "unknown-filter",
            Error::SizeTooLarge(_) => "size-too-large",
            Error::SizeNotAllowed(_) => "size-not-allowed",
            Error::InvalidPayload(_) => "invalid-payload",
            Error::UnsupportedContentType(_) => "unsupported-content-type",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::UnknownAccount(_) => "unknown-account",
            Error::UnknownMedia(_) => "unknown-media",
            Error::NoRoute(_) => "no-route",
            Error::MethodNotAllowed { .. } => "method-not-allowed",
            Error::SourceNotFound(_) => "source-not-found",
            Error::AddressDenied(_) => "address-denied",
            Error::OriginStatus { .. } => "origin-status",
            Error::OriginUnreachable(_) => "origin-unreachable",
            Error::Timeout(_) => "timeout",
            Error::TooManyRedirects(_) => "too-many-redirects",
            Error::TooLarge(_) => "too-large",
            Error::UnsupportedImage(_) => "unsupported-image",
            Error::ImageTooLarge(_) => "image-too-large",
            Error::DecodeFailed(_) => "decode-failed",
            Error::EncodeFailed(_) => "encode-failed",
            Error::RenderPanicked(_) => "render-panicked",
            Error::Storage(_) => "storage-error",
            Error::Queue(_) => "queue-unavailable",
            Error::Callback(_) => "callback-failed",
            Error::CallbackGone(_) => "callback-gone",
            Error::ShuttingDown => "shutting-down",
            Error::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_)
            | Error::InvalidPath(_)
            | Error::InvalidUrl(_)
            | Error::Config(_) => 400,
            Error::Unauthorized(_) => 401,
            Error::AddressDenied(_) | Error::Forbidden(_) => 403,
            Error::UnknownFilter(_)
            | Error::SizeNotAllowed(_)
            | Error::NoRoute(_)
            | Error::SourceNotFound(_)
            | Error::UnknownAccount(_)
            | Error::UnknownMedia(_) => 404,
            Error::UnsupportedContentType(_) => 415,
            Error::SizeTooLarge(_) => 406,
            Error::InvalidPayload(_) => 422,
            Error::MethodNotAllowed { .. } => 405,
            Error::TooLarge(_) | Error::ImageTooLarge(_) => 413,
            Error::UnsupportedImage(_) | Error::DecodeFailed(_) => 422,
            // The original is not there: say so, as for a missing stored one.
            Error::OriginStatus {
                status: 404 | 410, ..
            } => 404,
            Error::OriginStatus { .. }
            | Error::OriginUnreachable(_)
            | Error::TooManyRedirects(_)
            | Error::Callback(_)
            | Error::CallbackGone(_) => 502,
            Error::Queue(_) | Error::Storage(_) | Error::ShuttingDown => 503,
            Error::Timeout(_) => 504,
            Error::EncodeFailed(_) | Error::RenderPanicked(_) | Error::Internal(_) => 500,
        }
    }

    /// Whether a job that failed with this error may succeed on a later attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::OriginStatus { status, .. } => {
                matches!(status, 408 | 425 | 429) || *status >= 500
            }
            Error::OriginUnreachable(_)
            | Error::Timeout(_)
            | Error::Storage(_)
            | Error::Queue(_)
            | Error::Callback(_)
            | Error::ShuttingDown => true,
            _ => false,
        }
    }

    /// The JSON body of an error answer.
    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": self.code(), "message": self.to_string()})
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Queue(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("json: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_statuses_and_retryability() {
        let e = Error::OriginStatus {
            status: 503,
            url: "u".into(),
        };
        assert_eq!(
            (e.code(), e.status(), e.is_retryable()),
            ("origin-status", 502, true)
        );
        let e = Error::OriginStatus {
            status: 404,
            url: "u".into(),
        };
        assert!(!e.is_retryable());
        assert_eq!(e.status(), 404);
        assert!(!Error::ImageTooLarge("x".into()).is_retryable());
        assert_eq!(Error::InvalidPath("..".into()).status(), 400);
        assert_eq!(
            Error::UnknownFilter("x".into()).to_json()["error"],
            "unknown-filter"
        );
    }
}
