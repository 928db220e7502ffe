//! Every setting, as one typed tree filled from command-line flags and environment variables.
//! `midas-serve --help` (and each subcommand's `--help`) is generated from the doc comments here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fetch::{FetchError, UPSTREAM_RELEASES, WeightsLocation};
use crate::pipeline::{
    CloudDefaults, CloudOptionError, CloudOptions, Colormap, DecodeLimits, OutputFormat, Transform,
};
use midas_model::backend::BackendKind;
use midas_model::model::ModelKind;

/// Depth maps from photos with MiDaS (v2.1 small or v3.0 DPT-Hybrid), on Burn.
#[derive(Parser, Debug)]
#[command(name = "midas-serve", version, about, long_about = None)]
pub struct Cli {
    /// Log format: `json` (one object per line), `text`, or `auto` (text on a terminal, else JSON).
    #[arg(long, env = "MIDAS_LOG_FORMAT", default_value = "auto", global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the raw network on a normalised float32 [N,3,H,W] .npy tensor and write [N,H,W].
    Forward(ForwardArgs),
    /// Write the depth map the service would return for each image file.
    Predict(PredictArgs),
    /// Serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Write the depth map of every image under a directory or bucket prefix, as one task of
    /// a sharded job (a Cloud Run job's tasks share the work by CLOUD_RUN_TASK_INDEX/COUNT).
    Batch(Box<BatchArgs>),
}

/// Which model runs, and where.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Weights: a file path, an https:// URL or gs://bucket/object; PyTorch .pt/.pth/.ckpt (a
    /// PyTorch Lightning checkpoint too), .safetensors (upstream MiDaS keys) or .bpk from
    /// model-import. The network is recognised from the keys. A published file's name
    /// (midas_v21_small_256, dpt_hybrid_384, depth_anything_v2_vits,
    /// depth_anything_v2_metric_vkitti_vits, ...) fetches upstream's weights once into the cache. Without it the untrained deterministic model runs, and every output
    /// says so. An empty value counts as absent (deployment templates often set the variable
    /// to "").
    #[arg(long, env = "MIDAS_WEIGHTS", value_parser = parse_location)]
    pub weights: Option<OptionalLocation>,
    /// Where weights named by file are downloaded from: upstream's downloads (MiDaS's GitHub
    /// releases, Depth Anything's Hugging Face repositories), or one mirror holding the same
    /// paths (v2_1/midas_v21_small_256.pt, v3/dpt_hybrid_384.pt,
    /// Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth, ...).
    #[arg(long, env = "MIDAS_WEIGHTS_MIRROR", default_value = UPSTREAM_RELEASES)]
    pub weights_mirror: String,
    /// Expected sha256 (hex) of the weights file; a mismatch stops start-up. Empty: no pin.
    #[arg(long, env = "MIDAS_WEIGHTS_SHA256")]
    pub weights_sha256: Option<String>,
    /// Prefix to strip from every state-dict key (detected automatically when absent; give ""
    /// for none).
    #[arg(long, env = "MIDAS_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// The network. Recognised from the weights' keys when absent (then an error if they are
    /// another network's); without weights, the untrained model of this kind
    /// [default: midas_v21_small_256].
    #[arg(long = "model", env = "MIDAS_MODEL", value_parser = parse_model)]
    pub kind: Option<OptionalModel>,
    /// A metric Depth Anything V2 model's largest depth in metres (upstream's max_depth: 20 for
    /// the Hypersim fine-tunes, 80 for the VKITTI ones). Read from the weights file's name when
    /// it names the data set; required for a metric model otherwise.
    #[arg(long, env = "MIDAS_MAX_DEPTH", value_parser = parse_max_depth)]
    pub max_depth: Option<f32>,
    /// Backend that runs the network.
    #[arg(long, env = "MIDAS_BACKEND", default_value_t = default_backend())]
    pub backend: BackendKind,
    /// Directory for downloaded weights [default: $XDG_CACHE_HOME/midas-serve or ~/.cache/midas-serve].
    #[arg(long, env = "MIDAS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// A `--model` value, or none for an empty one (recognise from the weights).
#[derive(Clone, Copy, Debug)]
pub struct OptionalModel(Option<ModelKind>);

fn parse_model(text: &str) -> Result<OptionalModel, String> {
    if text.is_empty() {
        return Ok(OptionalModel(None));
    }
    ModelKind::from_str(text, false).map(|kind| OptionalModel(Some(kind)))
}

fn parse_max_depth(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a positive number of metres")),
    }
}

/// A weights location, or none for an empty value.
#[derive(Clone, Debug)]
pub struct OptionalLocation(Option<WeightsLocation>);

