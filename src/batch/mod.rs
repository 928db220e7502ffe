//! `midas-serve batch`: the depth map of every image under a directory or bucket prefix, as one
//! task of a job. Cloud Run jobs run the tasks and retry failed ones; this module only makes a
//! task's work deterministic, restartable and fast:
//!
//! - **Sharded by the listing**: every task lists the same input and takes every `count`-th
//!   image in name order ([`plan`]).
//! - **Exactly once**: an output already there is skipped, and outputs are committed the way
//!   the server commits its objects (temporary file and no-clobber rename; `ifGenerationMatch=0`
//!   on Cloud Storage), so a task killed at any moment leaves no partial output and its retry
//!   redoes only what is missing.
//! - **Bad inputs recorded, not fatal**: a corrupt or refused image gets a manifest line; only
//!   a transient failure (store, device) makes the task fail, after which it stops taking work.
//! - **Pipelined**: reads, decodes, forward passes, encodes and writes overlap through bounded
//!   stages, and a memory budget bounds the files and pixels in flight.

mod manifest;
mod plan;
mod progress;

pub use manifest::{MANIFEST_DIR, Record, Status, Summary, Task, Timings};
pub use plan::{Plan, Work};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::budget::{MemoryBudget, Share, decode_bytes};
use crate::config::BatchArgs;
use crate::lifecycle::{self, LoadError};
use crate::pipeline::{
    CloudDefaults, CloudOptionError, DecodeError, DecodeLimits, DepthMap, LoadedModel, NetInput,
    PointSamples, RenderError, RenderOptions, decode_checked, point_samples, preprocess, probe,
    render,
};
use crate::storage::{Store, StoreError};
use progress::Progress;

/// Outputs encoded at once.
const ENCODERS: usize = 2;

/// Why a task could not run.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The task index or count is impossible.
    #[error("task {index} of {count}: the index must be below the count, and the count above 0")]
    InvalidTask {
        /// `--task-index`.
        index: usize,
        /// `--task-count`.
        count: usize,
    },
    /// The input could not be opened or listed.
    #[error("input {spec}: {source}")]
    Input {
        /// The input as given.
        spec: String,
        /// What went wrong.
        source: StoreError,
    },
    /// The output could not be opened or listed.
    #[error("output {spec}: {source}")]
    Output {
        /// The output as given.
        spec: String,
        /// What went wrong.
        source: StoreError,
    },
    /// Outputs would land beside the inputs with the same names.
    #[error("the output {0} is the input itself: give a separate directory or prefix")]
    SameLocation(String),
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A `--cloud` parameter is wrong.
    #[error("--cloud {0}")]
    Cloud(#[from] CloudOptionError),
    /// The forward passes' threads could not be started.
    #[error("cannot start the forward threads: {0}")]
    Threads(String),
    /// The manifest could not be written.
    #[error("the manifest {name} could not be written: {source}")]
    Manifest {
        /// Its object name.
        name: String,
        /// What went wrong.
        source: StoreError,
    },
}

/// Runs one task to its end and returns its summary (also written as the manifest's last line).
pub async fn run(args: &BatchArgs) -> Result<Summary, BatchError> {
    let started = Instant::now();
    let task = Task {
        index: args.task_index,
        count: args.task_count,
    };
    if task.count == 0 || task.index >= task.count {
        return Err(BatchError::InvalidTask {
            index: task.index,
            count: task.count,
        });
    }
    let (source, dest, plan) = plan_task(args, task).await?;
    let mut progress = Progress::new(args.progress, plan.len());
    for record in &plan.settled {
        progress.ended(record.status);
    }
    let (records, run_seconds) = if plan.work.is_empty() {
        (Vec::new(), 0.0)
    } else {
        let loaded = Arc::new(lifecycle::load(&args.model, args.image.transform).await?);
        let stages = Stages::new(args, source, dest.clone(), loaded)?;
        let run_started = Instant::now();
        let records = stages.run(plan.work.clone(), &mut progress).await;
        (records, run_started.elapsed().as_secs_f64())
    };
    progress.finish();
    let records = every_record(records, &plan);
    let mut summary = Summary::count(task, &records);
    summary.images_total = plan.images;
    summary.ignored_files = plan.ignored;
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.images_per_s = if run_seconds > 0.0 {
        summary.done as f64 / run_seconds
    } else {
        0.0
    };
    tracing::info!(
        summary = %serde_json::to_string(&summary).unwrap_or_default(),
        "task finished"
    );
    write_manifest(&dest, task, &records, &summary, args).await?;
    Ok(summary)
}

