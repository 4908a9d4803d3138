//! Slows down password guessing: after a few failed logins from one address, every
//! further login attempt from it (right or wrong, so hanging up early gains nothing)
//! waits before authentication, the wait doubling with each failure up to a cap. Other
//! addresses are not slowed. An address with no failure for a minute starts afresh; a
//! success does not reset it (an attacker's own account must not wipe the count).
//! IPv6 addresses count per /64, the block one host is usually given; clients over
//! pgshield's Unix-domain socket count as one address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::Peer;

/// Failures allowed before waits start.
const FREE_FAILURES: u32 = 3;
/// The first wait; each further failure doubles it.
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses remembered at most (beyond it, new addresses are not tracked rather than
/// older ones forgotten).
const MAX_ADDRESSES: usize = 65_536;

#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginThrottle {
    /// How long a login attempt from `peer` waits before authenticating.
    pub fn delay(&self, peer: Peer) -> Duration {
        self.delay_at(address(peer), Instant::now())
    }

    /// Records a failed login from `peer`.
    pub fn failed(&self, peer: Peer) {
        self.failed_at(address(peer), Instant::now());
    }

    fn delay_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let failures = self.lock();
        match failures.get(&key(ip)) {
            Some((n, last)) if now.duration_since(*last) < FORGET_AFTER => delay_after(*n),
            _ => Duration::ZERO,
        }
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        let mut failures = self.lock();
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&key) {
            failures.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
            if failures.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let entry = failures.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The address a client's failures count against: 0.0.0.0, which no TCP client comes
/// from, for every client over the Unix-domain socket.
fn address(peer: Peer) -> IpAddr {
    peer.ip()
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// The address a failure counts against: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// The wait after `n` failures in a row.
fn delay_after(n: u32) -> Duration {
    if n < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (n - FREE_FAILURES).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_per_address_and_decay() {
        let t = LoginThrottle::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..10 {
            delays.push(t.delay_at(a, now));
            t.failed_at(a, now);
        }
        // Three failures are free; the fourth attempt waits.
        assert_eq!(delays[..3], [Duration::ZERO; 3]);
        assert_eq!(delays[3], FIRST_DELAY);
        assert_eq!(delays[4], FIRST_DELAY * 2);
        assert_eq!(t.delay_at(a, now), MAX_DELAY);
        assert_eq!(
            t.delay_at(b, now),
            Duration::ZERO,
            "other addresses unaffected"
        );
        assert_eq!(
            t.delay_at(a, now + FORGET_AFTER),
            Duration::ZERO,
            "a quiet minute"
        );
        // One IPv6 host rotating through its /64 is one address.
        for i in 0..5u16 {
            t.failed_at(IpAddr::V6([0xfd00, 0, 0, 1, 0, 0, 0, i].into()), now);
        }
        assert!(t.delay_at(ip("fd00:0:0:1::99"), now) > Duration::ZERO);
        assert_eq!(t.delay_at(ip("fd00:0:0:2::1"), now), Duration::ZERO);
        assert_eq!(delay_after(u32::MAX), MAX_DELAY);
    }
}