fn parse_location(text: &str) -> Result<OptionalLocation, String> {
    if text.is_empty() {
        return Ok(OptionalLocation(None));
    }
    text.parse()
        .map(|location| OptionalLocation(Some(location)))
        .map_err(|e: FetchError| e.to_string())
}

/// flex where it is compiled in (the fastest CPU backend), else the first backend there is.
fn default_backend() -> BackendKind {
    let compiled = BackendKind::compiled();
    if compiled.contains(&BackendKind::Flex) {
        BackendKind::Flex
    } else {
        compiled.first().copied().unwrap_or(BackendKind::Flex)
    }
}

impl ModelArgs {
    /// The network asked for with `--model`, if any.
    pub fn requested_model(&self) -> Option<ModelKind> {
        self.kind.and_then(|kind| kind.0)
    }

    /// Where the weights come from, if anywhere (a model's name resolved to its download).
    pub fn location(&self) -> Option<WeightsLocation> {
        let location = self.weights.as_ref().and_then(|w| w.0.clone())?;
        Some(location.resolve_named(&self.weights_mirror))
    }

    /// The pinned sha256, if one was given.
    pub fn sha256_pin(&self) -> Option<String> {
        self.weights_sha256.clone().filter(|pin| !pin.is_empty())
    }

    /// The download cache directory, resolved.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("midas-serve")
    }
}

/// `midas-serve forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input tensor: float32 [N,3,H,W], already normalised, H and W multiples of 32 (16 for
    /// dpt_hybrid_384, 14 for Depth Anything V2).
    #[arg(long)]
    pub input: PathBuf,
    /// Output tensor: float32 [N,H,W], the raw network output.
    #[arg(long)]
    pub output: PathBuf,
    /// Time N forward passes after one warm-up and print a JSON summary on stdout.
    #[arg(long)]
    pub repeat: Option<usize>,
}

/// The image settings `predict`, `serve` and `batch` share.
#[derive(Args, Debug, Clone)]
pub struct ImageArgs {
    /// Pre-processing: each model's official MiDaS transform, or `squash` (the replaced
    /// service's: squashed to the model's square size, Pillow-style bilinear in 8 bits, scaled
    /// to [0, 1], not normalised), which its fine-tuned weights expect.
    #[arg(long, env = "MIDAS_TRANSFORM", default_value = "upstream")]
    pub transform: Transform,
    /// Largest image, in pixels (width x height), checked on the header before decoding (413
    /// from the server).
    #[arg(long, env = "MIDAS_MAX_PIXELS", default_value_t = 24_000_000)]
    pub max_pixels: u64,
    /// Largest ratio of an image's longer side to its shorter, checked on the header (0: any).
    #[arg(long, env = "MIDAS_MAX_ASPECT_RATIO", default_value_t = crate::pipeline::DEFAULT_MAX_ASPECT_RATIO)]
    pub max_aspect_ratio: u32,
}

impl ImageArgs {
    /// The limits every image is checked against before it is decoded.
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.max_pixels,
            max_aspect_ratio: self.max_aspect_ratio,
        }
    }
}

/// Point clouds' defaults and bounds, for `predict`, `serve` and `batch`.
#[derive(Args, Debug, Clone)]
pub struct CloudArgs {
    /// Horizontal field of view of a point cloud's camera, in degrees, when neither the request
    /// (fx/fy, fov) nor the image's EXIF (FocalLengthIn35mmFilm) gives it.
    #[arg(long, env = "MIDAS_DEFAULT_FOV", default_value_t = crate::pipeline::DEFAULT_FOV_DEGREES)]
    pub default_fov: f64,
    /// Vertices of a point cloud when the request does not say (a grid that keeps the aspect).
    #[arg(long, env = "MIDAS_DEFAULT_POINTS", default_value_t = 250_000)]
    pub default_points: u64,
    /// The most vertices a point cloud may have.
    #[arg(long, env = "MIDAS_MAX_POINTS", default_value_t = 2_000_000)]
    pub max_points: u64,
}

impl CloudArgs {
    /// The defaults and bounds.
    pub fn defaults(&self) -> CloudDefaults {
        CloudDefaults {
            fov: self.default_fov,
            points: self.default_points.min(self.max_points),
            max_points: self.max_points,
        }
    }
}

/// A point cloud's parameters on the command line, as `--cloud NAME=VALUE` (repeated), named as
/// the server's query parameters: fx, fy, cx, cy, fov, near, far, scale, shift, points, edges.
#[derive(Args, Debug, Clone)]
pub struct CloudParams {
    /// The defaults and bounds.
    #[command(flatten)]
    pub limits: CloudArgs,
    /// One point-cloud parameter for `--format ply`, e.g. `--cloud fov=70 --cloud points=100000`.
    #[arg(long = "cloud", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
}

