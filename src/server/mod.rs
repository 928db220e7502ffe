//! `midas-serve serve`: the HTTP API on hyper and tokio.
//!
//! Start-up order is weights, backend, store check, warm-up, and only then the listening
//! socket, so "listening" means "ready". Requests are handled on the async runtime; decoding
//! and encoding run on blocking threads, the forward pass on the model's own thread.

mod budget;
mod connection;
pub mod error;
mod inference;
mod intake;
mod io;
mod metrics;
mod names;
mod openapi;
mod output;
mod page;
mod pipe;
mod predict;
mod predictions;
mod responses;
mod routes;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::budget::{MemoryBudget, resident_bytes};
use crate::config::ServeArgs;
use crate::lifecycle::{self, LoadError};
use crate::pipeline::{
    CloudOptions, DecodeLimits, LoadedModel, OutputFormat, RenderOptions, Transform,
};
use crate::storage::{Store, StoreError};
pub use inference::InferenceQueue;
pub use metrics::{Metrics, ModelLabels};
use midas_model::backend::AdapterInfo;
use midas_model::model::ModelKind;
use midas_model::weights::WeightsReport;

/// An error while streaming a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body: a full buffer or a stream of chunks.
pub type Body = BoxBody<Bytes, BoxError>;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model could not be made ready.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The store could not be opened.
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    /// The warm-up prediction failed.
    #[error("warm-up failed: {0}")]
    WarmUp(String),
    /// The settings contradict each other.
    #[error("invalid settings: {0}")]
    Config(String),
    /// The socket could not be bound, or a thread not started.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        error: std::io::Error,
    },
}

/// What the server knows about its model, for `/`, `/readyz` and response headers.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The network.
    pub kind: ModelKind,
    /// How images are prepared for it.
    pub transform: Transform,
    /// Backend name.
    pub backend: &'static str,
    /// For wgpu, the adapter.
    pub adapter: Option<AdapterInfo>,
    /// Weights provenance.
    pub weights: WeightsReport,
}

/// State shared by every request.
pub struct AppState {
    /// Settings.
    pub config: ServeArgs,
    /// Where uploads and predictions go.
    pub store: Store,
    /// The model's queue.
    pub queue: InferenceQueue,
    /// Metrics registry.
    pub metrics: Metrics,
    /// The model's description.
    pub model: ModelInfo,
    /// Limits every image is checked against before decoding.
    pub limits: DecodeLimits,
    /// Bounds how many images are decoded and rendered at once, to the CPUs there are.
    pub pixel_work: Semaphore,
    /// The bytes that request bodies, decoded images and rendered outputs may hold together.
    pub budget: MemoryBudget,
    /// True between warm-up and the start of shutdown; `/readyz` reports it.
    pub ready: AtomicBool,
    /// The welcome page, rendered once.
    pub page: String,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
    /// What a request that names no colour map or format gets.
    pub default_options: RenderOptions,
}

/// Starts the server and runs until SIGTERM or SIGINT (then drains and returns).
pub async fn run(config: ServeArgs) -> Result<(), ServerError> {
    let started = Instant::now();
    let loaded = lifecycle::load(&config.model, config.image.transform).await?;
    let store = Store::open(&config.store, config.store_timeout()).await?;
    tracing::info!(store = %store, "store ready");
    let limits = config.image.limits();
    // Seconds of compute on some backends: off the runtime's worker threads.
    tokio::task::block_in_place(|| warm_up(&loaded, &limits))?;
    let default_options = loaded.render_options(
        config.default_colormap,
        OutputFormat::default(),
        CloudOptions::default(),
    );
    let model = ModelInfo {
        kind: loaded.model.kind(),
        transform: loaded.transform,
        backend: loaded.backend.kind.name(),
        adapter: loaded.backend.adapter.clone(),
        weights: loaded.weights.clone(),
    };
    let metrics = Metrics::default();
    metrics
        .model
        .get_or_create(&ModelLabels {
            model: model.kind.name(),
            backend: model.backend,
            transform: model.transform.name(),
            untrained: if model.weights.untrained {
                "true"
            } else {
                "false"
            },
        })
        .set(1);
    let workers = match config.forward_workers {
        0 if model.kind == ModelKind::MidasV21Small256 => 2,
        0 => 1,
        workers => workers,
    };
    tracing::info!(workers, "forward workers");
    let (queue, _workers) = InferenceQueue::start(
        loaded.model,
        config.queue_size,
        config.max_batch,
        workers,
        metrics.clone(),
    )
    .map_err(|error| ServerError::Io {
        context: "cannot start the inference thread".into(),
        error,
    })?;
    let address = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|error| ServerError::Io {
            context: format!("cannot listen on {address}"),
            error,
        })?;
    let local = listener.local_addr().map_err(|error| ServerError::Io {
        context: "no local address".into(),
        error,
    })?;
    let page = page::render(&model, &store, &config);
    let openapi = openapi::render(&config);
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let budget = memory_budget(&config, &model)?;
    let state = Arc::new(AppState {
        store,
        queue,
        metrics,
        model,
        limits,
        pixel_work: Semaphore::new(workers),
        budget,
        ready: AtomicBool::new(true),
        page,
        openapi,
        default_options,
        config,
    });
    tracing::info!(addr = %local, startup_ms = started.elapsed().as_millis() as u64, "listening");
    serve(listener, state, shutdown_signal()).await;
    Ok(())
}

