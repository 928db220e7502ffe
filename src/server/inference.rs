//! The model's own threads, fed by a bounded queue.
//!
//! The async runtime never runs a forward pass: handlers submit a job carrying a oneshot sender
//! and await the answer. A full queue refuses at once (the handler answers 503 with
//! `Retry-After`) instead of letting waits grow without bound, and a job whose client has gone
//! away is skipped without running. With `max_batch > 1`, jobs of the same input size that are
//! already waiting run through the network together. With `workers > 1`, as many forward
//! passes run at once, sharing the model: a pass that starts alone has every CPU thread, and
//! one that starts while another runs takes its worker's own share of them (a thread of two),
//! where no pass waits on another's slowest, narrowest layers. On two cores two MiDaS small
//! passes on a thread each ran 12 % more passes a second than passes one after the other on
//! both.
//!
//! A panic in a forward pass fails that batch only (each of its requests gets a 500) and the
//! thread goes on serving. Should the thread end anyway, the queue says so: submissions fail
//! as "model unavailable" rather than "queue full", and the health routes turn 503 so the
//! platform replaces the instance.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use midas_model::engine::{DepthMap, DepthModel, InferenceError, NetInput};

/// A forward pass's result and how long it waited and ran.
#[derive(Debug)]
pub struct Inference {
    /// The depth map.
    pub depth: DepthMap,
    /// Time between submission and the start of the forward pass.
    pub queued: Duration,
    /// Time the forward pass took (for the whole batch it ran in).
    pub forward: Duration,
    /// How many inputs ran together.
    pub batch: usize,
}

/// Where a queued job's result arrives.
pub type Reply = oneshot::Receiver<Result<Inference, InferenceError>>;

struct Job {
    input: NetInput,
    submitted: Instant,
    reply: oneshot::Sender<Result<Inference, InferenceError>>,
}

/// What the inference threads run: a model that turns same-sized inputs into depth maps.
pub trait QueuedModel: Send + Sync + 'static {
    /// One forward pass over `inputs`.
    fn depths(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError>;
}

impl QueuedModel for DepthModel {
    fn depths(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError> {
        DepthModel::depths(self, inputs)
    }
}

/// The submitting side of the queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct InferenceQueue {
    sender: mpsc::Sender<Job>,
    capacity: usize,
    /// Jobs submitted and not yet taken by the thread (for `/metrics` and the overload check).
    waiting: Arc<AtomicUsize>,
    /// False once the inference thread has ended.
    alive: Arc<AtomicBool>,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    Full {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The inference thread has ended.
    Stopped,
}

/// Marks the queue dead when the inference thread ends, however it ends (a panic unwinds
/// through this guard too).
struct Liveness(Arc<AtomicBool>);

impl Drop for Liveness {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        if thread::panicking() {
            tracing::error!("the inference thread died; the instance reports itself unhealthy");
        }
    }
}