impl CloudParams {
    /// The defaults and bounds.
    pub fn defaults(&self) -> CloudDefaults {
        self.limits.defaults()
    }

    /// The parameters, checked.
    pub fn options(&self) -> Result<CloudOptions, CloudOptionError> {
        let mut options = CloudOptions::default();
        for param in &self.params {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            if !options.set(name, value)? {
                return Err(CloudOptionError {
                    parameter: "cloud",
                    message: format!(
                        "unknown parameter {name:?}; use {}",
                        CloudOptions::NAMES.join(", ")
                    ),
                });
            }
        }
        options.validate(&self.defaults())?;
        Ok(options)
    }
}

/// `midas-serve predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// How images are read and prepared.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Directory the results are written to, as `<file stem>.<png|npy>`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Colour map of the PNG output.
    #[arg(long, default_value = "inferno")]
    pub colormap: Colormap,
    /// Output: colourised PNG, 16-bit grey PNG, raw float32 .npy or a PLY point cloud.
    #[arg(long, default_value = "png")]
    pub format: OutputFormat,
    /// Point clouds (`--format ply`).
    #[command(flatten)]
    pub cloud: CloudParams,
    /// JPEG, PNG or WebP images.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `midas-serve serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// How images are read and prepared.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Colour map when a request names none (`viridis` answers like the replaced service).
    #[arg(long, env = "MIDAS_DEFAULT_COLORMAP", default_value = "inferno")]
    pub default_colormap: Colormap,
    /// Point clouds (`format=ply`).
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// Address to listen on.
    #[arg(long, env = "MIDAS_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (Cloud Run sets PORT).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where uploads and predictions are stored: a directory (a mounted bucket or plain disk),
    /// or gs://BUCKET[/PREFIX] through the Cloud Storage API (honours STORAGE_EMULATOR_HOST).
    #[arg(long, env = "MIDAS_STORE", default_value = "./data")]
    pub store: String,
    /// Largest request body, in bytes (413 above).
    #[arg(long, env = "MIDAS_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: u64,
    /// Requests waiting for the model beyond the one running; when full, 503 with Retry-After.
    #[arg(long, env = "MIDAS_QUEUE_SIZE", default_value_t = 16)]
    pub queue_size: usize,
    /// Most inputs run through the network together when requests queue up (1 disables batching).
    #[arg(long, env = "MIDAS_MAX_BATCH", default_value_t = 1)]
    pub max_batch: usize,
    /// Forward passes run at once when requests queue up, sharing the model and the CPU threads
    /// (0: two for MiDaS small, whose passes leave threads waiting on their narrow layers, one
    /// for the larger models, whose activations take hundreds of MB a pass).
    #[arg(long, env = "MIDAS_FORWARD_WORKERS", default_value_t = 0)]
    pub forward_workers: usize,
    /// Most simultaneous connections; further ones wait in the kernel's accept queue, and
    /// connections with no request in flight are asked to close to make room for them.
    #[arg(long, env = "MIDAS_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a client may take to send its request headers; also how long a new connection
    /// (HTTP/1.1 or HTTP/2) may stay without a request before it is closed.
    #[arg(long, env = "MIDAS_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a connection that has served requests may stay without one in flight before it
    /// is closed (HTTP/1.1 keep-alive and HTTP/2 alike).
    #[arg(long, env = "MIDAS_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Most HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "MIDAS_MAX_STREAMS_PER_CONNECTION", default_value_t = 32)]
    pub max_streams_per_connection: u32,
    /// Most uploads (`POST /predict`) one connection may have in flight at once; more are
    /// refused with 429, so one HTTP/2 connection cannot take the whole memory budget.
    #[arg(long, env = "MIDAS_MAX_UPLOADS_PER_CONNECTION", default_value_t = 4)]
    pub max_uploads_per_connection: usize,
    /// Seconds a whole request may take, upload included (408 or 504 after).
    #[arg(long, env = "MIDAS_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM (Cloud Run allows 10).
    #[arg(long, env = "MIDAS_GRACE_PERIOD_SECS", default_value_t = 8)]
    pub grace_period_secs: u64,
    /// Seconds a single storage call may take before it counts as failed (504 store_timeout).
    #[arg(long, env = "MIDAS_STORE_TIMEOUT_SECS", default_value_t = 30)]
    pub store_timeout_secs: u64,
    /// Seconds a client may leave the response unread before it counts as gone: the
    /// connection is closed and the prediction is still stored.
    #[arg(long, env = "MIDAS_SEND_TIMEOUT_SECS", default_value_t = 30)]
    pub send_timeout_secs: u64,
    /// Largest request head (request line and headers), in bytes (431 above).
    #[arg(long, env = "MIDAS_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// MiB that decoded and rendered images of all requests may hold together; a request
    /// waits for its share (up to --memory-wait-secs, then 503). Default: the container's
    /// memory limit (cgroup memory.max) minus what the model holds after warm-up, or 1024
    /// where there is no limit.
    #[arg(long, env = "MIDAS_MEMORY_BUDGET")]
    pub memory_budget: Option<u64>,
    /// Seconds a request may wait for its share of the memory budget (503 after).
    #[arg(long, env = "MIDAS_MEMORY_WAIT_SECS", default_value_t = 10)]
    pub memory_wait_secs: u64,
}