/// Opens the input and output and plans this task's share from their listings.
async fn plan_task(args: &BatchArgs, task: Task) -> Result<(Store, Store, Plan), BatchError> {
    let timeout = args.store_timeout();
    let input_error = |source| BatchError::Input {
        spec: args.input.clone(),
        source,
    };
    let output_error = |source| BatchError::Output {
        spec: args.output.clone(),
        source,
    };
    let source = Store::connect(&args.input, timeout)
        .await
        .map_err(input_error)?;
    let dest = Store::open(&args.output, timeout)
        .await
        .map_err(output_error)?;
    let exclude = source.prefix_of(&dest);
    if exclude.as_deref() == Some("") {
        return Err(BatchError::SameLocation(args.output.clone()));
    }
    let inputs = source.list().await.map_err(input_error)?;
    let existing: HashSet<String> = dest
        .list()
        .await
        .map_err(output_error)?
        .into_iter()
        .map(|listed| listed.name)
        .collect();
    let extension = args.format.extension();
    let plan = Plan::new(&inputs, exclude.as_deref(), extension, &existing, task);
    tracing::info!(
        input = %source,
        output = %dest,
        task = task.index,
        tasks = task.count,
        images = plan.images,
        in_task = plan.len(),
        to_run = plan.work.len(),
        settled = plan.settled.len(),
        ignored = plan.ignored,
        "planned"
    );
    Ok((source, dest, plan))
}

/// The records of the inputs that ran, of those settled from the listings, and of those never
/// reached (`not_started`), in the plan's order.
fn every_record(mut records: Vec<Record>, plan: &Plan) -> Vec<Record> {
    records.extend(plan.settled.iter().cloned());
    let ran: HashSet<usize> = records.iter().map(|r| r.position).collect();
    for work in plan.work.iter().filter(|w| !ran.contains(&w.position)) {
        records.push(Record::settled(
            work.position,
            &work.input,
            &work.output,
            work.size,
            Status::NotStarted,
            None,
        ));
    }
    records.sort_by_key(|r| r.position);
    records
}

/// Writes the manifest, bounded by the store timeout.
async fn write_manifest(
    dest: &Store,
    task: Task,
    records: &[Record],
    summary: &Summary,
    args: &BatchArgs,
) -> Result<(), BatchError> {
    let name = manifest::manifest_name(task, SystemTime::now());
    let text = Bytes::from(manifest::render(records, summary));
    let timeout = args.store_timeout();
    let write = async {
        let mut upload = dest.begin(&name);
        upload.write(text).await?;
        upload.finish().await
    };
    let result = match tokio::time::timeout(timeout, write).await {
        Ok(result) => result.map(drop),
        Err(_) => Err(StoreError::Timeout(timeout)),
    };
    result.map_err(|source| BatchError::Manifest {
        name: dest.object_key(&name),
        source,
    })?;
    tracing::info!(manifest = %dest.object_key(&name), "manifest written");
    Ok(())
}

/// One input on its way through the stages, with its manifest line filled in as it goes.
struct Item<T> {
    work: Work,
    record: Record,
    data: T,
}

/// An input that left the stages early, with why (boxed: the stages pass it along by value).
type Ended = Box<Record>;

/// An input between two stages: on its way, or ended.
type Flow<T> = Result<Item<T>, Ended>;

/// A file read, holding its share of the budget for files.
struct ReadFile {
    bytes: Bytes,
    _permit: Share,
}

/// A decoded image reduced to the network input, holding its share of the pixel budget.
struct Prepared {
    input: NetInput,
    kept: Kept,
}

/// What an image keeps from its decode to its stored output.
struct Kept {
    /// The upright image's size, the output's.
    original: (u32, u32),
    /// Its share of the pixel budget.
    permit: Share,
    /// A point cloud's colours and camera, taken from the decoded image.
    samples: Option<PointSamples>,
}

/// A depth map waiting to be encoded.
struct Inferred {
    depth: DepthMap,
    kept: Kept,
}

/// An encoded output waiting to be stored.
struct Encoded {
    chunks: Vec<Bytes>,
    _permit: Share,
}

