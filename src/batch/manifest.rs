//! What a task did with each of its inputs: one JSON line per input, then a summary line.
//! The manifest is written to the output's `_manifests/` when the task ends, under a name
//! of its own (time, task, random suffix), so reruns and retries never overwrite one.

use std::time::SystemTime;

use serde::Serialize;

/// Where a task's manifests go, under the output.
pub const MANIFEST_DIR: &str = "_manifests";

/// The task running: `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    /// From 0.
    pub index: usize,
    /// At least 1.
    pub count: usize,
}

/// How one input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Its output was written by this task.
    Done,
    /// Its output was there already (an earlier run, or another task).
    Skipped,
    /// The input was refused (not a readable image, too large, ...): rerunning will not help.
    Failed,
    /// A store or device failure stopped it: a rerun of the task will try again.
    Transient,
    /// The task stopped before reaching it.
    NotStarted,
}

impl Status {
    /// The name manifests and logs give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Transient => "transient",
            Self::NotStarted => "not_started",
        }
    }
}

/// Milliseconds spent on each step of one input.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Timings {
    /// Reading the input from the store.
    pub read_ms: f64,
    /// Decoding and pre-processing.
    pub decode_ms: f64,
    /// The forward pass.
    pub forward_ms: f64,
    /// Post-processing and encoding.
    pub encode_ms: f64,
    /// Writing and committing the output.
    pub store_ms: f64,
}

/// One manifest line.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// Position among the task's inputs.
    #[serde(skip)]
    pub position: usize,
    /// Input name, relative to the input.
    pub input: String,
    /// Output name, relative to the output.
    pub output: String,
    /// How it ended.
    pub status: Status,
    /// Machine-readable reason, for `failed` and `transient`.
    pub error: Option<String>,
    /// Human-readable reason.
    pub message: Option<String>,
    /// Input size in bytes.
    pub input_bytes: u64,
    /// Output size in bytes, when written.
    pub output_bytes: Option<u64>,
    /// The image's width and height, once its header was read.
    pub size: Option<(u32, u32)>,
    /// Time per step.
    pub timings: Timings,
}

impl Record {
    /// A record for an input settled without running it.
    pub fn settled(
        position: usize,
        input: &str,
        output: &str,
        input_bytes: u64,
        status: Status,
        error: Option<(&str, String)>,
    ) -> Self {
        let (error, message) = match error {
            Some((code, message)) => (Some(code.to_string()), Some(message)),
            None => (None, None),
        };
        Self {
            position,
            input: input.to_string(),
            output: output.to_string(),
            status,
            error,
            message,
            input_bytes,
            output_bytes: None,
            size: None,
            timings: Timings::default(),
        }
    }
}

/// The last manifest line, also logged.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// This task's number.
    pub task_index: usize,
    /// How many tasks share the input.
    pub task_count: usize,
    /// Images in the whole input.
    pub images_total: usize,
    /// Images this task owns.
    pub images_in_task: usize,
    /// Listed files that are not images.
    pub ignored_files: usize,
    /// Outputs written.
    pub done: usize,
    /// Outputs found already there.
    pub skipped: usize,
    /// Inputs refused.
    pub failed: usize,
    /// Inputs stopped by a transient failure.
    pub transient: usize,
    /// Inputs never reached.
    pub not_started: usize,
    /// Wall time of the task, listing and model load included.
    pub elapsed_s: f64,
    /// Outputs written per second of the pipeline's run (model load excluded).
    pub images_per_s: f64,
    /// Input bytes read.
    pub input_bytes: u64,
    /// Output bytes written.
    pub output_bytes: u64,
}

impl Summary {
    /// Counts the records of `task`'s run.
    pub fn count(task: Task, records: &[Record]) -> Self {
        let mut summary = Self {
            task_index: task.index,
            task_count: task.count,
            images_in_task: records.len(),
            ..Self::default()
        };
        for record in records {
            match record.status {
                Status::Done => summary.done += 1,
                Status::Skipped => summary.skipped += 1,
                Status::Failed => summary.failed += 1,
                Status::Transient => summary.transient += 1,
                Status::NotStarted => summary.not_started += 1,
            }
            if record.status == Status::Done {
                summary.input_bytes += record.input_bytes;
                summary.output_bytes += record.output_bytes.unwrap_or_default();
            }
        }
        summary
    }

    /// Whether every input either has its output or was refused for what it is.
    pub fn complete(&self) -> bool {
        self.transient == 0 && self.not_started == 0
    }
}

/// The manifest's object name for `task`, started at `now`.
pub fn manifest_name(task: Task, now: SystemTime) -> String {
    let time = time::OffsetDateTime::from(now);
    format!(
        "{MANIFEST_DIR}/{:04}{:02}{:02}T{:02}{:02}{:02}Z-task-{:05}-of-{:05}-{}.jsonl",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        task.index,
        task.count,
        crate::storage::random_hex::<4>(),
    )
}

/// The manifest's bytes: the records in input order, then `{"summary": ...}`.
pub fn render(records: &[Record], summary: &Summary) -> Vec<u8> {
    let mut text = Vec::new();
    for record in records {
        // Serialising these plain structs cannot fail.
        serde_json::to_writer(&mut text, record).expect("a record serialises");
        text.push(b'\n');
    }
    serde_json::to_writer(&mut text, &serde_json::json!({ "summary": summary }))
        .expect("a summary serialises");
    text.push(b'\n');
    text
}