impl ServeArgs {
    /// `--send-timeout-secs` as a duration.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_secs)
    }

    /// `--memory-wait-secs` as a duration.
    pub fn memory_wait(&self) -> Duration {
        Duration::from_secs(self.memory_wait_secs)
    }

    /// `--header-timeout-secs` as a duration.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    /// `--idle-timeout-secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// `--request-timeout-secs` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// `--grace-period-secs` as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    /// `--store-timeout-secs` as a duration.
    pub fn store_timeout(&self) -> Duration {
        Duration::from_secs(self.store_timeout_secs)
    }
}

/// `midas-serve batch`.
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// How images are read and prepared.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Images to read: a directory or gs://BUCKET[/PREFIX], listed recursively (files with a
    /// .jpg/.jpeg/.png/.webp extension).
    #[arg(long, env = "MIDAS_BATCH_INPUT")]
    pub input: String,
    /// Where results go: a directory or gs://BUCKET[/PREFIX]. `a/b.jpg` under the input becomes
    /// `a/b.png` (or the format's extension) here; each task's manifest goes to `_manifests/`.
    #[arg(long, env = "MIDAS_BATCH_OUTPUT")]
    pub output: String,
    /// Colour map of the PNG output.
    #[arg(long, env = "MIDAS_COLORMAP", default_value = "inferno")]
    pub colormap: Colormap,
    /// Output: colourised PNG, 16-bit grey PNG, raw float32 .npy or a PLY point cloud.
    #[arg(long, env = "MIDAS_FORMAT", default_value = "png")]
    pub format: OutputFormat,
    /// Point clouds (`--format ply`).
    #[command(flatten)]
    pub cloud: CloudParams,
    /// This task's number, from 0 (Cloud Run jobs set CLOUD_RUN_TASK_INDEX).
    #[arg(long, env = "CLOUD_RUN_TASK_INDEX", default_value_t = 0)]
    pub task_index: usize,
    /// How many tasks share the input (Cloud Run jobs set CLOUD_RUN_TASK_COUNT).
    #[arg(long, env = "CLOUD_RUN_TASK_COUNT", default_value_t = 1)]
    pub task_count: usize,
    /// Largest input file, in bytes; larger ones are recorded as refused without being read.
    #[arg(long, env = "MIDAS_MAX_INPUT_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_input_bytes: u64,
    /// MiB that files being read and decoded images in flight may hold together; the pipeline
    /// waits rather than exceed it (an image larger than the whole budget runs alone).
    #[arg(long, env = "MIDAS_BATCH_MEMORY_BUDGET", default_value_t = 512)]
    pub memory_budget: u64,
    /// Files read from the store at once.
    #[arg(long, env = "MIDAS_BATCH_READERS", default_value_t = 4)]
    pub readers: usize,
    /// Forward passes run at once, sharing the model; the CPU threads are split between them
    /// (0: one per CPU thread, each pass single-threaded, which keeps every core busy).
    #[arg(long, env = "MIDAS_BATCH_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Most same-sized images one forward pass takes, from those already decoded (on CPU a
    /// batch costs what its images cost one by one; a GPU gains from it).
    #[arg(long, env = "MIDAS_MAX_BATCH", default_value_t = 1)]
    pub max_batch: usize,
    /// Seconds a single storage call may take before it counts as failed.
    #[arg(long, env = "MIDAS_STORE_TIMEOUT_SECS", default_value_t = 30)]
    pub store_timeout_secs: u64,
    /// Progress display: a bar on a terminal and JSON log lines otherwise (`auto`), or either.
    #[arg(long, env = "MIDAS_PROGRESS", default_value = "auto")]
    pub progress: ProgressMode,
}

/// How `batch` shows its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when standard error is a terminal, log lines otherwise.
    Auto,
    /// A progress bar on standard error.
    Bar,
    /// A log line every few seconds.
    Log,
}

impl BatchArgs {
    /// `--store-timeout-secs` as a duration.
    pub fn store_timeout(&self) -> Duration {
        Duration::from_secs(self.store_timeout_secs)
    }
}
