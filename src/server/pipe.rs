//! How a streamed response body reaches hyper: a short queue of chunks between the task that
//! produces them and the body hyper polls, with two guarantees a plain channel lacks.
//!
//! - **A stalled client does not hold memory.** hyper polls an HTTP/2 body only while the
//!   stream's flow-control window has room, so a client that opens many streams with a window
//!   of 0 and never reads would keep each stream's queued chunks for as long as it stays
//!   connected. A send or a drain that makes no progress for the send timeout *abandons* the
//!   pipe: the queued chunks are dropped there and then, and the body ends in an error (the
//!   stream is reset, the HTTP/1.1 connection closed) the next time hyper polls it, so a cut
//!   response never looks complete.
//! - **What it holds is charged.** The pipe carries the request's [`Share`] of the memory
//!   budget and returns it when abandoned or when hyper drops the body, whichever is first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::{Body, BoxError};
use crate::budget::Share;

/// What one queued chunk is at most, so a pipe's memory is its depth times this.
pub const CHUNK_BYTES: usize = 64 * 1024;

type Item = Result<Bytes, BoxError>;

/// What the producer and the body share.
struct Shared {
    /// The consumer's end, behind a lock so that an abandoning producer can empty it.
    receiver: Mutex<mpsc::Receiver<Item>>,
    /// Set before the queue is emptied by an abandon: the body then ends in an error.
    abandoned: AtomicBool,
    /// The memory charged for what the pipe may hold.
    share: Mutex<Option<Share>>,
}

/// The producing end of a [`pipe`].
pub struct PipeSender {
    sender: mpsc::Sender<Item>,
    shared: Arc<Shared>,
    timeout: Duration,
}

/// A pipe of at most `depth` chunks whose sends give up after `timeout` without progress,
/// holding `share` for what it buffers; returns its producing end and the response body.
pub fn pipe(depth: usize, timeout: Duration, share: Share) -> (PipeSender, Body) {
    let (sender, receiver) = mpsc::channel(depth.max(1));
    let shared = Arc::new(Shared {
        receiver: Mutex::new(receiver),
        abandoned: AtomicBool::new(false),
        share: Mutex::new(Some(share)),
    });
    let consumer = shared.clone();
    let mut ended = false;
    let stream = futures_util::stream::poll_fn(move |cx| {
        if ended {
            return Poll::Ready(None);
        }
        let mut receiver = consumer
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let polled = receiver.poll_recv(cx);
        drop(receiver);
        match polled {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item.map(Frame::data))),
            Poll::Ready(None) if consumer.abandoned.load(Ordering::SeqCst) => {
                ended = true;
                let error: BoxError = "the client took nothing for the send timeout".into();
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    (
        PipeSender {
            sender,
            shared,
            timeout,
        },
        body,
    )
}

impl PipeSender {
    /// Queues `item`; false once the client is gone or took nothing for the send timeout (the
    /// pipe is then abandoned).
    pub async fn send(&self, item: Item) -> bool {
        let sent = tokio::time::timeout(self.timeout, self.sender.send(item)).await;
        let open = matches!(sent, Ok(Ok(())));
        if !open {
            self.abandon();
        }
        open
    }

    /// Waits until the client has taken every queued chunk, each within the send timeout of
    /// the one before; false (and the pipe abandoned) when it does not.
    pub async fn finish(self) -> bool {
        loop {
            let free = self.sender.capacity();
            if free == self.sender.max_capacity() {
                return true;
            }
            let more = self.sender.reserve_many(free + 1);
            if !matches!(tokio::time::timeout(self.timeout, more).await, Ok(Ok(_))) {
                self.abandon();
                return false;
            }
        }
    }

    /// Drops whatever is queued and the memory charged for it; the body ends in an error.
    fn abandon(&self) {
        self.shared.abandoned.store(true, Ordering::SeqCst);
        let mut receiver = self
            .shared
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        receiver.close();
        while receiver.try_recv().is_ok() {}
        drop(receiver);
        self.shared
            .share
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::MemoryBudget;

    #[tokio::test]
    async fn a_stalled_pipe_is_emptied_and_its_share_returned() {
        let budget = MemoryBudget::new(1 << 20, Duration::from_secs(1));
        let share = budget
            .reserve(3 * CHUNK_BYTES as u64, "test")
            .await
            .unwrap();
        let (sender, mut body) = pipe(2, Duration::from_millis(50), share);
        assert!(sender.send(Ok(Bytes::from_static(b"one"))).await);
        assert!(sender.send(Ok(Bytes::from_static(b"two"))).await);
        assert_eq!(budget.available(), budget.total() - 3 * CHUNK_BYTES as u64);
        // Nobody reads: the third send times out, and the queue and share go at once.
        assert!(!sender.send(Ok(Bytes::from_static(b"three"))).await);
        assert_eq!(budget.available(), budget.total());
        let frame = body.frame().await.expect("an item");
        assert!(frame.is_err(), "the cut body ends in an error");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_read_pipe_ends_cleanly() {
        let budget = MemoryBudget::new(1 << 20, Duration::from_secs(1));
        let share = budget.reserve(1024, "test").await.unwrap();
        let (sender, body) = pipe(2, Duration::from_secs(5), share);
        let producer = tokio::spawn(async move {
            for chunk in [b"a", b"b", b"c"] {
                assert!(sender.send(Ok(Bytes::from_static(chunk))).await);
            }
            sender.finish().await
        });
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"abc");
        assert!(producer.await.unwrap());
        assert_eq!(budget.available(), budget.total());
    }
}
