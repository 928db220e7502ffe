//! The server's side of a connection, with two behaviours hyper leaves to the transport:
//!
//! - writes give up: a client that stops reading its response leaves the server's writes
//!   pending forever, holding the connection and its buffers. A write that has made no progress
//!   for the send timeout fails, and hyper then closes the connection;
//! - closing lingers: when the server closes a connection whose client is still sending (a
//!   body refused early, bytes past its `Content-Length`), the kernel answers the unread bytes
//!   with a reset, and the client may lose the response it has not read yet. After sending its
//!   FIN the server reads and discards what still comes, for a short while, as web servers do;
//! - hyper's own refusals speak JSON: a request hyper cannot parse as HTTP/1.1 (conflicting
//!   `Content-Length` and `Transfer-Encoding`, a folded header, a NUL byte, an unknown version,
//!   too many headers, a head or URL beyond its buffer) never reaches the router; hyper answers
//!   it with a bare status and an empty body. Such an answer is recognised as it is written
//!   (an error status with an empty body and no `x-request-id`, which every routed response
//!   carries) and replaced by the same status with the JSON refusal every other error gets.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Longest time a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes a closing connection reads and discards before it gives up.
const LINGER_BYTES: usize = 1 << 20;

/// `io` with a time limit on each stalled write and a lingering close.
pub struct ServerIo<T> {
    io: T,
    timeout: Duration,
    /// Armed while a write is pending; cleared by any progress.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Set once the write side is shut: the linger's deadline and the bytes discarded.
    linger: Option<(Pin<Box<Sleep>>, usize)>,
    /// A bare refusal of hyper's being replaced: the JSON response, how much of it is
    /// written, and the length of hyper's bytes it stands for.
    replacing: Option<(Bytes, usize, usize)>,
}

impl<T> ServerIo<T> {
    /// Wraps `io`; a write pending for `timeout` fails with `TimedOut`.
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            deadline: None,
            linger: None,
            replacing: None,
        }
    }

    /// What to return for a write that is pending: still pending, or the timeout's error.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(
        &mut self,
        poll: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Pending => self.pending(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ServerIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> ServerIo<T> {
    /// Writes the rest of a replacement; once it is all out, reports hyper's bytes as written.
    fn poll_replace(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((json, written, original)) = self.replacing.as_mut() {
            if *written == json.len() {
                let original = *original;
                self.replacing = None;
                return Poll::Ready(Ok(original));
            }
            let poll = Pin::new(&mut self.io).poll_write(cx, &json[*written..]);
            match self.progress(poll, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if let Some((_, written, _)) = self.replacing.as_mut() {
                        *written += n;
                    }
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(0))
    }

    /// Starts replacing `buf` if it is one of hyper's bare refusals.
    fn intercept(&mut self, buf: &[u8]) -> bool {
        if self.replacing.is_none()
            && let Some(json) = json_refusal(buf)
        {
            self.replacing = Some((json, 0, buf.len()));
        }
        self.replacing.is_some()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.intercept(buf) {
            return self.poll_replace(cx);
        }
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(poll, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // A bare refusal is a head alone, so it comes as one slice.
        if let [only] = bufs
            && self.intercept(only)
        {
            return self.poll_replace(cx);
        }
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(poll, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let Some((deadline, discarded)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if *discarded >= LINGER_BYTES || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The client closed its side too (or the connection failed): done.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *discarded += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The JSON response standing for `head` when it is a refusal hyper wrote itself: an HTTP/1.x
/// error status, nothing after the head, `content-length: 0`, and no `x-request-id`.
fn json_refusal(head: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    let status: u16 = rest.get(2..5)?.parse().ok()?;
    let lower = text.to_ascii_lowercase();
    let bare = status >= 400
        && text.ends_with("\r\n\r\n")
        && text.find("\r\n\r\n") == Some(text.len() - 4)
        && lower.contains("\r\ncontent-length: 0\r\n")
        && !lower.contains("\r\nx-request-id:");
    if !bare {
        return None;
    }
    let (code, message) = match status {
        431 => (
            "headers_too_large",
            "the request head is larger than the server reads",
        ),
        414 => (
            "uri_too_long",
            "the request target is longer than the server reads",
        ),
        505 => (
            "version_not_supported",
            "only HTTP/1.0, HTTP/1.1 and HTTP/2 (with its connection preface) are served",
        ),
        _ => (
            "malformed_request",
            "the request is not well-formed HTTP/1.1 (for example conflicting Content-Length \
             and Transfer-Encoding, a malformed or folded header, a NUL byte, or too many headers)",
        ),
    };
    let request_id = super::names::new_request_id(std::time::SystemTime::now());
    let body = serde_json::json!({ "error": code, "message": message, "request_id": request_id })
        .to_string();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    Some(Bytes::from(format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {request_id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::json_refusal;

    #[test]
    fn only_bare_error_heads_are_replaced() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let json = json_refusal(bare).expect("replaced");
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["error"], "malformed_request");
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let too_large =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(
            std::str::from_utf8(&json_refusal(too_large).unwrap())
                .unwrap()
                .contains("headers_too_large")
        );
        for kept in [
            &b"HTTP/1.1 404 Not Found\r\nx-request-id: a\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            b"\x00\x00\x12\x04\x00",
        ] {
            assert!(
                json_refusal(kept).is_none(),
                "{:?}",
                String::from_utf8_lossy(kept)
            );
        }
    }
}
