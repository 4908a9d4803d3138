//! Graceful shutdown, in two stages.
//!
//! *Draining* (SIGTERM, SIGINT): the listener closes, clients between transactions are
//! told "pgshield is shutting down" and closed, clients inside a transaction finish it
//! first. *Forced* (after `pool.shutdown_timeout`, or a second signal): every remaining
//! client is closed at once and its backend discarded. Sessions watch both tokens; the
//! proxy waits for its sessions, then closes the pools.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default, Debug)]
pub struct Shutdown {
    draining: CancellationToken,
    forced: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts draining: no new clients, clients leave at their next idle moment.
    pub fn begin(&self) {
        self.draining.cancel();
    }

    /// Closes everyone now.
    pub fn force(&self) {
        self.draining.cancel();
        self.forced.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub async fn draining(&self) {
        self.draining.cancelled().await
    }

    pub async fn forced(&self) {
        self.forced.cancelled().await
    }
}
