//! Graceful shutdown, in two stages.
//!
//! *Draining* (SIGTERM, SIGINT): the listener closes, clients between transactions are
//! told "pgshield is shutting down" and closed, clients inside a transaction finish it
//! first. *Forced* (after `pool.shutdown_timeout`, or a second signal): every remaining
//! client is closed at once and its backend discarded. The proxy waits for its sessions,
//! then closes the pools.
//!
//! The listener and logins await the stage as futures. Sessions look at it on every turn
//! of their loop, so they hold a [`Watch`] instead: checking it is two atomic operations,
//! where polling a shared future would take a lock that every session contends for.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::FastMap;

/// Where the shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Running = 0,
    Draining = 1,
    Forced = 2,
}

#[derive(Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    forced: CancellationToken,
    /// SHUTDOWN WAIT_FOR_CLIENTS: stop listening, serve who is connected until they leave.
    closing: CancellationToken,
    watchers: Arc<Watchers>,
}

/// The stage, and the sessions to wake when it moves.
#[derive(Default)]
struct Watchers {
    stage: AtomicU8,
    next_id: AtomicU64,
    wakers: Mutex<FastMap<u64, Arc<AtomicWaker>>>,
}

impl Watchers {
    fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Acquire) {
            0 => Stage::Running,
            1 => Stage::Draining,
            _ => Stage::Forced,
        }
    }

    fn advance(&self, to: Stage) {
        self.stage.fetch_max(to as u8, Ordering::AcqRel);
        let wakers = self
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for waker in wakers.values() {
            waker.wake();
        }
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts draining: no new clients, clients leave at their next idle moment.
    pub fn begin(&self) {
        self.watchers.advance(Stage::Draining);
        self.draining.cancel();
    }

    /// Closes everyone now.
    pub fn force(&self) {
        self.watchers.advance(Stage::Forced);
        self.draining.cancel();
        self.forced.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.watchers.stage() >= Stage::Draining
    }

    pub async fn draining(&self) {
        self.draining.cancelled().await
    }

    /// Stops accepting clients; those connected are served until they leave (then
    /// pgshield exits). For handing the port over to a new process (`listen.reuse_port`).
    pub fn close_listener(&self) {
        self.closing.cancel();
    }

    pub fn is_listener_closed(&self) -> bool {
        self.closing.is_cancelled()
    }

    pub async fn listener_closed(&self) {
        self.closing.cancelled().await
    }

    pub async fn forced(&self) {
        self.forced.cancelled().await
    }

    /// A handle for one session to look at the stage from its own poll.
    pub fn watch(&self) -> Watch {
        let id = self.watchers.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.watchers
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, Arc::clone(&waker));
        Watch {
            watchers: Arc::clone(&self.watchers),
            id,
            waker,
        }
    }
}

/// One session's view of the shutdown; dropping it unregisters.
pub struct Watch {
    watchers: Arc<Watchers>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Watch {
    /// The waker this watch registers: waking it makes its session look again.
    pub fn waker(&self) -> Arc<AtomicWaker> {
        Arc::clone(&self.waker)
    }

    /// The stage now; the task polling is woken when it moves on.
    pub fn poll_stage(&self, cx: &mut Context<'_>) -> Stage {
        // Register first, then look: a stage change in between still wakes us.
        self.waker.register(cx.waker());
        self.watchers.stage()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.watchers
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    #[tokio::test]
    async fn a_watch_is_woken_by_each_stage() {
        let shutdown = Shutdown::new();
        let watch = shutdown.watch();
        let waiter = tokio::spawn(async move {
            let draining = poll_fn(|cx| match watch.poll_stage(cx) {
                Stage::Running => Poll::Pending,
                stage => Poll::Ready(stage),
            })
            .await;
            let forced = poll_fn(|cx| match watch.poll_stage(cx) {
                Stage::Forced => Poll::Ready(Stage::Forced),
                _ => Poll::Pending,
            })
            .await;
            (draining, forced)
        });
        tokio::task::yield_now().await;
        assert!(!shutdown.is_draining());
        shutdown.begin();
        tokio::task::yield_now().await;
        shutdown.force();
        let stages = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(stages, (Stage::Draining, Stage::Forced));
        assert!(shutdown.is_draining());
        assert!(shutdown.watchers.wakers.lock().unwrap().is_empty());
    }
}
