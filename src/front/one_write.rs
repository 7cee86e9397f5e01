//! Sends a whole HTTP/1.1 answer in as few system calls and copies as it
//! can, then hands the connection back to pingora for the next request: a
//! body in memory leaves with its head in one vectored write straight from
//! its bytes; a body in a cached file is handed to the socket by
//! `sendfile`, behind its head.
//!
//! pingora's own writer copies the body into the connection's write buffer
//! before sending it (or, with a small buffer, sends head and body in two
//! system calls). For a 20 KB hit that copy was about a tenth of the front's
//! CPU, and with many connections each one's buffer is cold in cache. Here
//! the kernel copies the body once, from wherever it already is (the hot
//! cache's bytes), or not at all from the page cache, as nginx's
//! `sendfile` does.

use std::io::IoSlice;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, DATE};
use http::HeaderValue;
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::storage::FileBody;

const KEEP_ALIVE: HeaderValue = HeaderValue::from_static("keep-alive");

/// An answer's body: bytes in memory, or part of a file the page cache holds.
#[derive(Clone, Debug)]
pub enum Body {
    Memory(Bytes),
    File(FileBody),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::File(file) => file.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in `range` (within the body).
    pub fn slice(&self, range: Range<u64>) -> Body {
        match self {
            Body::Memory(bytes) => {
                Body::Memory(bytes.slice(range.start as usize..range.end as usize))
            }
            Body::File(file) => Body::File(file.slice(range)),
        }
    }

    /// The body in memory, for writers that cannot send a file; None when
    /// the file cannot be read.
    pub async fn into_bytes(self) -> Option<Bytes> {
        match self {
            Body::Memory(bytes) => Some(bytes),
            Body::File(file) => match file.read_all().await {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read an answer's file");
                    None
                }
            },
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::Memory(bytes)
    }
}

/// Tests compare bodies in memory with their bytes.
#[cfg(test)]
impl PartialEq<Bytes> for Body {
    fn eq(&self, other: &Bytes) -> bool {
        matches!(self, Body::Memory(bytes) if bytes == other)
    }
}

/// Whether [`send`] can answer this session: HTTP/1.x on a connection that
/// stays open, by the same test pingora's `finish` makes (keep-alive on, and
/// not its last allowed request), that has written nothing yet. Otherwise
/// `finish` would close the connection before the answer is written, so
/// pingora must write it.
pub fn applies(session: &ServerSession) -> bool {
    matches!(session, ServerSession::H1(_))
        && session.get_keepalive().is_some()
        && session.get_keepalive_reuses_remaining() != Some(0)
        // A `100 Continue` went out through the session: let it write the rest.
        && session.response_written().is_none()
}

/// Writes `header` (with the `Date` and `Connection` pingora would add) and
/// `body` (empty for HEAD), and returns the connection for its next
/// request; None when it cannot be reused (a write failed, or pingora found
/// the request unfinished). Only for sessions [`applies`] accepts.
pub async fn send(
    mut session: ServerSession,
    mut header: ResponseHeader,
    body: Body,
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

    match body {
        // TLS encrypts in user space: the kernel cannot send the file.
        Body::File(file) if stream.get_ssl().is_none() => {
            send_file(&mut stream, &head, &file).await.ok()?
        }
        body => {
            let body = body.into_bytes().await?;
            write_all_vectored(&mut stream, &mut [IoSlice::new(&head), IoSlice::new(&body)])
                .await
                .ok()?;
            // A no-op without a write buffer; with one, the answer may sit in it.
            stream.flush().await.ok()?;
        }
    }

    if let Some(prefix) = pipelined {
        persistent.set_pipelined_prefix(prefix);
    }
    Some(ReusedHttpStream::new(stream, Some(persistent)))
}

/// The most of a file read into memory at once when its socket is full.
const FILE_CHUNK_BYTES: u64 = 256 * 1024;

/// Writes `head` then `file` to a plain (not TLS) socket: the head with `MSG_MORE`,
/// so it waits for the body's first bytes and leaves with them, then the
/// file by `sendfile`. The socket is the async stream's own non-blocking
/// descriptor, so when it is full the next chunk is read and written
/// through the stream, which waits for room; `sendfile` then resumes.
async fn send_file(
    stream: &mut pingora_core::protocols::Stream,
    head: &[u8],
    file: &FileBody,
) -> std::io::Result<()> {
    use rustix::io::Errno;
    use std::os::fd::BorrowedFd;

    // Nothing may sit in the stream's write buffer ahead of the raw writes.
    stream.flush().await?;
    // SAFETY: the descriptor is the stream's socket, which `stream` keeps
    // open for as long as this borrow (it does not outlive this function).
    #[allow(unsafe_code)]
    let socket = unsafe { BorrowedFd::borrow_raw(stream.id()) };

    let mut head_sent = 0;
    while head_sent < head.len() {
        let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::send(socket, &head[head_sent..], flags) {
            Ok(sent) => head_sent += sent,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if head_sent < head.len() {
        stream.write_all(&head[head_sent..]).await?;
        stream.flush().await?;
    }

    let mut sent = 0;
    while sent < file.len() {
        let mut offset = file.start() + sent;
        let left = (file.len() - sent) as usize;
        match rustix::fs::sendfile(socket, file.file(), Some(&mut offset), left) {
            // The file is shorter than its `fstat` said: the answer cannot be finished.
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => sent += n as u64,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let chunk = (file.len() - sent).min(FILE_CHUNK_BYTES) as usize;
                let bytes = file
                    .read(sent, chunk)
                    .await
                    .map_err(std::io::Error::other)?;
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                sent += chunk as u64;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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

    /// A file body through a socket far smaller than it, read late:
    /// `sendfile` fills the socket, the rest waits its turn through the
    /// stream, and the reader gets the head and every byte in order.
    #[tokio::test]
    async fn a_file_body_arrives_whole_through_a_full_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("variant");
        let mut seed = 0x9e37_79b9_u32;
        let bytes: Vec<u8> = (0..3_000_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = FileBody::whole(&path).slice(1000..2_999_000);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = socket.connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        rustix::net::sockopt::set_socket_send_buffer_size(&server, 4096).unwrap();
        let mut stream: pingora_core::protocols::Stream =
            Box::new(pingora_core::protocols::l4::stream::Stream::from(server));

        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2998000\r\n\r\n";
        let read = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let mut got = vec![0; head.len() + 2_998_000];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
                .await
                .unwrap();
            got
        };
        let (sent, got) = tokio::join!(send_file(&mut stream, head, &file), read);
        sent.unwrap();
        assert!(got[..head.len()] == head[..], "the head first");
        assert!(
            got[head.len()..] == bytes[1000..2_999_000],
            "then the file's bytes"
        );
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