impl InferenceQueue {
    /// Starts `workers` inference threads (at least one), which share `model` until every
    /// queue handle is dropped.
    pub fn start<M: QueuedModel>(
        model: M,
        capacity: usize,
        max_batch: usize,
        workers: usize,
        metrics: Metrics,
    ) -> std::io::Result<(Self, Vec<thread::JoinHandle<()>>)> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let model = Arc::new(model);
        let receiver = Arc::new(Mutex::new(receiver));
        let workers = workers.max(1);
        let running = Arc::new(AtomicUsize::new(0));
        let threads = (rayon::current_num_threads() / workers).max(1);
        let handles = (0..workers)
            .map(|index| {
                let share = if workers > 1 {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |thread| format!("forward-{index}-{thread}"))
                        .build()
                        .map_err(std::io::Error::other)?;
                    Some(pool)
                } else {
                    None
                };
                let worker = Worker {
                    model: model.clone(),
                    receiver: receiver.clone(),
                    max_batch: max_batch.max(1),
                    waiting: waiting.clone(),
                    running: running.clone(),
                    share,
                    metrics: metrics.clone(),
                };
                let liveness = Liveness(alive.clone());
                thread::Builder::new()
                    .name(format!("inference-{index}"))
                    .spawn(move || {
                        let _liveness = liveness;
                        worker.run();
                    })
            })
            .collect::<std::io::Result<_>>()?;
        Ok((
            Self {
                sender,
                capacity: capacity.max(1),
                waiting,
                alive,
            },
            handles,
        ))
    }

    /// Whether the inference thread is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.sender.is_closed()
    }

    /// Whether a job submitted now would be refused (checked before a request's body is read).
    pub fn admits(&self) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        if self.waiting() >= self.capacity {
            return Err(SubmitError::Full {
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Queues an input; `Err` when the queue is full or the thread has ended.
    pub fn submit(&self, input: NetInput) -> Result<Reply, SubmitError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            input,
            submitted: Instant::now(),
            reply,
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(receiver),
            Err(error) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match error {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Full {
                        capacity: self.capacity,
                    },
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Jobs waiting to run.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

struct Worker<M> {
    model: Arc<M>,
    /// Shared by the workers: the one holding it waits for the next job, the others for it.
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    waiting: Arc<AtomicUsize>,
    /// Forward passes running now, over all workers.
    running: Arc<AtomicUsize>,
    /// This worker's share of the CPU threads, for a pass that starts while another runs
    /// (`None` with one worker).
    share: Option<rayon::ThreadPool>,
    metrics: Metrics,
}

impl<M: QueuedModel> Worker<M> {
    fn take(&self, job: Job) -> Option<Job> {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        // The handler dropped its receiver: the client is gone, the slot is free.
        (!job.reply.is_closed()).then_some(job)
    }

    fn run(self) {
        let mut held: Option<Job> = None;
        loop {
            let batch = {
                // No job is run while the lock is held, so a panic cannot poison it.
                let mut receiver = self.receiver.lock().unwrap_or_else(PoisonError::into_inner);
                let first = match held.take() {
                    Some(job) => job,
                    None => match receiver.blocking_recv() {
                        Some(job) => match self.take(job) {
                            Some(job) => job,
                            None => continue,
                        },
                        None => return,
                    },
                };
                let mut batch = vec![first];
                while batch.len() < self.max_batch {
                    let Ok(job) = receiver.try_recv() else {
                        break;
                    };
                    let Some(job) = self.take(job) else { continue };
                    if (job.input.width, job.input.height)
                        == (batch[0].input.width, batch[0].input.height)
                    {
                        batch.push(job);
                    } else {
                        held = Some(job);
                        break;
                    }
                }
                batch
            };
            self.run_batch(batch);
        }
    }

    fn run_batch(&self, batch: Vec<Job>) {
        let started = Instant::now();
        let size = batch.len();
        let mut inputs = Vec::with_capacity(size);
        let mut replies = Vec::with_capacity(size);
        for job in batch {
            inputs.push(job.input);
            replies.push((job.reply, started - job.submitted));
        }
        let alone = self.running.fetch_add(1, Ordering::SeqCst) == 0;
        let forward = || match &self.share {
            Some(pool) if !alone => pool.install(|| self.model.depths(inputs)),
            _ => self.model.depths(inputs),
        };
        // A panic fails this batch only; the thread keeps serving.
        let result = std::panic::catch_unwind(AssertUnwindSafe(forward)).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(InferenceError::from_message(format!(
                "the forward pass panicked: {message}"
            )))
        });
        self.running.fetch_sub(1, Ordering::SeqCst);
        let forward = started.elapsed();
        self.metrics.batch_size.observe(size as f64);
        match result {
            Ok(depths) => {
                for ((reply, queued), depth) in replies.into_iter().zip(depths) {
                    let _ = reply.send(Ok(Inference {
                        depth,
                        queued,
                        forward,
                        batch: size,
                    }));
                }
            }
            Err(error) => {
                tracing::error!(%error, "forward pass failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(InferenceError::from_message(error.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panics on 1-pixel-wide inputs, else answers zeros.
    struct Fragile;

    impl QueuedModel for Fragile {
        fn depths(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError> {
            assert!(inputs.iter().all(|i| i.width > 1), "a deliberate failure");
            Ok(inputs
                .iter()
                .map(|i| DepthMap {
                    width: i.width,
                    height: i.height,
                    data: vec![0.0; i.width * i.height],
                })
                .collect())
        }
    }

    fn input(width: usize) -> NetInput {
        NetInput {
            width,
            height: 2,
            data: vec![0.0; 3 * width * 2],
        }
    }

    #[test]
    fn a_panic_fails_its_batch_and_the_thread_serves_on() {
        let (queue, _threads) =
            InferenceQueue::start(Fragile, 4, 1, 2, Metrics::default()).unwrap();
        let failed = queue.submit(input(1)).unwrap().blocking_recv().unwrap();
        let message = failed.unwrap_err().to_string();
        assert!(message.contains("a deliberate failure"), "{message}");
        for _ in 0..3 {
            let ok = queue.submit(input(4)).unwrap().blocking_recv().unwrap();
            assert_eq!(ok.unwrap().depth.data.len(), 8);
        }
        assert!(queue.is_alive());
        assert_eq!(queue.admits(), Ok(()));
    }

    /// Answers, in every value of its depth map, the most of its passes that ran at once before
    /// this one ended, each pass waiting (up to a second) for a second to start.
    #[derive(Default)]
    struct Overlap {
        /// Passes running now, and the most that ever ran at once.
        running: Mutex<(usize, usize)>,
        changed: std::sync::Condvar,
    }

    impl QueuedModel for Overlap {
        fn depths(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError> {
            let mut running = self.running.lock().unwrap();
            running.0 += 1;
            running.1 = running.1.max(running.0);
            self.changed.notify_all();
            let (mut running, _) = self
                .changed
                .wait_timeout_while(running, Duration::from_secs(1), |running| running.1 < 2)
                .unwrap();
            running.0 -= 1;
            let seen = running.1 as f32;
            Ok(inputs
                .iter()
                .map(|i| DepthMap {
                    width: i.width,
                    height: i.height,
                    data: vec![seen; i.width * i.height],
                })
                .collect())
        }
    }

    /// Two jobs queued together run at once on two workers, one after the other on one.
    #[test]
    fn workers_run_queued_jobs_at_once() {
        for (workers, expected) in [(2, 2.0), (1, 1.0)] {
            let (queue, _threads) =
                InferenceQueue::start(Overlap::default(), 4, 1, workers, Metrics::default())
                    .unwrap();
            let replies = [
                queue.submit(input(4)).unwrap(),
                queue.submit(input(4)).unwrap(),
            ];
            for reply in replies {
                let depth = reply.blocking_recv().unwrap().unwrap().depth;
                assert_eq!(depth.data[0], expected, "{workers} worker(s)");
            }
        }
    }

    #[test]
    fn a_dead_thread_is_reported_as_stopped_not_full() {
        let alive = Arc::new(AtomicBool::new(true));
        let guard = Liveness(alive.clone());
        let died = thread::spawn(move || {
            let _guard = guard;
            panic!("the thread dies");
        })
        .join();
        assert!(died.is_err());
        assert!(!alive.load(Ordering::SeqCst));

        let (sender, receiver) = mpsc::channel(2);
        drop(receiver);
        let queue = InferenceQueue {
            sender,
            capacity: 2,
            waiting: Arc::new(AtomicUsize::new(0)),
            alive,
        };
        assert!(!queue.is_alive());
        assert_eq!(queue.admits(), Err(SubmitError::Stopped));
        assert_eq!(queue.submit(input(4)).unwrap_err(), SubmitError::Stopped);
    }
}
