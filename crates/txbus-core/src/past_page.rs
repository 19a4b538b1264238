//! One page of a scan over a past state (the keys or the stream heads of a [`crate::Version`]),
//! with the cursor to continue from.
//!
//! A scan of the state as of an old position walks every key (or stream) the log ever wrote,
//! and skips those that were absent then: written only later, or deleted by then. Without a
//! bound, one call over a prefix holding a million keys written after the position would read a
//! million keys to return nothing. So each call examines at most `max_examined` keys or streams
//! ([`MAX_EXAMINED`] unless the caller says otherwise) and returns what it found with
//! [`PastPage::resume_after`]: pass it as `after` to the next call. A page may be short, or even
//! empty, and still not be the last one; the scan is over when `resume_after` is `None`.
//!
//! ```no_run
//! # async fn example(bus: txbus_core::Bus) -> Result<(), txbus_core::Error> {
//! let v = bus.state_at(1_000).await?;
//! let mut after: Option<String> = None;
//! loop {
//!     let page = v.kv_scan("cart/", after.as_deref(), 100).await?;
//!     for entry in &page.items {
//!         println!("{} = {:?}", entry.key, entry.value);
//!     }
//!     match page.resume_after {
//!         Some(next) => after = Some(next),
//!         None => break,
//!     }
//! }
//! # Ok(()) }
//! ```

/// How many keys or streams one past-state scan examines by default, present or not. It bounds
/// the work of one call (each examined key or stream costs a few index seeks) whatever the
/// log holds; [`crate::Version::max_examined`] changes it.
pub const MAX_EXAMINED: usize = 1024;

/// The most a caller may ask one call to examine.
pub const MAX_EXAMINED_LIMIT: usize = 100_000;

/// What one call of a past-state scan found, and where to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastPage<T> {
    /// What was present at the position, in key (or stream id) order; at most the `limit` asked.
    pub items: Vec<T>,
    /// The last key (or stream id) this call examined, when the scan may go on: pass it as
    /// `after` to the next call. `None` when nothing is left after this page.
    pub resume_after: Option<String>,
}

impl<T> PastPage<T> {
    /// A page holding `items`, continued after `resume_after` (`None`: the scan is over).
    pub fn new(items: Vec<T>, resume_after: Option<String>) -> Self {
        Self {
            items,
            resume_after,
        }
    }

    /// True when the scan is over: no page follows this one.
    pub fn is_last(&self) -> bool {
        self.resume_after.is_none()
    }
}

/// `max_examined` as a store applies it: at least one, at most [`MAX_EXAMINED_LIMIT`].
pub fn bounded(max_examined: usize) -> usize {
    max_examined.clamp(1, MAX_EXAMINED_LIMIT)
}
