//! Sends a whole HTTP/1.1 answer (head and in-memory body) in one vectored
//! write straight from the body's bytes, then hands the connection back to
//! pingora for the next request.
//!
//! pingora's own writer copies the body into the connection's write buffer
//! before sending it (or, with a small buffer, sends head and body in two
//! system calls). For a 20 KB hit that copy was about a tenth of the front's
//! CPU, and with many connections each one's buffer is cold in cache. Here
//! the kernel copies the body once, from wherever it already is (the hot
//! cache's bytes), as nginx's `sendfile` does from the page cache.

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, DATE};
use http::HeaderValue;
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use tokio::io::{AsyncWrite, AsyncWriteExt};

const KEEP_ALIVE: HeaderValue = HeaderValue::from_static("keep-alive");

/// Whether [`send`] can answer this session: HTTP/1.x on a connection that
/// stays open, by the same test pingora's `finish` makes (keep-alive on, and
/// not its last allowed request). Otherwise `finish` would close the
/// connection before the answer is written, so pingora must write it.
pub fn applies(session: &ServerSession) -> bool {
    matches!(session, ServerSession::H1(_))
        && session.get_keepalive().is_some()
        && session.get_keepalive_reuses_remaining() != Some(0)
}

/// Writes `header` (with the `Date` and `Connection` pingora would add) and
/// `body` (empty for HEAD), and returns the connection for its next
/// request; None when it cannot be reused (a write failed, or pingora found
/// the request unfinished). Only for sessions [`applies`] accepts.
pub async fn send(
    mut session: ServerSession,
    mut header: ResponseHeader,
    body: Bytes,
) -> Option<ReusedHttpStream> {
    header.insert_header(DATE, get_cached_date()).ok()?;
    header.insert_header(CONNECTION, KEEP_ALIVE).ok()?;
    let head = serialize(&header);

    // Bytes the client sent after this request (pipelining) come back with
    // the connection instead of costing it; answers stay in order because
    // this one is written before the next request is read.
    session.set_pipelining_enabled(true);
    let mut persistent = HttpPersistentSettings::for_session(&session);
    // Nothing was written through the session, so this only checks the
    // request was read to its end and takes the connection back.
    let reusable = session.finish().await.ok()??;
    let (mut stream, pipelined) = reusable.into_parts();

    write_all_vectored(&mut stream, &mut [IoSlice::new(&head), IoSlice::new(&body)])
        .await
        .ok()?;
    // A no-op without a write buffer; with one, the answer may sit in it.
    stream.flush().await.ok()?;

    if let Some(prefix) = pipelined {
        persistent.set_pipelined_prefix(prefix);
    }
    Some(ReusedHttpStream::new(stream, Some(persistent)))
}

/// Writes every byte of `parts`, as many vectored writes as the socket
/// needs (a large body rarely fits its send buffer at once).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut parts: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !parts.is_empty() {
        match writer.write_vectored(parts).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            written => IoSlice::advance_slices(&mut parts, written),
        }
    }
    Ok(())
}

/// The status line and headers, as pingora serializes them.
fn serialize(header: &ResponseHeader) -> Bytes {
    let mut head = BytesMut::with_capacity(512);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(header.status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(header.get_reason_phrase().unwrap_or_default().as_bytes());
    head.put_slice(b"\r\n");
    header.header_to_h1_wire(&mut head);
    head.put_slice(b"\r\n");
    head.freeze()
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A socket that takes at most a few bytes per write, and every other
    /// write not at all (it is full until woken).
    struct Trickle {
        got: Vec<u8>,
        full: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.full = !self.full;
            if self.full {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let taken = buf.len().min(7);
            self.got.extend_from_slice(&buf[..taken]);
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn short_writes_resume_where_they_stopped() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec();
        let body: Vec<u8> = (0..100u8).collect();
        let mut socket = Trickle {
            got: Vec::new(),
            full: false,
        };
        write_all_vectored(&mut socket, &mut [IoSlice::new(&head), IoSlice::new(&body)])
            .await
            .unwrap();
        assert_eq!(socket.got, [head, body].concat());
    }

    #[test]
    fn the_head_is_what_pingora_writes() {
        let mut header = ResponseHeader::build(202, None).unwrap();
        header.insert_header("Content-Length", "5").unwrap();
        header.insert_header("Cache-Control", "no-store").unwrap();
        assert_eq!(
            serialize(&header),
            "HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\nCache-Control: no-store\r\n\r\n"
        );
    }
}
