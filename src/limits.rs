//! Limits that keep one caller from starving the others.
//!
//! - [`FailureLimiter`]: per-source limits on failed authentication (docs/security.md F5).
//! - [`IdentityRate`]: a token bucket per authenticated identity (issuer, subject), so one user or
//!   pipeline flooding requests gets 429 while everyone else is unaffected (scenario 9). The cap
//!   on concurrent long-running streams per identity lives in the stream registry.
//!
//! Every refused token costs at least a parse and often a signature check. A source that keeps
//! sending bad tokens is answered 429 (with `Retry-After`) for the rest of the window before any
//! of that work; tokens already in the verified-token cache still pass, so a client sharing the
//! attacker's address (a NAT) keeps working.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Bounds memory under a flood from many addresses.
const MAX_SOURCES: usize = 100_000;

pub struct FailureLimiter {
    window: Duration,
    max_failures: u32,
    sources: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            window,
            max_failures,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when `ip` has used up its failures for the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let map = self.sources.lock();
        match map.get(&ip) {
            Some((start, n)) if *n >= self.max_failures && start.elapsed() < self.window => {
                Err(self.window.saturating_sub(start.elapsed()))
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, ip: IpAddr) {
        let mut map = self.sources.lock();
        if map.len() >= MAX_SOURCES {
            let window = self.window;
            map.retain(|_, (start, _)| start.elapsed() < window);
            if map.len() >= MAX_SOURCES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Open connections per source address (docs/security.md F1: one address cannot hold every slot).
#[derive(Default)]
pub struct SourceConnections {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// Holds one connection slot of a source; dropping it frees the slot.
pub struct SourceSlot<'a> {
    owner: &'a SourceConnections,
    ip: IpAddr,
}

impl SourceConnections {
    /// A slot for `ip`, unless it already holds `limit` connections.
    pub fn acquire(&self, ip: IpAddr, limit: u32) -> Option<SourceSlot<'_>> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SourceSlot { owner: self, ip })
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A token bucket per identity: `rate` requests per second sustained, bursts up to `burst`.
pub struct IdentityRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl IdentityRate {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `identity`, or says how long until one is available.
    pub fn take(&self, identity: &str) -> Result<(), Duration> {
        let mut map = self.buckets.lock();
        if map.len() >= MAX_SOURCES {
            // Full buckets carry no information; dropping them bounds memory.
            let burst = self.burst;
            let rate = self.rate;
            map.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
        }
        let now = Instant::now();
        // Look up by &str first: the key is copied only for a new identity.
        if !map.contains_key(identity) {
            map.insert(identity.to_owned(), (self.burst, now));
        }
        let Some((tokens, at)) = map.get_mut(identity) else {
            return Ok(());
        };
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_per_source_and_window() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
            l.record_failure(a);
        }
        let retry = l.check(a).unwrap_err();
        assert!(retry <= Duration::from_secs(60) && retry > Duration::from_secs(0));
        assert!(l.check(b).is_ok(), "another source is unaffected");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(l.check(a).is_ok(), "a new window starts clean");
    }

    #[test]
    fn source_slots_are_capped_and_freed() {
        let c = SourceConnections::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = c.acquire(a, 2).unwrap();
        let _s2 = c.acquire(a, 2).unwrap();
        assert!(c.acquire(a, 2).is_none());
        assert!(c.acquire("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(s1);
        assert!(c.acquire(a, 2).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn identity_buckets_are_separate_and_refill() {
        let r = IdentityRate::new(10, 5);
        for _ in 0..5 {
            assert!(r.take("dev/a").is_ok());
        }
        let wait = r.take("dev/a").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(r.take("dev/b").is_ok(), "another identity is unaffected");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(r.take("dev/a").is_ok() && r.take("dev/a").is_ok());
    }
}
