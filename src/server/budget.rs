//! The memory budget every request's large buffers are charged to: its body while it is
//! buffered, its pixels while they are decoded, and its output's bands while it is rendered
//! ([`crate::pipeline::render_bytes`]). A request
//! waits for its share, at most `--memory-wait-secs`, and is then refused with a 503; so the
//! worst images the limits allow, as many as arrive at once, cannot together push the process
//! past the budget.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// Bytes a decode may hold per pixel: a 16-bit RGBA image (8) and its 8-bit RGB copy (3).
pub const DECODE_BYTES_PER_PIXEL: u64 = 11;

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
    /// A budget of `bytes`, for which a request waits at most `wait`.
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
    pub async fn reserve(&self, bytes: u64, purpose: &'static str) -> Result<Share, ApiError> {
        let units = bytes.div_ceil(UNIT).max(1);
        if units * UNIT > self.total {
            return Err(ApiError::OverBudget {
                purpose,
                bytes,
                total: self.total,
            });
        }
        match tokio::time::timeout(
            self.wait,
            self.permits.clone().acquire_many_owned(units as u32),
        )
        .await
        {
            Ok(Ok(share)) => Ok(share),
            Ok(Err(closed)) => Err(ApiError::Internal(closed.to_string())),
            Err(_) => Err(ApiError::MemoryBusy(self.wait)),
        }
    }
}

/// What a body sent without a `Content-Length` is charged at a time, as its bytes arrive.
const BODY_STEP: u64 = 1 << 20;

/// A request body's share of the budget: its declared length at once, or, for a body of
/// unknown length (chunked, or HTTP/2 without `content-length`), a first step that grows as
/// the bytes arrive. Reserving the whole body limit up front would let a few stalled uploads
/// hold the budget with almost nothing sent.
#[derive(Debug)]
pub struct BodyCharge {
    budget: MemoryBudget,
    share: Share,
    /// Bytes charged so far.
    charged: u64,
    /// Whether the length was declared (then the share is final).
    declared: bool,
}

impl BodyCharge {
    /// Charges a body of `declared` length, or the first step of one of unknown length.
    pub async fn new(budget: &MemoryBudget, declared: Option<u64>) -> Result<Self, ApiError> {
        let charged = declared.unwrap_or(BODY_STEP);
        Ok(Self {
            share: budget.reserve(charged, "request body").await?,
            budget: budget.clone(),
            charged,
            declared: declared.is_some(),
        })
    }

    /// Makes sure `bytes` received so far are charged, taking more of the budget in steps
    /// (waiting for it as any reservation does).
    pub async fn cover(&mut self, bytes: u64) -> Result<(), ApiError> {
        if self.declared || bytes <= self.charged {
            return Ok(());
        }
        let target = bytes.div_ceil(BODY_STEP) * BODY_STEP;
        let more = self
            .budget
            .reserve(target - self.charged, "request body")
            .await?;
        self.share.merge(more);
        self.charged = target;
        Ok(())
    }
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
            Err(ApiError::MemoryBusy(_))
        ));
        assert!(matches!(
            budget.reserve(11 * UNIT, "test").await,
            Err(ApiError::OverBudget { .. })
        ));
        drop(first);
        let _second = budget.reserve(10 * UNIT, "test").await.unwrap();
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test]
    async fn a_body_without_a_length_is_charged_as_it_arrives() {
        let budget = MemoryBudget::new(8 * BODY_STEP, Duration::from_millis(50));
        let mut unknown = BodyCharge::new(&budget, None).await.unwrap();
        assert_eq!(budget.available(), 7 * BODY_STEP);
        unknown.cover(BODY_STEP / 2).await.unwrap();
        assert_eq!(budget.available(), 7 * BODY_STEP);
        unknown.cover(3 * BODY_STEP + 1).await.unwrap();
        assert_eq!(budget.available(), 4 * BODY_STEP);
        assert!(matches!(
            unknown.cover(9 * BODY_STEP).await,
            Err(ApiError::OverBudget { .. }) | Err(ApiError::MemoryBusy(_))
        ));
        let declared = BodyCharge::new(&budget, Some(2 * BODY_STEP)).await.unwrap();
        assert_eq!(budget.available(), 2 * BODY_STEP);
        drop((unknown, declared));
        assert_eq!(budget.available(), budget.total());
    }
}
