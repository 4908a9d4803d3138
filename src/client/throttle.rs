//! Slows down password guessing: after a few failed logins from one address, each further
//! failure from it is answered only after a delay that doubles, up to a cap. Other
//! addresses are not slowed. A success, or a quiet minute, forgets the address.
//!
//! The delay holds the failing connection, not the proxy: other logins go on meanwhile.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures answered at once before delays start.
const FREE_FAILURES: u32 = 3;
/// The first delay; each further failure doubles it.
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses remembered at most (a flood from many addresses cannot grow memory).
const MAX_ADDRESSES: usize = 65_536;

#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginThrottle {
    /// Records a failed login from `ip`; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        self.failed_at(ip, Instant::now())
    }

    /// A successful login from `ip`: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut failures = self.lock();
        if !failures.is_empty() {
            failures.remove(&ip);
        }
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut failures = self.lock();
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
            if failures.len() >= MAX_ADDRESSES {
                // Still full of recent failures: forget the lot rather than grow.
                failures.clear();
            }
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay_after(entry.0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The delay for the `n`th failure in a row.
fn delay_after(n: u32) -> Duration {
    if n <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (n - FREE_FAILURES - 1).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_per_address_and_reset() {
        let t = LoginThrottle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        let delays: Vec<Duration> = (0..10).map(|_| t.failed_at(a, now)).collect();
        assert_eq!(delays[..3], [Duration::ZERO; 3]);
        assert_eq!(delays[3], FIRST_DELAY);
        assert_eq!(delays[4], FIRST_DELAY * 2);
        assert_eq!(delays[7], FIRST_DELAY * 16);
        assert_eq!(delays[9], MAX_DELAY);
        assert_eq!(
            t.failed_at(b, now),
            Duration::ZERO,
            "other addresses unaffected"
        );
        assert_eq!(
            t.failed_at(a, now + FORGET_AFTER),
            Duration::ZERO,
            "a quiet minute forgets"
        );
        t.failed_at(a, now);
        t.failed_at(a, now);
        t.failed_at(a, now);
        t.succeeded(a);
        assert_eq!(t.failed_at(a, now), Duration::ZERO, "a success forgets");
        assert_eq!(delay_after(u32::MAX), MAX_DELAY);
    }
}
