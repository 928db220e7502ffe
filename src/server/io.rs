//! The server's side of a connection, with two behaviours hyper leaves to the transport:
//!
//! - writes give up: a client that stops reading its response leaves the server's writes
//!   pending forever, holding the connection and its buffers. A write that has made no progress
//!   for the send timeout fails, and hyper then closes the connection;
//! - closing lingers: when the server closes a connection whose client is still sending (a
//!   body refused early, bytes past its `Content-Length`), the kernel answers the unread bytes
//!   with a reset, and the client may lose the response it has not read yet. After sending its
//!   FIN the server reads and discards what still comes, for a short while, as web servers do.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
}

impl<T> ServerIo<T> {
    /// Wraps `io`; a write pending for `timeout` fails with `TimedOut`.
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            deadline: None,
            linger: None,
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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(poll, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
