//! Which poll of its task a session is in ("epoch"), so that a socket already found not
//! ready during this poll is not asked again before the task is next woken.
//!
//! A socket read that returns `Pending` leaves the task's waker with the socket's
//! readiness: if data arrives later, the task is woken and polled again. Until that next
//! poll, asking the socket again can only say `Pending` again, yet the session loop asked
//! after every step (a statement round trip asked about four times, each a lock and a
//! waker comparison in tokio). A session notes the epoch in which a socket said
//! `Pending` and skips it for the rest of that epoch.
//!
//! Epochs are counted per thread (a task can move between the runtime's threads between
//! polls); each thread's count starts at its own multiple of 2^48, so two threads show
//! the same value only after one of them has polled 2^48 tasks (decades at ten million
//! a second), and even then it matters only if the same socket carries a stamp of
//! exactly that value. Zero is never an epoch: it stands for "not noted".
//!
//! A stamp is only good while the same session holds the socket: a backend is stamped
//! anew (zero) each time a session takes it, since another task may have read it in
//! between and taken the waker's place.
//!
//! A poll is also one instant: [`instant`] reads the clock once per poll of a `Counted`
//! task (a transaction read it about ten times, for activity, statement durations and its
//! backend's idle time, at some 90 instructions a read). Outside such a poll it reads the
//! clock each time.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

static NEXT_BASE: AtomicU64 = AtomicU64::new(1 << 48);

thread_local! {
    static CURRENT: Cell<u64> = Cell::new(NEXT_BASE.fetch_add(1 << 48, Ordering::Relaxed));
}

/// The epoch this thread is in: that of the task it is polling, when the task runs under
/// [`Counted`].
pub fn now() -> u64 {
    CURRENT.with(Cell::get)
}

fn next() {
    CURRENT.with(|c| c.set(c.get() + 1));
}

/// The clock as this thread's current poll of a [`Counted`] task sees it.
#[derive(Clone, Copy)]
enum Clock {
    /// Not in such a poll: each [`instant`] reads the clock.
    Off,
    /// In one that has not read it yet.
    Unread,
    /// In one that read it.
    Read(Instant),
}

thread_local! {
    static CLOCK: Cell<Clock> = const { Cell::new(Clock::Off) };
}

/// Now, as of the first time the current poll of a [`Counted`] task asked; outside one,
/// now. A session's poll relays what has arrived and takes microseconds, so what it
/// times is timed to within that; something stamped after long work in the same poll
/// (there is none in a session's) would be stamped early by that long.
/// (Not inlined: one copy serves the session's several callers.)
#[inline(never)]
pub fn instant() -> Instant {
    CLOCK.with(|c| match c.get() {
        Clock::Read(at) => at,
        Clock::Unread => {
            let at = Instant::now();
            c.set(Clock::Read(at));
            at
        }
        Clock::Off => Instant::now(),
    })
}

/// Whether this thread is in a poll of a [`Counted`] task.
pub fn in_counted_poll() -> bool {
    CLOCK.with(|c| !matches!(c.get(), Clock::Off))
}

/// Puts back the clock of whatever poll was running around a `Counted` one, even if that
/// one panics (the thread goes on polling other tasks).
struct ClockRestored(Clock);

impl Drop for ClockRestored {
    fn drop(&mut self) {
        CLOCK.with(|c| c.set(self.0));
    }
}

pin_project_lite::pin_project! {
    /// A task's future, each poll of which starts a new epoch. Whatever notes epochs
    /// must run inside one: outside, the epoch could stay the same across polls, and a
    /// socket skipped as not ready would never be asked again.
    pub struct Counted<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Counted<F> {
    pub fn new(inner: F) -> Counted<F> {
        Counted { inner }
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        next();
        let _restored = ClockRestored(CLOCK.with(|c| c.replace(Clock::Unread)));
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_poll_of_a_counted_task_is_a_new_epoch_and_threads_never_share_one() {
        let seen = Counted::new(async {
            let first = now();
            let same = now();
            tokio::task::yield_now().await;
            (first, same, now())
        })
        .await;
        assert_eq!(seen.0, seen.1, "one poll, one epoch");
        assert_ne!(seen.1, seen.2, "a new poll, a new epoch");
        assert_ne!(seen.0, 0);
        let other = std::thread::spawn(now).join().unwrap_or(0);
        assert!(
            other >> 48 != seen.0 >> 48,
            "each thread counts in its own range"
        );
    }

    #[tokio::test]
    async fn a_counted_poll_reads_the_clock_once_and_outside_one_it_is_read_each_time() {
        let pause = std::time::Duration::from_millis(2);
        let (first, same, later) = Counted::new(async move {
            let first = instant();
            std::thread::sleep(pause);
            let same = instant();
            tokio::time::sleep(pause).await;
            (first, same, instant())
        })
        .await;
        assert_eq!(first, same, "one poll, one instant");
        assert!(later >= first + pause, "a new poll reads the clock again");
        let outside = instant();
        std::thread::sleep(pause);
        assert!(
            instant() >= outside + pause,
            "outside a counted poll: read each time"
        );
        assert!(
            outside >= later,
            "and not left at the counted task's instant"
        );
    }
}