/// What every stage shares.
struct Stages {
    source: Store,
    dest: Store,
    loaded: Arc<LoadedModel>,
    limits: DecodeLimits,
    options: RenderOptions,
    cloud: CloudDefaults,
    max_input_bytes: u64,
    readers: usize,
    /// One thread pool per concurrent forward pass, splitting the CPU threads between them: a
    /// pass on a pool of its own never waits at another pass's fork-join barriers, so the cores
    /// stay busy through each pass's serial stretches. A pool is taken for a pass and put back.
    pools: std::sync::Mutex<Vec<Arc<rayon::ThreadPool>>>,
    workers: usize,
    /// Most same-sized inputs one forward pass takes, from those already decoded.
    max_batch: usize,
    /// Files and pixels have budgets of their own: a file's share is returned once it is
    /// decoded, which needs a pixel share, which is returned by later stages that wait on
    /// neither; so waiting can never form a cycle.
    files: MemoryBudget,
    pixels: MemoryBudget,
    /// Set by the first transient failure: no new input is started after it.
    stopped: AtomicBool,
}

impl Stages {
    fn new(
        args: &BatchArgs,
        source: Store,
        dest: Store,
        loaded: Arc<LoadedModel>,
    ) -> Result<Self, BatchError> {
        let budget = args.memory_budget.max(1) << 20;
        // The global pool's size honours RAYON_NUM_THREADS and the CPU quota.
        let cpus = rayon::current_num_threads();
        let workers = match args.workers {
            0 => cpus,
            workers => workers,
        };
        let threads = (cpus / workers).max(1);
        let pools = (0..workers)
            .map(|worker| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |i| format!("forward-{worker}-{i}"))
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BatchError::Threads(e.to_string()))?;
        let options = loaded.render_options(args.colormap, args.format, args.cloud.options()?);
        tracing::info!(workers, threads_each = threads, "forward pools ready");
        Ok(Self {
            source,
            dest,
            loaded,
            limits: args.image.limits(),
            options,
            cloud: args.cloud.defaults(),
            max_input_bytes: args.max_input_bytes,
            readers: args.readers.max(1),
            pools: std::sync::Mutex::new(pools),
            workers,
            max_batch: args.max_batch.max(1),
            // A task waits for its shares as long as it takes (`take`), so no wait is set.
            files: MemoryBudget::new(budget / 4, Duration::ZERO),
            pixels: MemoryBudget::new(budget - budget / 4, Duration::ZERO),
            stopped: AtomicBool::new(false),
        })
    }

    /// Runs every input through read, decode, forward, encode and store, several at a time in
    /// each stage; returns a record for each input that was started.
    async fn run(&self, work: Vec<Work>, progress: &mut Progress) -> Vec<Record> {
        let mut records = Vec::with_capacity(work.len());
        let mut outputs = futures_util::stream::iter(work)
            .take_while(|_| std::future::ready(!self.stopped.load(Ordering::SeqCst)))
            .map(|work| self.read(work))
            .buffered(self.readers)
            .map(|item| async move { self.prepare(item?).await })
            .buffered(self.workers * self.max_batch)
            .ready_chunks(self.max_batch)
            .map(|items| self.forward(items))
            .buffer_unordered(self.workers)
            .flat_map(futures_util::stream::iter)
            .map(|item| async move { self.encode(item?).await })
            .buffer_unordered(ENCODERS)
            .map(|item| async move { self.store(item?).await })
            .buffer_unordered(self.readers);
        while let Some(record) = outputs.next().await {
            let record = record.unwrap_or_else(|ended| *ended);
            match record.status {
                Status::Done | Status::Skipped => tracing::debug!(
                    input = %record.input,
                    output = %self.dest.object_key(&record.output),
                    status = record.status.name(),
                    "stored"
                ),
                _ => tracing::warn!(
                    input = %record.input,
                    status = record.status.name(),
                    error = record.error.as_deref().unwrap_or(""),
                    message = record.message.as_deref().unwrap_or(""),
                    "input not done"
                ),
            }
            progress.ended(record.status);
            records.push(record);
        }
        records
    }

    /// Ends an item as failed (a refused input) or transient (after which the task stops).
    fn end<T>(&self, item: Item<T>, status: Status, code: &str, message: String) -> Ended {
        if status == Status::Transient {
            self.stopped.store(true, Ordering::SeqCst);
        }
        let mut record = item.record;
        record.status = status;
        record.error = Some(code.to_string());
        record.message = Some(message);
        Box::new(record)
    }

    /// A store failure on this item: refused inputs fail, anything else is transient.
    fn store_failure<T>(&self, item: Item<T>, error: StoreError) -> Ended {
        let (status, code) = match &error {
            StoreError::TooLarge { .. } => (Status::Failed, "too_large"),
            StoreError::NotFound(_) => (Status::Failed, "not_found"),
            StoreError::Unreadable { code, .. } => (Status::Failed, *code),
            StoreError::Timeout(_) => (Status::Transient, "store_timeout"),
            _ => (Status::Transient, "store_unavailable"),
        };
        self.end(item, status, code, error.to_string())
    }

    async fn read(&self, work: Work) -> Flow<ReadFile> {
        let record = Record::settled(
            work.position,
            &work.input,
            &work.output,
            work.size,
            Status::Done,
            None,
        );
        let item = Item {
            work,
            record,
            data: (),
        };
        let permit = self
            .files
            .take(item.work.size.min(self.max_input_bytes))
            .await;
        let started = Instant::now();
        match self
            .source
            .read(&item.work.input, self.max_input_bytes)
            .await
        {
            Ok(bytes) => {
                let mut item = item.with(ReadFile {
                    bytes,
                    _permit: permit,
                });
                item.record.input_bytes = item.data.bytes.len() as u64;
                item.record.timings.read_ms = millis(started);
                Ok(item)
            }
            Err(error) => Err(self.store_failure(item, error)),
        }
    }

    async fn prepare(&self, item: Item<ReadFile>) -> Flow<Prepared> {
        let started = Instant::now();
        // A complete file's probe always decides; `None` cannot come back, but is a refusal.
        let header = match probe(&item.data.bytes, true)
            .and_then(|header| header.ok_or(DecodeError::UnsupportedFormat))
        {
            Ok(header) => header,
            Err(error) => {
                return Err(self.end(item, Status::Failed, error.code(), error.to_string()));
            }
        };
        if let Err(error) = self.limits.check(&header) {
            return Err(self.end(item, Status::Failed, error.code(), error.to_string()));
        }
        let mut item = item;
        item.record.size = Some((header.width, header.height));
        let pixels = u64::from(header.width) * u64::from(header.height);
        let permit = self.pixels.take(decode_bytes(pixels)).await;
        let bytes = item.data.bytes.clone();
        let limits = self.limits;
        let (kind, transform) = (self.loaded.model.kind(), self.loaded.transform);
        let (options, cloud) = (self.options, self.cloud);
        let decoded = tokio::task::spawn_blocking(move || {
            let image = decode_checked(&bytes, &header, &limits)?;
            let samples = point_samples(&image, &bytes, &options, &cloud, kind);
            let input = preprocess(&image, kind, transform);
            Ok::<_, DecodeError>((input, image.dimensions(), samples))
        })
        .await;
        match decoded {
            Ok(Ok((input, original, samples))) => {
                // The upright size, which the output has (the header's, turned by EXIF).
                let mut item = item;
                item.record.size = Some(original);
                let mut item = item.with(Prepared {
                    input,
                    kept: Kept {
                        original,
                        permit,
                        samples,
                    },
                });
                item.record.timings.decode_ms = millis(started);
                Ok(item)
            }
            Ok(Err(error)) => Err(self.end(item, Status::Failed, error.code(), error.to_string())),
            Err(panic) => Err(self.end(item, Status::Transient, "internal", panic.to_string())),
        }
    }

    /// Runs the inputs that were ready together, one forward pass per input size, on a pool
    /// of its own; refused inputs pass through.
    async fn forward(&self, items: Vec<Flow<Prepared>>) -> Vec<Flow<Inferred>> {
        let mut results = Vec::with_capacity(items.len());
        let mut groups: Vec<Vec<Item<Prepared>>> = Vec::new();
        for item in items {
            let item = match item {
                Ok(item) => item,
                Err(ended) => {
                    results.push(Err(ended));
                    continue;
                }
            };
            let size = (item.data.input.width, item.data.input.height);
            match groups
                .iter_mut()
                .find(|group| (group[0].data.input.width, group[0].data.input.height) == size)
            {
                Some(group) => group.push(item),
                None => groups.push(vec![item]),
            }
        }
        // At most `workers` batches run at once (the stage's concurrency), so a pool is free;
        // without one the pass would run on the global pool.
        let pool = self
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        for group in groups {
            results.extend(self.forward_group(group, pool.clone()).await);
        }
        if let Some(pool) = pool {
            self.pools
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(pool);
        }
        results
    }

    /// One forward pass over same-sized inputs.
    async fn forward_group(
        &self,
        group: Vec<Item<Prepared>>,
        pool: Option<Arc<rayon::ThreadPool>>,
    ) -> Vec<Flow<Inferred>> {
        let started = Instant::now();
        let mut inputs = Vec::with_capacity(group.len());
        let mut rest = Vec::with_capacity(group.len());
        for item in group {
            let Prepared { input, kept } = item.data;
            inputs.push(input);
            rest.push((item.work, item.record, kept));
        }
        let loaded = self.loaded.clone();
        let result = tokio::task::spawn_blocking(move || match pool {
            Some(pool) => pool.install(|| loaded.model.depths(inputs)),
            None => loaded.model.depths(inputs),
        })
        .await;
        let forward_ms = millis(started);
        let items = rest.into_iter().map(|(work, mut record, kept)| {
            record.timings.forward_ms = forward_ms;
            (
                Item {
                    work,
                    record,
                    data: (),
                },
                kept,
            )
        });
        match result {
            Ok(Ok(depths)) => items
                .zip(depths)
                .map(|((item, kept), depth)| Ok(item.with(Inferred { depth, kept })))
                .collect(),
            Ok(Err(error)) => items
                .map(|(item, _)| {
                    Err(self.end(
                        item,
                        Status::Transient,
                        "inference_failed",
                        error.to_string(),
                    ))
                })
                .collect(),
            Err(panic) => items
                .map(|(item, _)| {
                    Err(self.end(item, Status::Transient, "internal", panic.to_string()))
                })
                .collect(),
        }
    }

    async fn encode(&self, item: Item<Inferred>) -> Flow<Encoded> {
        let started = Instant::now();
        let Item { work, record, data } = item;
        let Inferred { depth, kept } = data;
        let Kept {
            original,
            permit,
            samples,
        } = kept;
        let options = self.options;
        let result = tokio::task::spawn_blocking(move || {
            let chunks = render(&depth, original, options, samples)?;
            chunks
                .collect::<Result<Vec<Bytes>, _>>()
                .map_err(RenderError::from)
        })
        .await;
        let mut item = Item {
            work,
            record,
            data: (),
        };
        item.record.timings.encode_ms = millis(started);
        match result {
            Ok(Ok(chunks)) => Ok(item.with(Encoded {
                chunks,
                _permit: permit,
            })),
            // Rendering is deterministic: this input would fail again, so it is refused.
            Ok(Err(error)) => {
                Err(self.end(item, Status::Failed, "render_failed", error.to_string()))
            }
            Err(panic) => Err(self.end(item, Status::Transient, "internal", panic.to_string())),
        }
    }

    async fn store(&self, item: Item<Encoded>) -> Result<Record, Ended> {
        let started = Instant::now();
        let mut upload = self.dest.begin(&item.work.output);
        let mut result = Ok(());
        for chunk in &item.data.chunks {
            result = upload.write(chunk.clone()).await;
            if result.is_err() {
                break;
            }
        }
        let result = match result {
            Ok(()) => upload.finish().await,
            Err(error) => {
                upload.abort();
                Err(error)
            }
        };
        let mut item = item;
        item.record.timings.store_ms = millis(started);
        match result {
            Ok(size) => {
                let mut record = item.record;
                record.output_bytes = Some(size);
                Ok(record)
            }
            // Written meanwhile by another run of the same shard: exactly once still holds.
            Err(StoreError::Exists(_)) => {
                let mut record = item.record;
                record.status = Status::Skipped;
                Ok(record)
            }
            Err(error) => Err(self.store_failure(item, error)),
        }
    }
}

impl<T> Item<T> {
    /// The same input with the next stage's data.
    fn with<U>(self, data: U) -> Item<U> {
        Item {
            work: self.work,
            record: self.record,
            data,
        }
    }
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
