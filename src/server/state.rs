//! What a backend still owes: the bookkeeping that decides when a backend is idle.
//!
//! Every Query, FunctionCall and Sync the client sends is answered by exactly one
//! ReadyForQuery (after an error in the extended protocol Postgres skips to the next Sync,
//! which keeps the count exact). Extended-protocol messages sent since the last Sync are
//! work in progress even before they are answered. A backend is idle only when nothing is
//! owed, no extended batch is open, and its last ReadyForQuery said `I`.
//!
//! Transaction pooling will grow this into a queue of expected replies (to swallow the
//! replies of injected messages); the counting rule stays the same.

/// Transaction status from the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplyTracker {
    ready_owed: u32,
    extended_open: bool,
    tx: TxStatus,
}

impl Default for ReplyTracker {
    fn default() -> Self {
        ReplyTracker {
            ready_owed: 0,
            extended_open: false,
            tx: TxStatus::Idle,
        }
    }
}

impl ReplyTracker {
    /// Notes a message sent to the backend.
    pub fn sent(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => self.ready_owed += 1,
            b'S' => {
                self.ready_owed += 1;
                self.extended_open = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.extended_open = true,
            _ => {}
        }
    }

    /// Notes a ReadyForQuery from the backend. Returns false if none was owed
    /// (the backend is out of step with us and must not be reused).
    pub fn ready(&mut self, status: TxStatus) -> bool {
        self.tx = status;
        if self.ready_owed == 0 {
            return false;
        }
        self.ready_owed -= 1;
        true
    }

    /// Nothing owed and no extended batch open: a safe point to run our own queries.
    pub fn at_boundary(&self) -> bool {
        self.ready_owed == 0 && !self.extended_open
    }

    /// At a boundary and outside any transaction block.
    pub fn is_idle(&self) -> bool {
        self.at_boundary() && self.tx == TxStatus::Idle
    }

    pub fn tx_status(&self) -> TxStatus {
        self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simple_query_is_owed_until_its_ready_for_query() {
        let mut t = ReplyTracker::default();
        assert!(t.is_idle());
        t.sent(b'Q');
        assert!(!t.at_boundary());
        assert!(t.ready(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn pipelined_syncs_are_each_answered() {
        let mut t = ReplyTracker::default();
        for _ in 0..3 {
            t.sent(b'P');
            t.sent(b'B');
            t.sent(b'E');
            t.sent(b'S');
        }
        assert!(t.ready(TxStatus::Idle));
        assert!(t.ready(TxStatus::Idle));
        assert!(!t.at_boundary());
        assert!(t.ready(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn an_extended_batch_without_sync_is_work_in_progress() {
        let mut t = ReplyTracker::default();
        t.sent(b'P');
        t.sent(b'D');
        t.sent(b'H');
        assert!(!t.at_boundary(), "Flush does not close the batch");
        t.sent(b'S');
        assert!(t.ready(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn an_open_transaction_is_a_boundary_but_not_idle() {
        let mut t = ReplyTracker::default();
        t.sent(b'Q');
        assert!(t.ready(TxStatus::InTransaction));
        assert!(t.at_boundary());
        assert!(!t.is_idle());
        t.sent(b'Q');
        assert!(t.ready(TxStatus::Failed));
        assert_eq!(t.tx_status(), TxStatus::Failed);
    }

    #[test]
    fn an_unexpected_ready_for_query_is_reported() {
        let mut t = ReplyTracker::default();
        assert!(!t.ready(TxStatus::Idle));
    }
}
