//! One accepted connection, kept under deadlines that hold for HTTP/1.1 and HTTP/2 alike.
//!
//! hyper bounds the time an HTTP/1.1 client takes to send a request head, but nothing bounds
//! an HTTP/2 connection that sent only its preface, or headers without END_HEADERS, or that
//! simply stays: each would hold one of `--max-connections` for as long as its peer likes.
//! So every connection here, whatever its protocol, is closed when it has had no request in
//! flight for the header timeout (before its first request) or the idle timeout (after), and
//! when the server is at its connection cap, connections with no request in flight are asked
//! to close to make room. A request counts as in flight from the moment hyper hands it to the
//! service until its response body has been sent or dropped.
//!
//! The connection also carries the cap on its concurrent uploads, so that one HTTP/2
//! connection's streams cannot take the whole memory budget from the others.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use super::{Body, BoxError};

/// How long a connection asked to close for being idle may take to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What one connection is doing, shared by its requests and its watchdog.
pub struct Activity {
    in_flight: AtomicUsize,
    /// Whether a request has arrived yet (the header timeout applies until then).
    served: AtomicBool,
    /// When the last request in flight ended (or the connection was accepted).
    idle_since: Mutex<Instant>,
    /// Woken when the connection goes idle, so the watchdog arms its deadline.
    went_idle: Notify,
    /// Permits for this connection's concurrent uploads.
    uploads: Arc<Semaphore>,
}

impl Activity {
    /// A connection accepted now, allowed `max_uploads` uploads at once.
    pub fn new(max_uploads: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            went_idle: Notify::new(),
            uploads: Arc::new(Semaphore::new(max_uploads.max(1))),
        })
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn enter(self: &Arc<Self>) -> Busy {
        self.served.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// An upload's place on this connection, or `None` when all are taken.
    pub fn upload_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.uploads.clone().try_acquire_owned().ok()
    }

    /// Whether no request is in flight.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// When the connection is to be closed for idleness; `None` while a request is in flight.
    fn deadline(&self, deadlines: &Deadlines) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let allowed = if self.served.load(Ordering::SeqCst) {
            deadlines.idle
        } else {
            deadlines.first_request
        };
        Some(since + allowed)
    }
}

/// A request in flight on a connection; see [`Activity::enter`].
pub struct Busy(Arc<Activity>);

impl Busy {
    /// `body`, keeping this request in flight until it has been sent or dropped.
    pub fn track(self, body: Body) -> Body {
        Tracked { body, _busy: self }.boxed()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self
                .0
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
            self.0.went_idle.notify_one();
        }
    }
}

/// A response body that holds its request's [`Busy`].
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a connection may go without a request in flight.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// Before its first request (`--header-timeout-secs`).
    pub first_request: Duration,
    /// After it has served one (`--idle-timeout-secs`).
    pub idle: Duration,
    /// How long in-flight requests get once the server drains (`--grace-period-secs`).
    pub drain: Duration,
}

/// What tells a connection to close besides its own deadlines.
#[derive(Clone)]
pub struct Signals {
    /// Turns true when the server starts draining.
    pub draining: watch::Receiver<bool>,
    /// Notified when the server is at its connection cap: idle connections close.
    pub reclaim: Arc<Notify>,
}

/// Why a connection was asked to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    Idle,
    Reclaimed,
    Draining,
}

/// Runs `connection` until it ends or must close; `close` starts its graceful close (hyper's
/// `graceful_shutdown`), after which it gets a bounded time to finish.
pub async fn drive<C, E>(
    connection: C,
    close: impl FnOnce(Pin<&mut C>),
    activity: Arc<Activity>,
    deadlines: Deadlines,
    mut signals: Signals,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    let reason = loop {
        let deadline = activity.deadline(&deadlines);
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => return result,
            () = expired => {
                if activity.deadline(&deadlines).is_some_and(|d| d <= Instant::now()) {
                    break Close::Idle;
                }
            }
            () = activity.went_idle.notified() => {}
            () = signals.reclaim.notified() => {
                if activity.is_idle() {
                    break Close::Reclaimed;
                }
            }
            _ = signals.draining.wait_for(|draining| *draining) => break Close::Draining,
        }
    };
    tracing::debug!(?reason, "closing a connection");
    close(connection.as_mut());
    let grace = if reason == Close::Draining {
        deadlines.drain
    } else {
        CLOSE_GRACE
    };
    // A peer that does not take the goodbye is cut off: dropping the connection closes it.
    tokio::time::timeout(grace, connection)
        .await
        .unwrap_or(Ok(()))
}
