//! Wall-clock time as token claims count it: whole seconds since the Unix epoch. Tokens'
//! `exp`, `nbf` and `iat`, cached token lifetimes and session cookies all compare against this
//! one function. (Timers and deadlines use tokio's monotonic clock instead.)

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 for a clock set before 1970.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
