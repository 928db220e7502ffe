//! The model's own thread, fed by a bounded queue.
//!
//! The async runtime never runs a forward pass: handlers submit a job carrying a oneshot sender
//! and await the answer. A full queue refuses at once (the handler answers 503 with
//! `Retry-After`) instead of letting waits grow without bound, and a job whose client has gone
//! away is skipped without running. With `max_batch > 1`, jobs of the same input size that are
//! already waiting run through the network together.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::pipeline::{DepthMap, DepthModel, InferenceError, NetInput};

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

/// The submitting side of the queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct InferenceQueue {
    sender: mpsc::Sender<Job>,
    capacity: usize,
    /// Jobs submitted and not yet taken by the thread (for `/metrics` and the overload check).
    waiting: Arc<AtomicUsize>,
}

/// The queue is full.
#[derive(Debug)]
pub struct QueueFull {
    /// The queue's capacity.
    pub capacity: usize,
}

impl InferenceQueue {
    /// Starts the inference thread, which owns `model` until every queue handle is dropped.
    pub fn start(
        model: DepthModel,
        capacity: usize,
        max_batch: usize,
        metrics: Metrics,
    ) -> std::io::Result<(Self, thread::JoinHandle<()>)> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model,
            receiver,
            max_batch: max_batch.max(1),
            waiting: waiting.clone(),
            metrics,
        };
        let handle = thread::Builder::new()
            .name("inference".to_string())
            .spawn(move || worker.run())?;
        Ok((
            Self {
                sender,
                capacity: capacity.max(1),
                waiting,
            },
            handle,
        ))
    }

    /// Queues an input; `Err` when the queue is full.
    pub fn submit(&self, input: NetInput) -> Result<Reply, QueueFull> {
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            input,
            submitted: Instant::now(),
            reply,
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(receiver),
            Err(_) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull {
                    capacity: self.capacity,
                })
            }
        }
    }

    /// Jobs waiting to run.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

struct Worker {
    model: DepthModel,
    receiver: mpsc::Receiver<Job>,
    max_batch: usize,
    waiting: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Worker {
    fn take(&mut self, job: Job) -> Option<Job> {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        // The handler dropped its receiver: the client is gone, the slot is free.
        (!job.reply.is_closed()).then_some(job)
    }

    fn run(mut self) {
        let mut held: Option<Job> = None;
        loop {
            let first = match held.take() {
                Some(job) => job,
                None => match self.receiver.blocking_recv() {
                    Some(job) => match self.take(job) {
                        Some(job) => job,
                        None => continue,
                    },
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                let Ok(job) = self.receiver.try_recv() else {
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
        let result = self.model.predict_batch(inputs);
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
