//! What a benchmark run measured: latency samples and their percentiles, errors by
//! SQLSTATE, the proxy's memory per idle client.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Latencies in microseconds, kept whole (a run has at most a few hundred thousand).
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn record(&mut self, took: Duration) {
        self.0
            .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// Percentiles (nearest rank), or None without samples.
    pub fn summary(&self) -> Option<Latency> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[i.clamp(1, sorted.len()) - 1]
        };
        let sum: u128 = sorted.iter().map(|&x| u128::from(x)).sum();
        Some(Latency {
            count: sorted.len(),
            p50_us: rank(50.0),
            p95_us: rank(95.0),
            p99_us: rank(99.0),
            max_us: sorted[sorted.len() - 1],
            mean_us: u64::try_from(sum / sorted.len() as u128).unwrap_or(u64::MAX),
        })
    }
}

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

/// Errors by what the client saw: `SQLSTATE message` for server errors, else the kind.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn record_other(&mut self, what: &str) {
        *self.0.entry(what.to_owned()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Errors) {
        for (k, n) in other.0 {
            *self.0.entry(k).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// `53300 sorry, too many clients already`, or the error's own words when it carries
/// no SQLSTATE (a refused or reset connection), shortened.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(e) {
                text = format!("{text}: {source}");
            }
            text
        }
    };
    shorten(&text, 80)
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// What a proxy's memory did while it held idle clients.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IdleMemory {
    pub pid: u32,
    pub clients_held: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after − before) / clients, in bytes.
    pub bytes_per_client: u64,
}

/// Resident memory of a process, from /proc (Linux), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s = Samples::default();
        for us in 1..=100 {
            s.record(Duration::from_micros(us));
        }
        let l = s.summary().unwrap();
        assert_eq!((l.p50_us, l.p95_us, l.p99_us, l.max_us), (50, 95, 99, 100));
        assert_eq!(l.mean_us, 50);
        assert_eq!(l.count, 100);
        assert!(Samples::default().summary().is_none());
        let mut one = Samples::default();
        one.record(Duration::from_micros(7));
        assert_eq!(one.summary().unwrap().p50_us, 7);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("ééééé", 2), "éé…");
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