/// The memory budget: `--memory-budget`, or derived from the container's limit less what the
/// process holds now (the model, warmed up) and what its largest forward pass adds. The
/// largest image the limits allow, and the largest body, must each fit in it, or no request of
/// that size could ever run.
fn memory_budget(config: &ServeArgs, model: &ModelInfo) -> Result<MemoryBudget, ServerError> {
    let resident = crate::budget::resident_bytes();
    let forward = model.kind.forward_bytes_per_pixel()
        * crate::pipeline::max_input_pixels(model.kind, model.transform);
    let bytes = match config.memory_budget {
        Some(mib) => mib << 20,
        None => crate::budget::default_bytes(resident, forward),
    };
    let budget = MemoryBudget::new(bytes, config.memory_wait());
    // Rendering holds a band of rows, at most one row of the widest image the limit allows.
    let widest = u32::try_from(config.image.max_pixels).unwrap_or(u32::MAX);
    let worst_image = crate::budget::decode_bytes(config.image.max_pixels)
        .max(crate::pipeline::render_bytes(widest, 1));
    let largest = worst_image.max(config.max_body_bytes);
    if largest > budget.total() {
        return Err(ServerError::Config(format!(
            "the memory budget of {} MiB cannot hold one image at --max-pixels {} ({} MiB) or \
             one body at --max-body-bytes ({} MiB); give the container more memory, set \
             --memory-budget, or lower the limits",
            budget.total() >> 20,
            config.image.max_pixels,
            worst_image >> 20,
            config.max_body_bytes >> 20
        )));
    }
    tracing::info!(
        budget_mib = budget.total() >> 20,
        resident_mib = resident >> 20,
        forward_reserve_mib = forward >> 20,
        "memory budget for request bodies and pixels"
    );
    Ok(budget)
}

/// Every step of a prediction once, so the first request does not pay for lazy
/// initialisation (thread pools, the kernels' buffers, shader compilation on wgpu): a 640x480
/// image decoded and pre-processed, a forward pass at the smallest input (DPT-Hybrid's full-size
/// pass would hold readiness back by seconds), its output rendered at 640x480.
fn warm_up(loaded: &LoadedModel, limits: &DecodeLimits) -> Result<(), ServerError> {
    let started = Instant::now();
    let image = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| ServerError::WarmUp(e.to_string()))?;
    let decoded =
        crate::pipeline::decode(&png, limits).map_err(|e| ServerError::WarmUp(e.to_string()))?;
    loaded.preprocess(&decoded);
    let side = 2 * loaded.model.kind().input_multiple();
    let depth = loaded
        .model
        .depth(crate::pipeline::NetInput {
            width: side,
            height: side,
            data: vec![0.5; 3 * side * side],
        })
        .map_err(|e| ServerError::WarmUp(e.to_string()))?;
    let chunks = crate::pipeline::render(&depth, (640, 480), RenderOptions::default(), None)
        .map_err(|e| ServerError::WarmUp(e.to_string()))?;
    for chunk in chunks {
        chunk.map_err(|e| ServerError::WarmUp(e.to_string()))?;
    }
    tracing::info!(ms = started.elapsed().as_millis() as u64, "warm-up done");
    Ok(())
}

