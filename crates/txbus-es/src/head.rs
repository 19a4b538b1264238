//! The head of the log (the last commit's position), found with the bus's one log read.
//!
//! `read_log(after, 1)` answers "the first commit after `after`": a galloping search from a
//! known position, then a binary search, finds the last one in `O(log n)` reads of one commit
//! each, whatever the gaps between positions.

use txbus_core::Bus;

use crate::error::Error;

/// The first position after `after`, if any.
async fn first_after(bus: &Bus, after: u64) -> Result<Option<u64>, Error> {
    Ok(bus.read_log(after, 1).await?.first().map(|c| c.position))
}

/// The position of the last commit (0 when the log is empty); `known` must be 0 or a
/// position that exists.
pub(crate) async fn head_position(bus: &Bus, known: u64) -> Result<u64, Error> {
    let mut lo = known;
    let mut step: u64 = 1;
    // Gallop: `lo` exists (or is 0); find a bound past which nothing exists.
    let hi = loop {
        let probe = lo.saturating_add(step - 1);
        match first_after(bus, probe).await? {
            Some(p) => {
                lo = p;
                step = step.saturating_mul(2);
            }
            None => break probe,
        }
    };
    // Nothing after `hi`; `lo` exists (or is 0) and lo <= hi. Narrow down.
    let mut hi = hi;
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match first_after(bus, mid - 1).await? {
            Some(p) if p <= hi => lo = p,
            Some(_) | None => hi = mid - 1,
        }
    }
    Ok(lo)
}
