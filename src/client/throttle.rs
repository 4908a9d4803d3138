//! Slows down password guessing: after a few failed logins from one address, every
//! further login attempt from it (right or wrong, so hanging up early gains nothing)
//! waits before authentication, the wait doubling with each failure up to a cap. Other
//! addresses are not slowed. The count of failures leaks away, one every
//! [`LEAK_EVERY`]: a steady trickle slower than that (a job retrying a stale password
//! once a minute, on an address an application shares with it) never slows anyone,
//! while a burst does. A success does not reset it (an attacker's own account must not
//! wipe the count). IPv6 addresses count per /64, the block one host is usually given;
//! clients over pgshield's Unix-domain socket count as one address.

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
/// One failure of an address's count leaks away this often.
const LEAK_EVERY: Duration = Duration::from_secs(10);
/// Addresses remembered at most (beyond it, new addresses are not tracked rather than
/// older ones forgotten).
const MAX_ADDRESSES: usize = 65_536;
/// A full table is swept of forgotten addresses at most this often (a sweep reads every
/// entry under the lock every login takes).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct LoginThrottle {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Failures counted, and when the count last changed (or leaked).
    failures: HashMap<IpAddr, (u32, Instant)>,
    last_sweep: Option<Instant>,
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
        let state = self.lock();
        match state.failures.get(&key(ip)) {
            Some(&(n, since)) => delay_after(leaked(n, since, now).0),
            None => Duration::ZERO,
        }
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        let mut state = self.lock();
        if state.failures.len() >= MAX_ADDRESSES && !state.failures.contains_key(&key) {
            if state
                .last_sweep
                .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY)
            {
                return;
            }
            state.last_sweep = Some(now);
            state
                .failures
                .retain(|_, &mut (n, since)| leaked(n, since, now).0 > 0);
            if state.failures.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let entry = state.failures.entry(key).or_insert((0, now));
        let (n, since) = leaked(entry.0, entry.1, now);
        *entry = (n.saturating_add(1), since);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }
}

/// A count of `n` as of `since`, after what leaked away by `now`: the count, and the time
/// the next leak is counted from (a part of [`LEAK_EVERY`] already gone is kept).
fn leaked(n: u32, since: Instant, now: Instant) -> (u32, Instant) {
    let gone = now.saturating_duration_since(since);
    let leaks = gone.as_nanos() / LEAK_EVERY.as_nanos();
    if leaks >= u128::from(n) {
        return (0, now);
    }
    // (leaks < n, so it fits.)
    let leaks = leaks as u32;
    (n - leaks, since + LEAK_EVERY * leaks)
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
        // Ten failures leak away in ten LEAK_EVERY; one of them, and the count is down
        // by one.
        assert_eq!(t.delay_at(a, now + LEAK_EVERY * 10), Duration::ZERO);
        assert_eq!(
            t.delay_at(a, now + LEAK_EVERY * 6),
            delay_after(4),
            "six of ten leaked"
        );
        // One IPv6 host rotating through its /64 is one address.
        for i in 0..5u16 {
            t.failed_at(IpAddr::V6([0xfd00, 0, 0, 1, 0, 0, 0, i].into()), now);
        }
        assert!(t.delay_at(ip("fd00:0:0:1::99"), now) > Duration::ZERO);
        assert_eq!(t.delay_at(ip("fd00:0:0:2::1"), now), Duration::ZERO);
        assert_eq!(delay_after(u32::MAX), MAX_DELAY);
    }

    /// A job retrying a stale password once a minute, on the address the application
    /// shares with it (a sidecar's 127.0.0.1, a NAT), never slows the application's
    /// logins: before, its count reset only after a minute with no failure, and grew
    /// to the 5 s cap.
    #[test]
    fn a_slow_trickle_of_failures_slows_nobody() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let start = Instant::now();
        for minute in 0..30 {
            let now = start + Duration::from_secs(59) * minute;
            assert_eq!(t.delay_at(ip, now), Duration::ZERO, "minute {minute}");
            t.failed_at(ip, now);
        }
    }

    /// A full table is swept at most once a second; addresses it cannot take are not
    /// tracked (not slowed), and room made by a sweep is used.
    #[test]
    fn a_full_table_is_swept_now_and_then() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_ADDRESSES as u32 {
            t.failed_at(IpAddr::V4(i.into()), now);
        }
        let newcomer = IpAddr::V4(u32::MAX.into());
        // Swept once (nothing leaked yet), then not again within the second.
        for _ in 0..5 {
            t.failed_at(newcomer, now);
        }
        assert_eq!(t.delay_at(newcomer, now), Duration::ZERO);
        assert_eq!(t.lock().last_sweep, Some(now));
        t.failed_at(newcomer, now + SWEEP_EVERY / 2);
        assert_eq!(t.lock().last_sweep, Some(now));
        // Once the others' failures have leaked away, the next sweep makes room.
        let later = now + LEAK_EVERY;
        t.failed_at(newcomer, later);
        let state = t.lock();
        assert_eq!((state.last_sweep, state.failures.len()), (Some(later), 1));
    }
}