/// Resolves on SIGTERM (Cloud Run's stop signal) or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting, marks the server not
/// ready and gives in-flight requests the grace period to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let (drain, draining) = tokio::sync::watch::channel(false);
    let settings = ConnectionSettings {
        builder: protocols(&state.config),
        send_timeout: state.config.send_timeout(),
        deadlines: connection::Deadlines {
            first_request: state.config.header_timeout(),
            idle: state.config.idle_timeout(),
            drain: state.config.grace_period(),
        },
        signals: connection::Signals {
            draining,
            reclaim: Arc::new(tokio::sync::Notify::new()),
        },
    };
    let slots = Arc::new(Semaphore::new(state.config.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = connection_slot(&slots, &settings.signals, &mut connections, &mut shutdown);
        let Some(slot) = slot.await else {
            break;
        };
        let connection = settings.serve(&state, stream, peer);
        connections.spawn(async move {
            connection.await;
            drop(slot);
        });
    }
    state.ready.store(false, Ordering::SeqCst);
    drop(listener);
    let grace = state.config.grace_period();
    tracing::info!(
        grace_secs = grace.as_secs(),
        "draining: no new connections, waiting for in-flight requests"
    );
    let _ = drain.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    // Each connection closes itself within the grace period; the margin covers the last goodbye.
    match tokio::time::timeout(grace + std::time::Duration::from_secs(1), drained).await {
        Ok(()) => tracing::info!("all connections closed; exiting"),
        Err(_) => {
            tracing::warn!("grace period over; closing the remaining connections");
            connections.shutdown().await;
        }
    }
}

/// What every connection is served with.
struct ConnectionSettings {
    builder: auto::Builder<TokioExecutor>,
    send_timeout: std::time::Duration,
    deadlines: connection::Deadlines,
    signals: connection::Signals,
}

impl ConnectionSettings {
    /// Serves one accepted connection to its end: every request through the router, each
    /// counted in flight until its response body is done, under the connection's deadlines.
    fn serve(
        &self,
        state: &Arc<AppState>,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        let activity = connection::Activity::new(state.config.max_uploads_per_connection);
        let service = {
            let (state, activity) = (state.clone(), activity.clone());
            service_fn(move |request| {
                let (state, activity) = (state.clone(), activity.clone());
                let busy = activity.enter();
                async move {
                    let response = routes::handle(state, request, peer, &activity).await;
                    Ok::<_, Infallible>(response.map(|body| busy.track(body)))
                }
            })
        };
        let io = TokioIo::new(io::ServerIo::new(stream, self.send_timeout));
        let conn = self.builder.serve_connection(io, service).into_owned();
        let (deadlines, signals) = (self.deadlines, self.signals.clone());
        async move {
            let close = |conn: Pin<&mut _>| auto::Connection::graceful_shutdown(conn);
            if let Err(error) = connection::drive(conn, close, activity, deadlines, signals).await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        }
    }
}

/// hyper's settings for both protocols. HTTP/1.1 heads are bounded in time by hyper; HTTP/2
/// gets keep-alive pings (a peer that stops answering them is dropped), a cap on open streams
/// and a small send buffer per stream. Connection deadlines common to both live in
/// [`connection`].
fn protocols(config: &ServeArgs) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A head above --max-header-bytes gets the router's JSON 431; one beyond hyper's own read
    // buffer (about 400 KiB) is cut off by hyper, and answered in JSON by [`io::ServerIo`].
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(config.max_streams_per_connection.max(1))
        .max_send_buf_size(pipe::CHUNK_BYTES)
        // Above our own limit, so the router answers an oversized head with its JSON 431;
        // only a head beyond this gets h2's bare refusal.
        .max_header_list_size(H2_MAX_HEADER_LIST);
    builder
}

/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const H2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest HTTP/2 header list h2 decodes (the router refuses anything above
/// `--max-header-bytes` with a JSON 431 first).
const H2_MAX_HEADER_LIST: u32 = 256 * 1024;

/// A free connection slot for a connection just accepted, reaping finished connections
/// meanwhile; at the cap, idle connections are asked (every second while it lasts) to make
/// room for it. `None` on shutdown.
async fn connection_slot(
    slots: &Arc<Semaphore>,
    signals: &connection::Signals,
    connections: &mut tokio::task::JoinSet<()>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        while connections.try_join_next().is_some() {}
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        signals.reclaim.notify_waiters();
        tokio::select! {
            slot = slots.clone().acquire_owned() => return slot.ok(),
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = shutdown.as_mut() => return None,
        }
    }
}
