//! A request body's share of the [memory budget](crate::budget).

use crate::budget::{MemoryBudget, Share};

use super::error::ApiError;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
            Err(ApiError::Budget(_))
        ));
        let declared = BodyCharge::new(&budget, Some(2 * BODY_STEP)).await.unwrap();
        assert_eq!(budget.available(), 2 * BODY_STEP);
        drop((unknown, declared));
        assert_eq!(budget.available(), budget.total());
    }
}
