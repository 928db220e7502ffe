//! Working buffers reused across calls, one free list per thread, so that a forward in steady
//! state neither allocates nor zeroes its im2col and Winograd buffers again.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps for reuse; more are freed instead of kept.
const KEPT_PER_THREAD: usize = 4;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A working buffer of `len` values whose contents are left over from earlier use: every value
/// must be written before it is read.
pub(crate) struct WorkBuffer {
    values: Vec<f32>,
    len: usize,
}

impl WorkBuffer {
    /// Takes a buffer from this thread's free list (or a new one), at least `len` long: the
    /// smallest that holds `len`, else the largest, grown. Taking whichever was freed last
    /// grew small buffers for large layers over and over, each time copying and zeroing them.
    pub(crate) fn take(len: usize) -> Self {
        let kept = FREE.with(|free| {
            let mut free = free.borrow_mut();
            let fitting = (free.iter().enumerate())
                .filter(|(_, values)| values.len() >= len)
                .min_by_key(|(_, values)| values.len());
            let chosen = fitting
                .or_else(|| (free.iter().enumerate()).max_by_key(|(_, values)| values.len()));
            chosen
                .map(|(index, _)| index)
                .map(|index| free.swap_remove(index))
        });
        let values = match kept {
            Some(values) if values.len() >= len => values,
            // Replaced rather than resized, which would copy the old values first.
            _ => vec![0.0; len],
        };
        Self { values, len }
    }
}

impl Deref for WorkBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.values[..self.len]
    }
}

impl DerefMut for WorkBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values[..self.len]
    }
}

impl Drop for WorkBuffer {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        // During thread teardown the list may already be gone; the buffer is then just freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEPT_PER_THREAD {
                free.push(values);
            }
        });
    }
}
