//! The memory budget, one for `serve` and `batch` alike: every large buffer is charged to it
//! before it is held. The server charges a request's body while it is buffered, its pixels
//! while they are decoded and its output's bands while they are rendered
//! ([`crate::pipeline::render_bytes`]), each waiting at most `--memory-wait-secs` and then
//! refused; a batch task charges the files it has read and each image from its decode to its
//! stored output, waiting as long as it takes. Either way, the worst images the limits allow,
//! as many as arrive at once, cannot together push the process past the budget.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes an image may hold per pixel, at its largest: while decoding, a 16-bit RGBA image (8)
/// and its 8-bit RGB copy (3). What follows holds less (the colourised output, 3, and the
/// encoded file).
const DECODE_BYTES_PER_PIXEL: u64 = 11;

/// What a decoder holds beside the pixels, whatever the image's size: the inflate or entropy
/// decoder's state and a few rows of scratch.
const DECODE_SCRATCH_BYTES: u64 = 1 << 20;

/// What an image of `pixels` is charged from its decode until its output is stored: the most
/// that decoding it and reducing it to the network's input hold at once (`tests/decode_memory.rs`
/// counts it by allocation).
pub fn decode_bytes(pixels: u64) -> u64 {
    pixels * DECODE_BYTES_PER_PIXEL + DECODE_SCRATCH_BYTES
}

/// The unit of the semaphore's permits, so that budgets up to 4 TiB fit its `u32` counts.
const UNIT: u64 = 1024;

/// Head-room kept out of a derived budget for the runtime, sockets and small buffers.
const RESERVE_BYTES: u64 = 64 << 20;

/// The budget used where the container sets no memory limit.
const UNLIMITED_DEFAULT_BYTES: u64 = 1 << 30;

/// A shared pool of bytes, handed out to requests and returned when their permits drop.
/// Clones share the pool.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: u64,
    wait: Duration,
}

/// A share of the budget, returned on drop.
pub type Share = OwnedSemaphorePermit;

impl MemoryBudget {
    /// A budget of `bytes`, for which [`MemoryBudget::reserve`] waits at most `wait`.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let units = (bytes / UNIT).min(u64::from(u32::MAX)) as u32;
        Self {
            permits: Arc::new(Semaphore::new(units as usize)),
            total: u64::from(units) * UNIT,
            wait,
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes not handed out at the moment.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }

    /// Takes `bytes` from the budget, waiting for them at most the configured time.
    pub async fn reserve(&self, bytes: u64, purpose: &'static str) -> Result<Share, BudgetError> {
        let units = bytes.div_ceil(UNIT).max(1);
        if units * UNIT > self.total {
            return Err(BudgetError::OverBudget {
                purpose,
                bytes,
                total: self.total,
            });
        }
        let acquired = self.permits.clone().acquire_many_owned(units as u32);
        match tokio::time::timeout(self.wait, acquired).await {
            Ok(Ok(share)) => Ok(share),
            // The semaphore is never closed; were it, the memory would never come.
            Ok(Err(_)) | Err(_) => Err(BudgetError::Busy(self.wait)),
        }
    }

    /// Takes `bytes` from the budget (the whole budget for anything larger, which then runs
    /// alone), waiting as long as it takes: for work that has nobody to refuse to.
    pub async fn take(&self, bytes: u64) -> Share {
        let units = bytes.div_ceil(UNIT).min(self.total / UNIT).max(1);
        loop {
            match self.permits.clone().acquire_many_owned(units as u32).await {
                Ok(share) => return share,
                // Never closed (see `reserve`); waiting on is all there is to do.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }
}

/// Why a share of the budget was not given.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The budget stayed in use for the whole wait.
    #[error("the server's memory budget stayed in use for {0:?}; retry shortly")]
    Busy(Duration),
    /// One piece of work needs more than the whole budget.
    #[error("the {purpose} needs {bytes} bytes, more than this server's memory budget of {total}")]
    OverBudget {
        /// What the memory was for.
        purpose: &'static str,
        /// How much it needed.
        bytes: u64,
        /// The whole budget.
        total: u64,
    },
}

/// The budget when `--memory-budget` is not given: the cgroup's memory limit less what the
/// process already holds (`resident`: the model after warm-up), what the largest forward pass
/// adds (`forward`) and a reserve, or 1 GiB where no limit is set.
pub fn default_bytes(resident: u64, forward: u64) -> u64 {
    match cgroup_limit() {
        Some(limit) => limit
            .saturating_sub(resident)
            .saturating_sub(forward)
            .saturating_sub(RESERVE_BYTES),
        None => UNLIMITED_DEFAULT_BYTES,
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1), if there is one.
fn cgroup_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let text = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    // "max" (v2) or a huge number (v1) mean no limit.
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|&limit| limit < (1 << 50))
}

/// This process's resident memory, in bytes (0 where it cannot be read).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_wait_then_time_out_and_return_on_drop() {
        let budget = MemoryBudget::new(10 * UNIT, Duration::from_millis(50));
        let first = budget.reserve(6 * UNIT, "test").await.unwrap();
        assert_eq!(budget.available(), 4 * UNIT);
        assert!(matches!(
            budget.reserve(5 * UNIT, "test").await,
            Err(BudgetError::Busy(_))
        ));
        assert!(matches!(
            budget.reserve(11 * UNIT, "test").await,
            Err(BudgetError::OverBudget { .. })
        ));
        drop(first);
        let _second = budget.reserve(10 * UNIT, "test").await.unwrap();
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test]
    async fn take_waits_and_clamps_to_the_whole_budget() {
        let budget = MemoryBudget::new(10 * UNIT, Duration::from_millis(10));
        let all = budget.take(100 * UNIT).await;
        assert_eq!(budget.available(), 0);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(3 * UNIT).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "take waits beyond the reserve timeout"
        );
        drop(all);
        let _three = waiting.await.unwrap();
        assert_eq!(budget.available(), 7 * UNIT);
    }
}
