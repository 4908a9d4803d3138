//! What a backend still owes: the queue of replies its client's messages will produce,
//! and the rules PostgreSQL uses to skip some of them. It decides when a backend is idle.
//!
//! Each message the client sends that the server answers is queued in order; each reply
//! from the server completes the entry at the front. Three PostgreSQL rules make the count
//! differ from "one ReadyForQuery per Sync":
//! - after an ErrorResponse in the extended protocol the server discards every message
//!   until the next Sync (which it answers);
//! - during COPY FROM STDIN it ignores Sync and Flush (and consumes anything else but
//!   CopyData, CopyDone and CopyFail), until the client's CopyDone or CopyFail;
//! - an ErrorResponse inside a simple Query or FunctionCall ends it with ReadyForQuery.
//!
//! A backend is idle when nothing is queued, no extended-protocol batch is open (messages
//! sent since the last Sync run in one implicit transaction), and its last ReadyForQuery
//! said `I`.
//!
//! One case cannot be judged from outside: when a COPY FROM STDIN whose client had already
//! queued a Sync (or anything else) behind it fails, whether the server consumed those
//! messages depends on when the error struck. The tracker then stops judging that backend
//! ("unsure"): no reply is out of step any more, and it is not idle again until an empty
//! Query of pgshield's has found its place among the replies (`resync_sent`). If only
//! Syncs were in doubt, it is then reused; if a statement message was (a Parse behind the
//! COPY), its prepared statements may be other than recorded, and it is closed. The
//! session asks only `at_boundary` and `is_idle`; everything else stays in here,
//! unit-tested without a database.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;

use crate::prepared::Statement;
use crate::protocol::frame::HEADER_LEN;

pub use crate::prepared::{StatementDrop, Undo};

/// CopyDone/CopyFail markers kept in a row with nothing owed between (see `sent_with`).
const MAX_COPY_ENDS_IN_A_ROW: usize = 16;

/// Whether a client message of this tag may change the server's prepared statements.
fn changes_statements(tag: u8) -> bool {
    Owed::from_tag(tag).is_some_and(Owed::changes_statements)
}

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

/// A client message whose reply is still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
    /// CopyDone or CopyFail: answers nothing itself, but marks where a COPY FROM STDIN
    /// ends in the client's stream.
    CopyEnd,
    /// A reply pgshield gives the client itself, in this place.
    Fake(Fake),
}

impl Owed {
    /// Whether the message may change the server's prepared statements (a Parse, a Close,
    /// a Query or function call that may run PREPARE or DEALLOCATE).
    fn changes_statements(self) -> bool {
        matches!(
            self,
            Owed::Parse | Owed::Close | Owed::Query | Owed::FunctionCall
        )
    }

    fn from_tag(tag: u8) -> Option<Owed> {
        Some(match tag {
            b'P' => Owed::Parse,
            b'B' => Owed::Bind,
            b'D' => Owed::Describe,
            b'E' => Owed::Execute,
            b'C' => Owed::Close,
            b'S' => Owed::Sync,
            b'Q' => Owed::Query,
            b'F' => Owed::FunctionCall,
            b'c' | b'f' => Owed::CopyEnd,
            _ => return None,
        })
    }

    /// Answered by ReadyForQuery.
    fn ends_with_ready(self) -> bool {
        matches!(self, Owed::Sync | Owed::Query | Owed::FunctionCall)
    }
}

/// A reply pgshield writes to the client in place of the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fake {
    ParseComplete,
    CloseComplete,
}

impl Fake {
    pub fn write(self, out: &mut BytesMut) {
        let tag = match self {
            Fake::ParseComplete => b'1',
            Fake::CloseComplete => b'3',
        };
        out.extend_from_slice(&[tag, 0, 0, 0, 4]);
    }
}

/// What becomes of a reply from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It goes to the client.
    Forward,
    /// It answers a message pgshield injected: the client never sees it.
    Swallow,
}

/// Whether the client sees the replies to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hide {
    /// A client message: its replies go to the client.
    No,
    /// Injected for the client (a Parse it needs): replies swallowed, errors passed on,
    /// since they say why what the client asked for failed.
    KeepErrors,
    /// pgshield's own business (reading settings back): nothing reaches the client.
    All,
}

#[derive(Debug)]
struct Entry {
    owed: Owed,
    /// An ErrorResponse came inside it (simple Query or FunctionCall).
    failed: bool,
    /// A Query that drops prepared statements: what the session forgets once it succeeded.
    drops: Option<StatementDrop>,
    hide: Hide,
    /// What to take back if the server never acts on this message.
    undo: Option<Undo>,
    /// The named statement a Bind runs or a Describe describes.
    statement: Option<Arc<Statement>>,
    /// A Flush was sent after it: the server sends its reply without more from the
    /// client (see [`ReplyTracker::awaiting_reply`]).
    flushed: bool,
}

/// What a client whose backend was lost is still owed (see [`ReplyTracker::lost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Queries, Syncs and function calls unanswered: each gets an error and a
    /// ReadyForQuery.
    pub readies: usize,
    /// Extended-protocol messages after the last Sync: an error now, then everything up
    /// to the client's Sync is skipped.
    pub open_batch: bool,
    /// The server had already failed that batch (the client has its error, unless it
    /// was a FATAL pgshield held back).
    pub batch_failed: bool,
    /// The client was inside a transaction block (it stays failed until it ends it).
    pub in_transaction: bool,
}

/// The tag and end of the whole message at `at` in `buf`, if it is there whole (and its
/// length is valid).
fn next_whole(buf: &[u8], at: usize) -> Option<(u8, usize)> {
    let &[tag, a, b, c, d] = buf.get(at..at.checked_add(HEADER_LEN)?)? else {
        return None;
    };
    let len = usize::try_from(i32::from_be_bytes([a, b, c, d]))
        .ok()
        .filter(|&l| l >= 4)?;
    let end = at.checked_add(len + 1).filter(|&end| end <= buf.len())?;
    Some((tag, end))
}

/// The answer to all that was owed, taken in one step ([`ReplyTracker::answer_whole`]).
#[derive(Debug)]
pub struct Whole {
    /// Its length in the buffer.
    pub len: usize,
    /// What its ReadyForQuery said.
    pub status: TxStatus,
    /// A named statement's description in it (RowDescription or NoData, the range of
    /// that message), to be looked at as the replies taken one by one would be.
    pub described: Option<(Arc<Statement>, std::ops::Range<usize>)>,
}

/// The server answered something nobody asked for: the backend is out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfStep;

#[derive(Debug)]
pub struct ReplyTracker {
    owed: VecDeque<Entry>,
    /// Messages the server will never act on (skipped after an error), to be taken back.
    undone: Vec<Undo>,
    /// Statement drops whose Query has finished (see `sent_dropping`).
    drops: Vec<(StatementDrop, bool)>,
    /// Portals bound from a statement that drops the client's prepared statements (see
    /// [`ReplyTracker::bound`]), each with the Syncs sent before its Bind; mostly none.
    dropping_portals: Vec<(Box<[u8]>, u64)>,
    /// Syncs the server has answered (a ReadyForQuery ending one): the batches over.
    synced: u64,
    /// Since the last ReadyForQuery, a message went to the server that may end a failed
    /// transaction block: an Execute or a Query (of a ROLLBACK). A Sync does not (it ends
    /// only an implicit transaction), nor a FunctionCall (refused there).
    may_have_ended: bool,
    /// Extended-protocol messages sent since the last Sync.
    extended_open: bool,
    /// Syncs sent: the number of the batch now being sent.
    syncs: u64,
    /// The server is discarding the client's messages until a Sync (after an error).
    skipping_to_sync: bool,
    /// The statement of the Bind or Describe the last error answered (see
    /// [`ReplyTracker::take_failed_statement`]).
    failed_statement: Option<Arc<Statement>>,
    /// The client's name that the Parse the server's last ErrorResponse answered
    /// prepared again, and the shared name it went under (see
    /// [`ReplyTracker::take_failed_reprepare`]).
    failed_reprepare: Option<(Arc<str>, Arc<str>)>,
    /// The server is in COPY FROM STDIN and the client has not ended it yet.
    client_copying: bool,
    /// The server is in COPY FROM STDIN, and messages were dropped from `owed` that it
    /// consumes only if the COPY gets as far as reading them.
    copy_swallowed_messages: bool,
    /// The replies can no longer be matched with certainty (see the module doc).
    unsure: bool,
    /// Nor can what the server made of statement messages (a Parse, a Close) sent during
    /// or behind a COPY that failed: its prepared statements may be other than recorded.
    /// (Not so when only Syncs were in doubt: a resync ends all doubt then.)
    statements_unsure: bool,
    /// pgshield's empty Query, sent to find its place again among an unsure backend's
    /// replies (see [`ReplyTracker::resync_sent`]): sent, and whether its
    /// EmptyQueryResponse has come.
    resync: Option<bool>,
    tx: TxStatus,
}

impl Default for ReplyTracker {
    fn default() -> Self {
        ReplyTracker {
            owed: VecDeque::new(),
            undone: Vec::new(),
            drops: Vec::new(),
            dropping_portals: Vec::new(),
            synced: 0,
            may_have_ended: false,
            extended_open: false,
            syncs: 0,
            skipping_to_sync: false,
            failed_statement: None,
            failed_reprepare: None,
            client_copying: false,
            copy_swallowed_messages: false,
            unsure: false,
            statements_unsure: false,
            resync: None,
            tx: TxStatus::Idle,
        }
    }
}

impl ReplyTracker {
    /// Notes a client message passed to the backend.
    pub fn sent(&mut self, tag: u8) {
        self.sent_with(tag, Hide::No, None);
    }

    /// Notes a message sent to the backend: how its replies are hidden from the client,
    /// and what to take back if the server never acts on it.
    pub fn sent_with(&mut self, tag: u8, hide: Hide, undo: Option<Undo>) {
        // (Counted even where the server ignores it, in COPY: a batch counted too many
        // only makes pgshield prepare a statement again, to be sure.)
        self.syncs += u64::from(tag == b'S');
        self.may_have_ended |= matches!(tag, b'E' | b'Q');
        if tag == b'H' {
            self.flush_covers_owed();
        }
        if self.client_copying {
            match tag {
                b'c' | b'f' => self.client_copying = false,
                b'd' | b'H' => {}
                // Ignored by the COPY if it reads that far, answered if it fails first.
                b'S' => self.copy_swallowed_messages = true,
                // A statement inside COPY data: the server errors, then runs what follows.
                _ => {
                    self.unsure = true;
                    self.statements_unsure |= changes_statements(tag);
                }
            }
            self.undone.extend(undo);
            return;
        }
        if self.skipping_to_sync {
            if tag != b'S' {
                // (Replies in doubt: the server may run this after all, had it answered a
                // Sync thought swallowed by a failed COPY.)
                self.statements_unsure |= self.unsure && changes_statements(tag);
                self.undone.extend(undo);
                return;
            }
            self.skipping_to_sync = false;
        }
        match tag {
            b'P' | b'B' | b'D' | b'E' | b'C' => self.extended_open = true,
            // (A simple Query or a function call ends an extended batch too, as a Sync:
            // its ReadyForQuery ends the implicit transaction. Behind an error the server
            // skips it, which `error` handles by what is owed.)
            b'S' | b'Q' | b'F' => self.extended_open = false,
            _ => {}
        }
        match Owed::from_tag(tag) {
            // A CopyDone or CopyFail with nothing owed (its COPY failed, and its
            // ReadyForQuery came, before this was passed on): the server ignores it, and
            // it marks the end of no COPY still to come.
            Some(Owed::CopyEnd) if self.owed.is_empty() => self.undone.extend(undo),
            // Behind many others with nothing owed between: each may end one COPY of a
            // Query that holds several (its data sent ahead of each CopyInResponse), but
            // not this many; thousands would fill the owed replies' bound with nothing to
            // answer them. (Past it, a COPY that does come finds no marker: the replies
            // are then taken as unsure, still passed on right.)
            Some(Owed::CopyEnd)
                if self
                    .owed
                    .iter()
                    .rev()
                    .take(MAX_COPY_ENDS_IN_A_ROW)
                    .filter(|e| e.owed == Owed::CopyEnd)
                    .count()
                    == MAX_COPY_ENDS_IN_A_ROW =>
            {
                self.undone.extend(undo)
            }
            Some(owed) => self.owed.push_back(Entry {
                owed,
                failed: false,
                drops: None,
                hide,
                undo,
                statement: None,
                flushed: false,
            }),
            None => self.undone.extend(undo),
        }
    }

    /// Notes a client's simple Query that drops prepared statements (DISCARD ALL, or a
    /// DEALLOCATE of one of pgshield's names): once it has run without error, the drop
    /// is handed back by [`ReplyTracker::take_drops`].
    pub fn sent_dropping(&mut self, drops: StatementDrop) {
        self.sent(b'Q');
        if let Some(entry) = self.owed.back_mut().filter(|e| e.owed == Owed::Query) {
            entry.drops = Some(drops);
        }
    }

    /// Notes a Bind of `portal` sent: of a statement that drops the client's prepared
    /// statements (`drops`: DISCARD ALL or DEALLOCATE ALL, through the extended protocol),
    /// or of another, which replaces a portal of that name. The client's names go when an
    /// Execute of such a portal is sent ([`ReplyTracker::take_dropping_portal`]), and come
    /// back if it does not run: a Bind never executed, or one whose Execute fails
    /// (DISCARD ALL in a transaction block), drops nothing, as in PostgreSQL.
    pub fn bound(&mut self, portal: &[u8], drops: bool) {
        self.dropping_portals.retain(|(p, _)| **p != *portal);
        if drops {
            self.dropping_portals.push((portal.into(), self.syncs));
        }
    }

    /// Whether a portal that drops the client's statements is bound
    /// ([`ReplyTracker::bound`]): each Bind and Execute is to be noted with its portal.
    pub fn has_dropping_portal(&self) -> bool {
        !self.dropping_portals.is_empty()
    }

    /// Whether `portal` drops the client's statements, which an Execute of it, about to
    /// be sent, does (once: a portal runs to its end).
    pub fn take_dropping_portal(&mut self, portal: &[u8]) -> bool {
        let at = self
            .dropping_portals
            .iter()
            .position(|(p, _)| **p == *portal);
        at.map(|at| self.dropping_portals.swap_remove(at)).is_some()
    }

    /// Notes the named statement the Bind or Describe just sent uses: should the server
    /// fail it, [`ReplyTracker::take_failed_statement`] tells which statement failed.
    pub fn uses(&mut self, statement: Arc<Statement>) {
        if let Some(entry) = self
            .owed
            .back_mut()
            .filter(|e| matches!(e.owed, Owed::Bind | Owed::Describe))
        {
            entry.statement = Some(statement);
        }
    }

    /// The statement whose Bind or Describe the server's last ErrorResponse answered
    /// (until the next ReadyForQuery).
    pub fn take_failed_statement(&mut self) -> Option<Arc<Statement>> {
        self.failed_statement.take()
    }

    /// The client's name and the shared one, if the server's last ErrorResponse answered
    /// a Parse that prepared a name the client already has ([`Undo::Reprepare`]; until
    /// the next ReadyForQuery): the server's error names the shared statement instead.
    pub fn take_failed_reprepare(&mut self) -> Option<(Arc<str>, Arc<str>)> {
        self.failed_reprepare.take()
    }

    /// Drops of statements that happened (`true`) or may have (`false`, after an error),
    /// in order.
    pub fn take_drops(&mut self) -> Vec<(StatementDrop, bool)> {
        std::mem::take(&mut self.drops)
    }

    /// Notes a reply pgshield gives the client itself for an extended-protocol message
    /// it did not pass on; it is written in its place among the server's replies.
    pub fn fake(&mut self, fake: Fake, undo: Option<Undo>) {
        if self.client_copying || self.skipping_to_sync {
            // The server would not have answered this message: neither do we.
            if self.client_copying {
                self.unsure = true;
                self.statements_unsure = true;
            }
            self.undone.extend(undo);
            return;
        }
        self.extended_open = true;
        self.owed.push_back(Entry {
            owed: Owed::Fake(fake),
            failed: false,
            drops: None,
            hide: Hide::No,
            undo,
            statement: None,
            flushed: false,
        });
    }

    /// Writes the fake replies now due (those before any reply still owed by the server).
    /// Call whenever no server message is half-passed to the client.
    #[inline]
    pub fn write_due_fakes(&mut self, out: &mut BytesMut) {
        while let Some(Entry {
            owed: Owed::Fake(fake),
            ..
        }) = self.owed.front()
        {
            fake.write(out);
            self.owed.pop_front();
        }
    }

    /// Whether a message sent now would follow others in its batch (since the last Sync):
    /// the server skips it if one of them fails.
    pub fn batch_open(&self) -> bool {
        self.extended_open || self.skipping_to_sync || self.client_copying
    }

    /// Whether a departed client's messages can be run to their end as PostgreSQL would
    /// (see [`crate::server::Server::drain_departed`]): its replies can be matched, no
    /// COPY FROM STDIN waits for its data, and no extended batch waits for a Sync (which
    /// PostgreSQL would never get: its implicit transaction is not to commit). Also
    /// whether a Sync must be added: the server skips to one after an error.
    pub fn departure_drainable(&self) -> Option<bool> {
        let unsynced = self.extended_open && !self.skipping_to_sync;
        (!self.unsure && !self.client_copying && !unsynced).then_some(self.skipping_to_sync)
    }

    /// Whether the server answers what is sent now: it is not skipping to a Sync after
    /// an error, nor in COPY FROM STDIN, and the replies can still be matched.
    pub fn answers_what_is_sent(&self) -> bool {
        !(self.skipping_to_sync || self.client_copying || self.unsure)
    }

    /// The statement whose description the next RowDescription or NoData is, if the
    /// Describe it answers named one (see [`ReplyTracker::uses`]); and whether that
    /// Describe was pgshield's own (its replies hidden from the client).
    pub fn describing(&self) -> Option<(&Arc<Statement>, bool)> {
        let entry = self.owed.iter().find(|e| e.owed != Owed::CopyEnd)?;
        if entry.owed != Owed::Describe {
            return None;
        }
        Some((entry.statement.as_ref()?, entry.hide != Hide::No))
    }

    /// Whether a Describe of `statement` is still owed a reply.
    pub fn owes_description_of(&self, statement: &Arc<Statement>) -> bool {
        self.owed.iter().any(|e| {
            e.owed == Owed::Describe
                && e.statement
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(s, statement))
        })
    }

    /// The batch a message sent now belongs to (the Syncs sent before it).
    pub fn batch(&self) -> u64 {
        self.syncs
    }

    /// How many bytes at the start of `buf` are whole replies that change nothing tracked
    /// here and reach the client as they are, in the state the replies are in now: rows,
    /// COPY data, notices and notifications, and within a simple Query also its row
    /// descriptions and command completions. The session passes them on in one copy,
    /// without `received` (rows are most of what a server sends). None of them completes
    /// anything, so no reply pgshield gives itself falls due between them.
    pub fn untracked_prefix(&self, buf: &[u8]) -> usize {
        let Some(front) = self.owed.front() else {
            return 0;
        };
        if self.unsure || front.hide != Hide::No {
            return 0;
        }
        // (`matched` passes these on as they are; in a Query, T and C too, as long as no
        // COPY FROM STDIN is open: a C then also ends what the COPY swallowed.)
        let in_query = front.owed == Owed::Query && !self.copy_swallowed_messages;
        let mut at = 0;
        while let Some(&[tag, a, b, c, d]) = buf.get(at..at + HEADER_LEN) {
            let len = i32::from_be_bytes([a, b, c, d]);
            // (Not a notification: the session looks at each; see `Session`'s relay.)
            let plain =
                matches!(tag, b'D' | b'd' | b'N') || (in_query && matches!(tag, b'T' | b'C'));
            // (A bad length is the general path's to report.)
            let Some(len) = usize::try_from(len).ok().filter(|&l| l >= 4).map(|l| l + 1) else {
                break;
            };
            if !plain || buf.len() - at < len {
                break;
            }
            at += len;
        }
        at
    }

    /// The common case of the replies to what a client sent, taken in one step: when
    /// everything owed is the client's own (a simple Query, or extended-protocol messages
    /// up to one Sync: nothing pgshield added, no COPY, no statement drop, at most one
    /// Describe of a named statement) and `buf` holds all that is left of its answer,
    /// whole, with its one ReadyForQuery at the very end and nothing else to look at but
    /// that Describe's description ([`Whole::described`]). Notes it all as
    /// [`ReplyTracker::received`] would each message. None, changing nothing, otherwise:
    /// the replies are then taken one by one.
    pub fn answer_whole(&mut self, buf: &[u8]) -> Option<Whole> {
        if self.unsure
            || self.copy_swallowed_messages
            || self.client_copying
            || self.extended_open
            || self.skipping_to_sync
            || self.has_takebacks()
        {
            return None;
        }
        let last = self.owed.len().checked_sub(1)?;
        if last == 0 && self.owed[0].owed == Owed::Query {
            // (The most common, a simple Query, on a shorter path.)
            return self.answer_whole_query(buf);
        }
        let plain = |(i, e): (usize, &Entry)| {
            let kind = !matches!(e.owed, Owed::FunctionCall | Owed::CopyEnd | Owed::Fake(_));
            // (Only the last is answered by a ReadyForQuery: it ends all that is owed.)
            kind && e.hide == Hide::No
                && e.drops.is_none()
                && e.owed.ends_with_ready() == (i == last)
        };
        if !self.owed.iter().enumerate().all(plain) {
            return None;
        }
        // What `matched` would make of each reply: the entries it completes, in order.
        let mut completed = 0;
        // (The entry, and the reply, of the description to look at.)
        let mut described = None;
        let mut at = 0;
        while let Some((tag, end)) = next_whole(buf, at) {
            let front = self.owed.get(completed);
            let kind = front.map(|e| e.owed);
            let completes = match tag {
                b'1' => Some(Owed::Parse),
                b'2' => Some(Owed::Bind),
                b'3' => Some(Owed::Close),
                b'T' | b'n' => Some(Owed::Describe).filter(|_| kind == Some(Owed::Describe)),
                b'C' | b'I' | b's' => Some(Owed::Execute).filter(|_| kind == Some(Owed::Execute)),
                b'D' | b't' | b'N' => None,
                b'Z' if end == buf.len() && end - at == HEADER_LEN + 1 => {
                    let status = TxStatus::from_byte(buf[at + HEADER_LEN])?;
                    let mut statement = None;
                    for i in 0..completed {
                        let Some(entry) = self.owed.pop_front() else {
                            break;
                        };
                        if let Some(undo) = &entry.undo {
                            undo.succeeded();
                        }
                        if described.as_ref().is_some_and(|(at, _)| *at == i) {
                            statement = entry.statement;
                        }
                    }
                    self.ready(status).ok()?;
                    return Some(Whole {
                        len: end,
                        status,
                        described: statement.zip(described.map(|(_, reply)| reply)),
                    });
                }
                _ => return None,
            };
            if let Some(owed) = completes {
                if kind != Some(owed) {
                    return None;
                }
                if owed == Owed::Describe && front.is_some_and(|e| e.statement.is_some()) {
                    if described.is_some() {
                        return None;
                    }
                    described = Some((completed, at..end));
                }
                completed += 1;
            }
            at = end;
        }
        None
    }

    /// [`ReplyTracker::answer_whole`] for a simple Query, the one entry owed.
    fn answer_whole_query(&mut self, buf: &[u8]) -> Option<Whole> {
        let entry = &self.owed[0];
        if entry.hide != Hide::No || entry.drops.is_some() {
            return None;
        }
        let mut at = 0;
        while let Some((tag, end)) = next_whole(buf, at) {
            match tag {
                b'T' | b'D' | b'C' | b'I' | b'N' => at = end,
                b'Z' if end == buf.len() && end - at == HEADER_LEN + 1 => {
                    let status = TxStatus::from_byte(buf[at + HEADER_LEN])?;
                    self.ready(status).ok()?;
                    return Some(Whole {
                        len: end,
                        status,
                        described: None,
                    });
                }
                _ => return None,
            }
        }
        None
    }

    /// Whether `take_undone` or `take_drops` has anything (mostly not: a cheap look).
    pub fn has_takebacks(&self) -> bool {
        !self.undone.is_empty() || !self.drops.is_empty()
    }

    /// What the server will never act on, to be taken back (in the order it was sent).
    pub fn take_undone(&mut self) -> Vec<Undo> {
        std::mem::take(&mut self.undone)
    }

    /// Notes a message from the backend and says whether the client gets it. `status`
    /// is the first body byte (ReadyForQuery's transaction status). Async messages
    /// (notices, notifications, parameter changes) and rows change nothing. Due fake
    /// replies must have been written first ([`ReplyTracker::write_due_fakes`]).
    pub fn received(&mut self, tag: u8, status: Option<u8>) -> Result<Disposition, OutOfStep> {
        use Disposition::Forward;
        if let Some(answered) = self.resync {
            // Until its EmptyQueryResponse, a ReadyForQuery is the client's (the one more
            // than counted); then the next ends the resync, and the replies can be matched
            // again.
            return Ok(match (tag, answered) {
                (b'I', false) => {
                    self.resync = Some(true);
                    Disposition::Swallow
                }
                (b'Z', true) => {
                    self.resync = None;
                    self.unsure = false;
                    self.tx = status.and_then(TxStatus::from_byte).unwrap_or(self.tx);
                    // (Its own entry, first: what the client sent since queued behind.)
                    self.owed.pop_front();
                    Disposition::Swallow
                }
                _ => Forward,
            });
        }
        if self.answering_hidden_query() {
            if tag == b'Z' {
                self.ready(status.and_then(TxStatus::from_byte).ok_or(OutOfStep)?)?;
            } else if tag == b'E' {
                self.error();
            }
            // Async messages (notices, parameter changes) are still the client's.
            return Ok(if matches!(tag, b'N' | b'A' | b'S') {
                Forward
            } else {
                Disposition::Swallow
            });
        }
        if self.unsure {
            // Replies are still matched where they can be, so that pgshield's own replies
            // queued behind them are written in their place (a Close it answers, after
            // the failed COPY before it), and a ReadyForQuery still ends what it ends; one
            // that does not match is passed on, not an error: the server may answer once
            // more or once less than counted. (Not pooled again until a resync ends the
            // doubt: see `is_unsure`.)
            if tag == b'Z' {
                self.tx = status.and_then(TxStatus::from_byte).unwrap_or(self.tx);
                // A ReadyForQuery ends a Sync or Query only once what came before it is
                // answered: one that comes sooner is the one more than counted, and must
                // not end what the client sent after (whose replies are still to come).
                if !self.front().is_some_and(|f| f.ends_with_ready()) {
                    return Ok(Forward);
                }
            }
            return Ok(self.matched(tag, status).unwrap_or(Forward));
        }
        self.matched(tag, status)
    }

    fn matched(&mut self, tag: u8, status: Option<u8>) -> Result<Disposition, OutOfStep> {
        use Disposition::Forward;
        match tag {
            b'1' => self.complete(Owed::Parse),
            b'2' => self.complete(Owed::Bind),
            b'3' => self.complete(Owed::Close),
            // RowDescription or NoData end a Describe; inside a Query they describe rows.
            b'T' | b'n' => {
                if self.front() == Some(Owed::Describe) {
                    return self.complete(Owed::Describe);
                }
                Ok(Forward)
            }
            // CommandComplete, EmptyQueryResponse, PortalSuspended end an Execute; a Query
            // goes on until its ReadyForQuery.
            b'C' | b'I' | b's' => {
                if tag == b'C' {
                    // A COPY FROM STDIN completes only after reading all its input.
                    self.copy_swallowed_messages = false;
                }
                if self.front() == Some(Owed::Execute) {
                    return self.complete(Owed::Execute);
                }
                Ok(Forward)
            }
            b'G' => {
                self.copy_in_started();
                Ok(Forward)
            }
            // ParameterDescription: the first reply to a Describe of a statement.
            b't' => Ok(match self.owed.iter().find(|e| e.owed != Owed::CopyEnd) {
                Some(e) if e.owed == Owed::Describe && e.hide != Hide::No => Disposition::Swallow,
                _ => Forward,
            }),
            b'E' => {
                // Errors always reach the client, even those of injected messages: they
                // say why what the client asked for could not happen.
                self.error();
                Ok(Forward)
            }
            b'Z' => {
                self.ready(status.and_then(TxStatus::from_byte).ok_or(OutOfStep)?)?;
                Ok(Forward)
            }
            _ => Ok(Forward),
        }
    }

    /// The entry the next reply belongs to (CopyEnd markers answer nothing: skipped).
    fn front(&mut self) -> Option<Owed> {
        while self.owed.front().is_some_and(|e| e.owed == Owed::CopyEnd) {
            self.owed.pop_front();
        }
        self.owed.front().map(|e| e.owed)
    }

    fn complete(&mut self, expected: Owed) -> Result<Disposition, OutOfStep> {
        if self.front() != Some(expected) {
            return Err(OutOfStep);
        }
        let entry = self.owed.pop_front().ok_or(OutOfStep)?;
        if let Some(undo) = &entry.undo {
            undo.succeeded();
        }
        Ok(if entry.hide == Hide::No {
            Disposition::Forward
        } else {
            Disposition::Swallow
        })
    }

    /// The replies now arriving answer pgshield's own hidden Query.
    pub fn answering_hidden_query(&self) -> bool {
        self.owed
            .front()
            .is_some_and(|e| e.owed == Owed::Query && e.hide == Hide::All)
    }

    /// Drops entries the server will never answer, keeping what they would take back.
    fn abandon(&mut self, range: std::ops::Range<usize>) {
        for entry in self.owed.drain(range) {
            self.undone.extend(entry.undo);
        }
    }

    /// CopyInResponse: what the client sent between the COPY and its CopyDone/CopyFail is
    /// ignored (Sync, Flush) or consumed by the server if the COPY reads that far; drop it
    /// from what is owed, remembering that it was there.
    fn copy_in_started(&mut self) {
        let Some(command) = self.front() else {
            return;
        };
        let end = self.owed.iter().position(|e| e.owed == Owed::CopyEnd);
        let synced_after_data =
            end.is_some_and(|end| self.owed.iter().skip(end + 1).any(|e| e.owed == Owed::Sync));
        if command == Owed::Execute && !synced_after_data {
            // The Sync sent ahead of the data is ignored: the batch stays open until the
            // client's next Sync, after its CopyDone.
            self.extended_open = true;
        }
        let upto = match end {
            Some(end) => end + 1,
            None => {
                self.client_copying = true;
                self.owed.len()
            }
        };
        let swallowed: Vec<Owed> = self
            .owed
            .range(1..upto)
            .map(|e| e.owed)
            .filter(|o| *o != Owed::CopyEnd)
            .collect();
        self.abandon(1..upto);
        if swallowed.iter().any(|o| *o != Owed::Sync) {
            // Statements pipelined behind a COPY: the server errors on the first and runs
            // the rest; there is no telling how. Stop judging.
            self.unsure = true;
            self.statements_unsure |= swallowed.iter().any(|o| o.changes_statements());
        }
        self.copy_swallowed_messages = !swallowed.is_empty();
    }

    /// ErrorResponse. Inside a simple Query or FunctionCall, its ReadyForQuery still
    /// comes. In the extended protocol the server skips to the next Sync: everything
    /// before it is never acted on (the failed message included).
    fn error(&mut self) {
        // An error ends any COPY; what the client sends next is no longer COPY data.
        self.client_copying = false;
        let in_doubt = std::mem::take(&mut self.copy_swallowed_messages);
        if in_doubt {
            // The COPY failed, perhaps before reading the Sync queued behind it, which the
            // server would then answer after all: one ReadyForQuery more than counted.
            // (The COPY's own messages are over either way, as below.)
            self.unsure = true;
        }
        self.failed_statement = match self.front() {
            Some(Owed::Bind | Owed::Describe) => {
                self.owed.front_mut().and_then(|e| e.statement.take())
            }
            _ => None,
        };
        // (`front` first: past CopyEnd markers.)
        self.failed_reprepare = match self.front().and(self.owed.front()) {
            Some(Entry {
                owed: Owed::Parse,
                undo:
                    Some(Undo::Reprepare {
                        client_name,
                        shared_name,
                    }),
                ..
            }) => Some((Arc::clone(client_name), Arc::clone(shared_name))),
            _ => None,
        };
        match self.front() {
            // Nothing outstanding: an asynchronous error (e.g. FATAL on termination).
            None => {}
            Some(Owed::Query | Owed::FunctionCall) => {
                if let Some(entry) = self.owed.front_mut() {
                    entry.failed = true;
                }
            }
            Some(_) => {
                let sync = self.owed.iter().position(|e| e.owed == Owed::Sync);
                let upto = sync.unwrap_or(self.owed.len());
                // Taken for skipped, but run after all if the server answered the Sync in
                // doubt: what they do to prepared statements is not known then.
                self.statements_unsure |=
                    in_doubt && self.owed.range(..upto).any(|e| e.owed.changes_statements());
                self.abandon(0..upto);
                self.skipping_to_sync |= sync.is_none();
            }
        }
    }

    fn ready(&mut self, status: TxStatus) -> Result<(), OutOfStep> {
        self.tx = status;
        self.failed_statement = None;
        self.failed_reprepare = None;
        self.client_copying = false;
        self.copy_swallowed_messages = false;
        let Some(at) = self.owed.iter().position(|e| e.owed.ends_with_ready()) else {
            return Err(OutOfStep);
        };
        // (Mostly the Query or Sync it ends is all that was owed: taken alone, without
        // the cost of a drain.)
        let mut done = |entry: Entry| {
            if let Some(drops) = entry.drops {
                self.drops.push((drops, !entry.failed));
            }
        };
        let sync = self.owed.get(at).is_some_and(|e| e.owed == Owed::Sync);
        self.synced += u64::from(sync);
        if status == TxStatus::Idle && !self.dropping_portals.is_empty() {
            // (Portals last until their transaction ends: those of the batches this
            // ends go, not those of batches pipelined behind it.)
            let synced = self.synced;
            self.dropping_portals
                .retain(|(_, before)| *before >= synced);
        }
        if at == 0 {
            if let Some(entry) = self.owed.pop_front() {
                done(entry);
            }
        } else {
            for entry in self.owed.drain(..=at) {
                done(entry);
            }
        }
        // A CopyDone or CopyFail the client sent after its COPY failed, before this came:
        // the server ignores it (it marks the end of no COPY still to come: a later one's
        // would follow its own statement).
        while self.owed.front().is_some_and(|e| e.owed == Owed::CopyEnd) {
            self.owed.pop_front();
        }
        // (What was sent after what this answers may end the transaction it reports; only
        // of use in a failed one.)
        self.may_have_ended = status == TxStatus::Failed
            && self
                .owed
                .iter()
                .any(|e| matches!(e.owed, Owed::Execute | Owed::Query));
        Ok(())
    }

    /// The backend is gone while its client waited on it: what the client is still owed,
    /// for pgshield to answer in the server's place, and everything owed is dropped (what
    /// it would take back is in `take_undone`). None, changing nothing, when that cannot
    /// be told: during COPY FROM STDIN, once unsure, or while one of pgshield's own
    /// queries was running.
    pub fn lost(&mut self) -> Option<Lost> {
        if self.unsure
            || self.client_copying
            || self.copy_swallowed_messages
            || self.owed.iter().any(|e| e.hide == Hide::All)
        {
            return None;
        }
        let readies = self
            .owed
            .iter()
            .filter(|e| e.owed.ends_with_ready())
            .count();
        let lost = Lost {
            readies,
            open_batch: self.extended_open || self.skipping_to_sync,
            batch_failed: self.skipping_to_sync,
            in_transaction: self.tx != TxStatus::Idle,
        };
        self.abandon(0..self.owed.len());
        self.extended_open = false;
        self.skipping_to_sync = false;
        Some(lost)
    }

    /// No reply owed: the server has answered all it was sent.
    pub fn owes_nothing(&self) -> bool {
        self.owed.is_empty()
    }

    /// Nothing owed and no extended batch open: a safe point to run our own queries.
    pub fn at_boundary(&self) -> bool {
        self.owed.is_empty()
            && !self.extended_open
            && !self.skipping_to_sync
            && !self.client_copying
            && !self.unsure
    }

    /// The replies can no longer be matched with certainty: the backend must not be reused
    /// until a resync (`resync_sent`) has found their place again.
    pub fn is_unsure(&self) -> bool {
        self.unsure
    }

    /// The backend was reset whole (DISCARD ALL: no prepared statement left, as recorded):
    /// no doubt about them remains.
    pub fn forget_statement_doubt(&mut self) {
        self.statements_unsure = false;
    }

    /// What the server made of statement messages is in doubt (see `statements_unsure`):
    /// even once its replies are matched again, the backend's prepared statements may be
    /// other than recorded.
    pub fn statements_unsure(&self) -> bool {
        self.statements_unsure
    }

    /// Unsure (see [`ReplyTracker::is_unsure`]), with nothing known to be owed and no COPY
    /// or batch under way: an empty Query of pgshield's would find its place again
    /// ([`ReplyTracker::resync_sent`]).
    pub fn needs_resync(&self) -> bool {
        self.unsure
            && self.resync.is_none()
            && self.owed.is_empty()
            && !self.client_copying
            && !self.extended_open
            && !self.skipping_to_sync
    }

    /// pgshield's empty Query is on its way: whatever ReadyForQuery comes before its
    /// EmptyQueryResponse (the one more than counted, if any) is passed to the client,
    /// and the one after it, swallowed, ends the doubt. (An empty Query runs in any
    /// transaction state, a failed one too.)
    pub fn resync_sent(&mut self) {
        self.resync = Some(false);
        // (Owed, hidden: replies pgshield gives the client itself for what it sends
        // meanwhile, a Parse answered here, wait behind it.)
        self.owed.push_back(Entry {
            owed: Owed::Query,
            failed: false,
            drops: None,
            hide: Hide::All,
            undo: None,
            statement: None,
            flushed: false,
        });
    }

    /// Unsure, yet its last reply was a ReadyForQuery outside a transaction block, with
    /// nothing known to be owed (a COPY FROM STDIN that failed, say): what may come late
    /// answers nothing the client still waits for. Once a resync has ended the doubt, the
    /// backend can go (closed if `statements_unsure`), and the client holds nothing, as
    /// after any transaction.
    pub fn unsure_but_over(&self) -> bool {
        self.unsure
            && self.owed.is_empty()
            && self.tx == TxStatus::Idle
            && !self.client_copying
            && !self.extended_open
            && !self.skipping_to_sync
    }

    /// The client is owed a reply the server sends without more input from the client:
    /// to a Query or Sync (a ReadyForQuery ends it), or to a message a Flush followed
    /// (psycopg's pipeline mode runs statements so). Not during the client's COPY data.
    pub fn awaiting_reply(&self) -> bool {
        !self.unsure
            && !self.client_copying
            && self.owed.iter().any(|e| {
                e.owed.ends_with_ready() || (e.flushed && !matches!(e.owed, Owed::Fake(_)))
            })
    }

    /// A ReadyForQuery is owed for something the server can finish without more input
    /// from the client (a Query, a Sync; not during the client's COPY data).
    pub fn owes_ready(&self) -> bool {
        !self.unsure && !self.client_copying && self.owed.iter().any(|e| e.owed.ends_with_ready())
    }

    /// Notes a Flush sent (the client's, or pgshield's): everything owed now is to be
    /// answered without more from the client.
    fn flush_covers_owed(&mut self) {
        for entry in self.owed.iter_mut().rev() {
            if entry.flushed {
                break;
            }
            entry.flushed = true;
        }
    }

    /// At a boundary and outside any transaction block.
    pub fn is_idle(&self) -> bool {
        self.at_boundary() && self.tx == TxStatus::Idle
    }

    /// As [`Self::is_idle`], but for pgshield's own hidden queries still owed (read-backs,
    /// settings given back): each runs as a transaction of its own, after which the
    /// backend is idle again, and nothing of the client's is owed behind them.
    pub fn is_idle_but_hidden(&self) -> bool {
        self.owed
            .iter()
            .all(|e| e.owed == Owed::Query && e.hide == Hide::All)
            && !self.extended_open
            && self.answers_what_is_sent()
            && self.tx == TxStatus::Idle
    }

    pub fn tx_status(&self) -> TxStatus {
        self.tx
    }

    /// Whether the server reads a message sent now inside a failed transaction block
    /// (where it refuses a Parse of anything but a statement that ends the transaction,
    /// 25P02): the last ReadyForQuery said `E`, and nothing sent since can have ended
    /// that transaction, as a Query or an Execute (of a ROLLBACK, say, answered or not)
    /// could. What else went (a Close, a Describe, a Sync) leaves it failed, or itself
    /// fails, and the server then skips the message anyway.
    pub fn reads_in_failed_transaction(&self) -> bool {
        self.tx == TxStatus::Failed && !self.unsure && !self.client_copying && !self.may_have_ended
    }

    /// How many replies are owed (pgshield's own answers among them).
    pub fn owed_count(&self) -> usize {
        self.owed.len()
    }

    /// Whether `max` replies are owed (so the client is not read, and no Sync may come to
    /// make the server send what it holds back: it is to be sent a Flush, unless
    /// [`ReplyTracker::flush_sent_already`]).
    pub fn flush_due(&self, max: usize) -> bool {
        self.owed.len() >= max
    }

    /// A Flush was sent after the latest of the replies owed was asked for (a message
    /// sent after it needs another: what the server holds back is worked out from what
    /// is owed, never from a flag a pile-up left behind).
    pub fn flush_sent_already(&self) -> bool {
        self.owed.back().is_some_and(|e| e.flushed)
    }

    /// The Flush [`ReplyTracker::flush_due`] asked for is on its way.
    pub fn flush_sent(&mut self) {
        self.flush_covers_owed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What random histories are made of: client messages, server replies, and how the
    /// replies are hidden (the client's own, twice as likely).
    const SENDS: &[u8] = b"QPBDESHCdcfF";
    const REPLIES: &[u8] = b"TDCNAdnIs123ZEGHtWcV";
    const HIDES: [Hide; 4] = [Hide::No, Hide::No, Hide::KeepErrors, Hide::All];

    /// Feeds client messages (upper-case tags, 'c'/'f'/'d'/'H') and server replies.
    fn client(t: &mut ReplyTracker, tags: &str) {
        for tag in tags.bytes() {
            t.sent(tag);
        }
    }

    fn server(t: &mut ReplyTracker, tags: &str) -> Result<(), OutOfStep> {
        for tag in tags.bytes() {
            t.received(tag, Some(b'I'))?;
        }
        Ok(())
    }

    #[test]
    fn dropping_portals_are_known_until_executed_replaced_or_their_transaction_ends() {
        let mut t = ReplyTracker::default();
        t.bound(b"a", true);
        t.bound(b"b", true);
        assert!(!t.take_dropping_portal(b"c"));
        assert!(t.take_dropping_portal(b"a"));
        assert!(!t.take_dropping_portal(b"a"), "once");
        // Bound again from another statement: no longer one.
        t.bound(b"b", false);
        assert!(!t.has_dropping_portal());
        // Gone with their transaction.
        t.bound(b"", true);
        client(&mut t, "BS");
        server(&mut t, "2Z").expect("in step");
        assert!(!t.has_dropping_portal());
        // Not with an earlier batch's: one bound in a batch pipelined behind it stays.
        client(&mut t, "BES");
        t.bound(b"later", true);
        client(&mut t, "B");
        server(&mut t, "2CZ").expect("in step");
        assert!(t.has_dropping_portal());
        client(&mut t, "S");
        server(&mut t, "2Z").expect("in step");
        assert!(!t.has_dropping_portal());
    }

    #[test]
    fn a_failed_transaction_is_known_until_something_that_may_end_it_is_sent() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        t.received(b'E', None).expect("in step");
        t.received(b'Z', Some(b'E')).expect("in step");
        assert!(t.reads_in_failed_transaction());
        client(&mut t, "CD");
        assert!(
            t.reads_in_failed_transaction(),
            "a Close or Describe leaves it"
        );
        server(&mut t, "3n").expect("in step");
        // An Execute (of ROLLBACK, say) may end it, even once it has been answered.
        client(&mut t, "PBEH");
        server(&mut t, "12C").expect("in step");
        assert!(!t.reads_in_failed_transaction());
        client(&mut t, "S");
        t.received(b'E', None).expect("in step");
        t.received(b'Z', Some(b'E')).expect("in step");
        assert!(t.reads_in_failed_transaction());
        // A Sync alone leaves it failed; a Query behind one answered now may end it.
        client(&mut t, "S");
        assert!(t.reads_in_failed_transaction());
        client(&mut t, "Q");
        t.received(b'Z', Some(b'E')).expect("in step");
        assert!(!t.reads_in_failed_transaction());
        t.received(b'Z', Some(b'E')).expect("in step");
        assert!(t.reads_in_failed_transaction());
    }

    #[test]
    fn a_description_owed_in_a_later_batch_survives_an_earlier_batchs_error() {
        let registry = crate::prepared::Registry::default();
        let statement = registry.intern("SELECT * FROM a", &[]);
        let mut t = ReplyTracker::default();
        // Batch 1: Bind, Execute, Sync; batch 2 (open): hidden Parse and Describe, Flush.
        client(&mut t, "BES");
        t.sent_with(b'P', Hide::KeepErrors, None);
        t.sent_with(b'D', Hide::KeepErrors, None);
        t.uses(Arc::clone(&statement));
        t.sent(b'H');
        assert!(t.describing().is_none(), "the Bind's replies come first");
        server(&mut t, "E").unwrap();
        assert!(t.owes_description_of(&statement));
        assert!(t.answers_what_is_sent());
        server(&mut t, "Z").unwrap();
        // The description's replies are swallowed, the RowDescription named.
        assert_eq!(t.received(b'1', None), Ok(Disposition::Swallow));
        assert_eq!(t.received(b't', None), Ok(Disposition::Swallow));
        assert!(t
            .describing()
            .is_some_and(|(s, hidden)| Arc::ptr_eq(s, &statement) && hidden));
        assert_eq!(t.received(b'T', None), Ok(Disposition::Swallow));
        assert!(!t.owes_description_of(&statement));
        // An error in its own batch drops it.
        t.sent_with(b'P', Hide::KeepErrors, None);
        t.sent_with(b'D', Hide::KeepErrors, None);
        t.uses(Arc::clone(&statement));
        server(&mut t, "E").unwrap();
        assert!(!t.owes_description_of(&statement));
        assert!(!t.answers_what_is_sent(), "skipping to the client's Sync");
    }

    #[test]
    fn an_error_names_the_statement_of_the_bind_or_describe_it_answers() {
        let registry = crate::prepared::Registry::default();
        let first = registry.intern("SELECT * FROM a", &[]);
        let second = registry.intern("SELECT * FROM b", &[]);
        let mut t = ReplyTracker::default();
        // Parse (answered), Bind of `first` (fails), Describe of `second` (skipped).
        client(&mut t, "P");
        t.sent(b'B');
        t.uses(Arc::clone(&first));
        t.sent(b'D');
        t.uses(Arc::clone(&second));
        client(&mut t, "ES");
        server(&mut t, "1E").unwrap();
        let failed = t.take_failed_statement().expect("the Bind's statement");
        assert!(Arc::ptr_eq(&failed, &first));
        assert!(t.take_failed_statement().is_none());
        server(&mut t, "Z").unwrap();
        // An error answering a Query or an injected Parse names none; a ReadyForQuery
        // forgets what an error named.
        client(&mut t, "Q");
        server(&mut t, "EZ").unwrap();
        assert!(t.take_failed_statement().is_none());
        t.sent(b'B');
        t.uses(Arc::clone(&second));
        client(&mut t, "S");
        server(&mut t, "EZ").unwrap();
        assert!(t.take_failed_statement().is_none());
    }

    #[test]
    fn a_simple_query_ends_an_extended_batch_as_a_sync_does() {
        // pgjdbc closes a statement (a Close, no Sync), then runs a plain Statement.
        let mut t = ReplyTracker::default();
        client(&mut t, "CQ");
        server(&mut t, "3TDCZ").expect("in step");
        assert!(t.is_idle(), "idle once the Query's ReadyForQuery came");
        let mut t = ReplyTracker::default();
        client(&mut t, "PBEQ");
        server(&mut t, "12DCTDCZ").expect("in step");
        assert!(t.is_idle());
        // Behind an error the server skips the Query, until a Sync.
        let mut t = ReplyTracker::default();
        client(&mut t, "PBEQ");
        server(&mut t, "12E").expect("in step");
        assert!(!t.is_idle(), "the server waits for a Sync");
        client(&mut t, "S");
        server(&mut t, "Z").expect("in step");
        assert!(t.is_idle());
    }

    #[test]
    fn a_simple_query_is_owed_until_its_ready_for_query() {
        let mut t = ReplyTracker::default();
        assert!(t.is_idle());
        client(&mut t, "Q");
        server(&mut t, "TDDC").unwrap();
        assert!(!t.at_boundary());
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn a_multi_statement_query_with_an_error_still_ends_with_one_ready() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "CE").unwrap();
        assert!(!t.at_boundary());
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn pipelined_extended_batches_are_each_answered() {
        let mut t = ReplyTracker::default();
        client(&mut t, "PBDES");
        client(&mut t, "BES");
        client(&mut t, "BES");
        server(&mut t, "12TDCZ").unwrap();
        server(&mut t, "2DCZ").unwrap();
        assert!(!t.at_boundary());
        server(&mut t, "2DCZ").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn an_extended_batch_without_sync_is_work_in_progress_even_when_answered() {
        let mut t = ReplyTracker::default();
        client(&mut t, "PDH");
        server(&mut t, "1tT").unwrap();
        assert!(
            !t.at_boundary(),
            "no Sync yet: the implicit transaction is open"
        );
        client(&mut t, "S");
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn after_an_extended_error_everything_until_sync_is_skipped() {
        // Parse fails; the Bind, Execute and even a simple Query before the Sync are
        // discarded by the server, which answers only the Sync.
        let mut t = ReplyTracker::default();
        client(&mut t, "PBEQS");
        server(&mut t, "E").unwrap();
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn an_error_before_the_client_sent_its_sync_skips_what_follows_too() {
        let mut t = ReplyTracker::default();
        client(&mut t, "PH");
        server(&mut t, "E").unwrap();
        client(&mut t, "BEQ");
        assert!(!t.at_boundary());
        client(&mut t, "S");
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn an_error_at_sync_time_is_answered_by_that_sync() {
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2C").unwrap();
        server(&mut t, "E").unwrap(); // e.g. a deferred constraint failing at commit
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn extended_copy_in_ignores_the_sync_sent_before_the_data() {
        // tokio-postgres and libpq: Bind, Execute, Sync, then CopyData…, CopyDone, Sync.
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dddc");
        client(&mut t, "S");
        server(&mut t, "C").unwrap();
        assert!(!t.at_boundary());
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn an_extended_copy_in_stays_open_until_the_sync_after_its_data() {
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dc");
        server(&mut t, "C").unwrap();
        assert!(
            !t.at_boundary(),
            "the server still waits for a Sync: its transaction is open"
        );
        client(&mut t, "S");
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn copy_in_data_sent_before_the_copy_in_response_is_understood_too() {
        let mut t = ReplyTracker::default();
        client(&mut t, "BESddcS");
        server(&mut t, "2GCZ").unwrap();
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn simple_copy_in_ignores_syncs_and_flushes_inside_the_data() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        client(&mut t, "dHdSdc");
        server(&mut t, "CZ").unwrap();
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn a_failed_simple_copy_in_ends_with_its_ready_for_query() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        client(&mut t, "dd");
        server(&mut t, "EZ").unwrap(); // bad data
        assert!(t.is_idle(), "{t:?}");
        // The protocol lets the client drop the rest of its COPY data after the error.
        client(&mut t, "Q");
        server(&mut t, "TDCZ").unwrap();
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn a_failed_extended_copy_in_cannot_be_judged_and_is_never_reused() {
        // Whether the Sync sent before the data is answered depends on whether the COPY
        // failed before reading it (COPY into a view) or after (bad data): both are fine.
        for replies in ["ZZ", "Z"] {
            let mut t = ReplyTracker::default();
            client(&mut t, "BES");
            server(&mut t, "2G").unwrap();
            client(&mut t, "dd");
            server(&mut t, "E").unwrap();
            client(&mut t, "dcS");
            server(&mut t, replies).unwrap();
            assert!(!t.at_boundary(), "{replies}: {t:?}");
            assert!(t.is_unsure());
            client(&mut t, "Q");
            server(&mut t, "TDCZ").unwrap();
            assert!(!t.is_idle());
        }
    }

    #[test]
    fn a_failed_copy_is_over_only_once_what_the_client_sent_after_it_is_answered() {
        for extra in ["", "Z"] {
            let mut t = ReplyTracker::default();
            client(&mut t, "BES");
            server(&mut t, "2G").unwrap();
            client(&mut t, "dfS");
            // Pipelined behind it: another batch.
            client(&mut t, "PBES");
            // The COPY's error and ReadyForQuery, perhaps one more than counted.
            server(&mut t, "EZ").unwrap();
            server(&mut t, extra).unwrap();
            assert!(!t.unsure_but_over(), "{extra:?}: the second batch is owed");
            server(&mut t, "12C").unwrap();
            assert!(!t.unsure_but_over(), "{extra:?}: {t:?}");
            server(&mut t, "Z").unwrap();
            assert!(t.unsure_but_over(), "{extra:?}: {t:?}");
        }
    }

    #[test]
    fn a_pile_up_of_owed_replies_asks_for_one_flush_each_time() {
        let due = |t: &mut ReplyTracker| t.flush_due(3) && !t.flush_sent_already();
        let mut t = ReplyTracker::default();
        client(&mut t, "QQ");
        assert!(!due(&mut t));
        client(&mut t, "Q");
        assert!(due(&mut t));
        t.flush_sent();
        assert!(!due(&mut t), "once");
        assert!(t.flush_due(3), "still full");
        // All answered before the relay looked again (the backend may go to another
        // client now): the next pile-up is flushed too.
        server(&mut t, "CZCZCZ").unwrap();
        client(&mut t, "QQQ");
        assert!(due(&mut t));
    }

    #[test]
    fn a_copy_done_between_its_failed_copys_error_and_ready_leaves_nothing_owed() {
        // The client ends its COPY after the server's error came but before its
        // ReadyForQuery: the server ignores the CopyDone, and nothing is owed after Z.
        for end in ["c", "f", "dc"] {
            let mut t = ReplyTracker::default();
            client(&mut t, "Q");
            server(&mut t, "G").unwrap();
            client(&mut t, "d");
            server(&mut t, "E").unwrap();
            client(&mut t, end);
            server(&mut t, "Z").unwrap();
            assert!(t.is_idle(), "{end}: {t:?}");
        }
    }

    #[test]
    fn a_copy_done_after_its_failed_copy_ended_leaves_nothing_owed() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        client(&mut t, "d");
        server(&mut t, "EZ").unwrap();
        client(&mut t, "dc");
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn a_sync_inside_copy_data_of_a_failed_copy_cannot_be_judged() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        client(&mut t, "dS");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_unsure());
    }

    #[test]
    fn statements_pipelined_behind_a_copy_cannot_be_judged() {
        let mut t = ReplyTracker::default();
        client(&mut t, "QQQ");
        server(&mut t, "G").unwrap();
        client(&mut t, "c");
        server(&mut t, "EZTDCZ").unwrap();
        assert!(t.is_unsure());
        assert!(!t.at_boundary());
    }

    /// Only Syncs in doubt (a failed extended-protocol COPY: tokio-postgres's): the
    /// statements stay known, and a resync makes the backend idle again. A statement
    /// behind the COPY: they may not be.
    #[test]
    fn only_syncs_in_doubt_leave_the_statements_known() {
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dcS");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_unsure() && !t.statements_unsure());
        t.resync_sent();
        server(&mut t, "IZ").unwrap();
        assert!(t.is_idle(), "{t:?}");
        let mut t = ReplyTracker::default();
        client(&mut t, "BESP");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dcS");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_unsure() && t.statements_unsure());
        // A Sync in the COPY data, then a Parse behind the CopyDone: taken for skipped by
        // the error, but run if the server answered that Sync.
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dScPBES");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_unsure() && t.statements_unsure());
        // Likewise one sent while the server skips to a Sync.
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dSc");
        server(&mut t, "E").unwrap();
        assert!(t.is_unsure() && !t.statements_unsure());
        client(&mut t, "PS");
        assert!(t.statements_unsure());
        t.forget_statement_doubt();
        assert!(!t.statements_unsure());
    }

    /// However many CopyDone messages a client sends (PostgreSQL ignores them outside
    /// COPY), they do not pile up in what is owed; a Query of two COPYs whose data came
    /// ahead keeps a marker for each.
    #[test]
    fn copy_ends_in_a_row_are_bounded() {
        let mut t = ReplyTracker::default();
        client(&mut t, "P");
        for _ in 0..5000 {
            client(&mut t, "dc");
        }
        client(&mut t, "S");
        assert_eq!(t.owed.len(), 2 + MAX_COPY_ENDS_IN_A_ROW, "{t:?}");
        server(&mut t, "1Z").unwrap();
        assert!(t.is_idle(), "{t:?}");
        let mut t = ReplyTracker::default();
        client(&mut t, "Qdcdc");
        server(&mut t, "G").unwrap();
        server(&mut t, "C").unwrap();
        server(&mut t, "G").unwrap();
        server(&mut t, "CZ").unwrap();
        assert!(t.is_idle() && !t.is_unsure(), "{t:?}");
    }

    #[test]
    fn a_successful_extended_copy_in_stays_certain() {
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2G").unwrap();
        client(&mut t, "dcS");
        server(&mut t, "C").unwrap();
        server(&mut t, "E").unwrap(); // e.g. a deferred error at Sync, after the COPY
        server(&mut t, "Z").unwrap();
        assert!(!t.is_unsure());
        assert!(t.is_idle(), "{t:?}");
    }

    #[test]
    fn copy_fail_ends_the_copy_like_copy_done() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        client(&mut t, "df");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn copy_out_needs_nothing_special() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "HdddcCZ").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn a_function_call_is_answered_by_ready_for_query_even_after_an_error() {
        let mut t = ReplyTracker::default();
        client(&mut t, "F");
        server(&mut t, "EZ").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn an_open_transaction_is_a_boundary_but_not_idle() {
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        t.received(b'Z', Some(b'T')).unwrap();
        assert!(t.at_boundary());
        assert!(!t.is_idle());
        client(&mut t, "Q");
        t.received(b'Z', Some(b'E')).unwrap();
        assert_eq!(t.tx_status(), TxStatus::Failed);
    }

    #[test]
    fn the_server_is_awaited_only_for_what_it_can_finish_alone() {
        let mut t = ReplyTracker::default();
        client(&mut t, "PBE");
        assert!(
            !t.awaiting_reply(),
            "an unsynced batch waits for the client"
        );
        client(&mut t, "S");
        assert!(t.awaiting_reply());
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        server(&mut t, "G").unwrap();
        assert!(
            !t.awaiting_reply(),
            "COPY FROM STDIN waits for the client's data"
        );
        client(&mut t, "c");
        assert!(t.awaiting_reply());
        // A Flush makes the server answer what came before it, not what comes after.
        let mut t = ReplyTracker::default();
        client(&mut t, "PBEH");
        assert!(t.awaiting_reply());
        server(&mut t, "12C").unwrap();
        assert!(!t.awaiting_reply());
        client(&mut t, "BEH");
        client(&mut t, "BE");
        server(&mut t, "2C").unwrap();
        assert!(!t.awaiting_reply(), "sent after the Flush");
    }

    fn parse_undo() -> Option<Undo> {
        let registry = crate::prepared::Registry::default();
        Some(Undo::Parse {
            client_name: Some(("s0".into(), 0)),
            statement: registry.intern("SELECT 1", &[]),
            sent: Some(Default::default()),
            behind_close: false,
        })
    }

    #[test]
    fn replies_to_injected_messages_are_swallowed_but_errors_are_not() {
        let mut t = ReplyTracker::default();
        t.sent_with(b'P', Hide::KeepErrors, None);
        client(&mut t, "BES");
        assert_eq!(t.received(b'1', None), Ok(Disposition::Swallow));
        assert_eq!(t.received(b'2', None), Ok(Disposition::Forward));
        server(&mut t, "DCZ").unwrap();
        assert!(t.is_idle());
        t.sent_with(b'P', Hide::KeepErrors, None);
        client(&mut t, "BES");
        assert_eq!(t.received(b'E', None), Ok(Disposition::Forward));
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn fake_replies_are_written_in_their_place_among_the_servers() {
        let mut t = ReplyTracker::default();
        client(&mut t, "B");
        t.fake(Fake::ParseComplete, None);
        client(&mut t, "S");
        let mut out = BytesMut::new();
        t.write_due_fakes(&mut out);
        assert!(out.is_empty(), "the Bind's reply comes first");
        server(&mut t, "2").unwrap();
        t.write_due_fakes(&mut out);
        assert_eq!(&out[..], b"1\0\0\0\x04");
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn what_the_server_skips_after_an_error_is_taken_back() {
        let mut t = ReplyTracker::default();
        client(&mut t, "B");
        t.sent_with(b'P', Hide::No, parse_undo());
        t.fake(Fake::ParseComplete, parse_undo());
        client(&mut t, "S");
        server(&mut t, "E").unwrap(); // the Bind fails: the rest is skipped
        assert_eq!(t.take_undone().len(), 2);
        let mut out = BytesMut::new();
        t.write_due_fakes(&mut out);
        assert!(out.is_empty(), "no fake reply for a skipped message");
        server(&mut t, "Z").unwrap();
        assert!(t.is_idle());
        // While the server skips to Sync, new messages are taken back at once.
        client(&mut t, "P");
        server(&mut t, "E").unwrap();
        t.sent_with(b'P', Hide::No, parse_undo());
        t.fake(Fake::ParseComplete, parse_undo());
        assert_eq!(t.take_undone().len(), 2);
    }

    #[test]
    fn replies_passed_in_bulk_are_only_those_that_received_would_pass_on_untouched() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (sends, replies, hides) = (SENDS, REPLIES, HIDES);
        let mut passed = [0usize; 256];
        for _ in 0..3000 {
            let mut t = ReplyTracker::default();
            for _ in 0..rng.random_range(0..16) {
                if rng.random_bool(0.5) {
                    let tag = sends[rng.random_range(0..sends.len())];
                    t.sent_with(tag, hides[rng.random_range(0..hides.len())], None);
                } else {
                    let tag = replies[rng.random_range(0..replies.len())];
                    let status = [b'I', b'T', b'E'][rng.random_range(0..3)];
                    if t.received(tag, Some(status)).is_err() {
                        break;
                    }
                }
                for &tag in replies {
                    let message = [tag, 0, 0, 0, 4];
                    if t.untracked_prefix(&message) == 0 {
                        continue;
                    }
                    passed[usize::from(tag)] += 1;
                    let before = format!("{t:?}");
                    assert_eq!(t.received(tag, None), Ok(Disposition::Forward), "{before}");
                    assert_eq!(format!("{t:?}"), before, "{}", char::from(tag));
                }
            }
        }
        for tag in *b"TDCNd" {
            assert!(
                passed[usize::from(tag)] > 0,
                "{} never passed",
                char::from(tag)
            );
        }
        // Notifications are the session's to look at, one by one.
        assert_eq!(passed[usize::from(b'A')], 0);
    }

    #[test]
    fn a_whole_answer_taken_in_one_step_is_what_received_makes_of_it() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (sends, replies, hides) = (SENDS, REPLIES, HIDES);
        let statuses = [b'I', b'T', b'E'];
        let registry = crate::prepared::Registry::default();
        let statement = registry.intern("SELECT 1", &[]);
        // A history step: a message sent (with its hiding, and whether it takes something
        // back or names a statement) or a reply received (with its status).
        #[derive(Clone, Copy)]
        enum Step {
            Sent(u8, Hide, bool, bool),
            Received(u8, u8),
        }
        let (mut taken, mut refused, mut taken_extended, mut taken_described) = (0, 0, 0, 0);
        for _ in 0..30_000 {
            let mut history = Vec::new();
            for _ in 0..rng.random_range(0..6) {
                history.push(if rng.random_bool(0.5) {
                    let tag = sends[rng.random_range(0..sends.len())];
                    let hide = hides[rng.random_range(0..hides.len())];
                    Step::Sent(tag, hide, rng.random_bool(0.2), rng.random_bool(0.2))
                } else {
                    let tag = replies[rng.random_range(0..replies.len())];
                    Step::Received(tag, statuses[rng.random_range(0..3)])
                });
            }
            // Mostly ending with a Query, or an extended batch, sent.
            let mut batch = Vec::new();
            match rng.random_range(0..3) {
                0 => batch.push(b'Q'),
                1 => {
                    let steps = [
                        (b'P', 0.5),
                        (b'B', 0.9),
                        (b'D', 0.4),
                        (b'D', 0.2),
                        (b'E', 0.9),
                    ];
                    for (tag, p) in steps {
                        if rng.random_bool(p) {
                            batch.push(tag);
                        }
                    }
                    if rng.random_bool(0.2) {
                        batch.push(b'C');
                    }
                    if rng.random_bool(0.9) {
                        batch.push(b'S');
                    }
                }
                _ => {}
            }
            for &tag in &batch {
                let hide = if rng.random_bool(0.8) {
                    Hide::No
                } else {
                    hides[rng.random_range(0..hides.len())]
                };
                let named = rng.random_bool(0.3);
                history.push(Step::Sent(tag, hide, rng.random_bool(0.2), named));
            }
            // (Each tracker's takebacks parse statements of their own, to tell whether the
            // replies marked them valid.)
            let play = |parsed: &Arc<Statement>| {
                let mut t = ReplyTracker::default();
                for &step in &history {
                    match step {
                        Step::Sent(tag, hide, takes_back, named) => {
                            let undo = takes_back.then(|| Undo::Parse {
                                client_name: Some(("s0".into(), 0)),
                                statement: Arc::clone(parsed),
                                sent: Some(Default::default()),
                                behind_close: false,
                            });
                            t.sent_with(tag, hide, undo);
                            if named {
                                t.uses(Arc::clone(&statement));
                            }
                        }
                        Step::Received(tag, status) => {
                            t.received(tag, Some(status)).ok()?;
                        }
                    }
                    t.take_undone();
                    t.take_drops();
                }
                Some(t)
            };
            let fresh = || crate::prepared::Registry::default().intern("SELECT 2", &[]);
            let parsed = [fresh(), fresh()];
            let (Some(mut one), Some(mut other)) = (play(&parsed[0]), play(&parsed[1])) else {
                continue;
            };
            // What the server sent: the batch's answer, or random replies; mostly a
            // ReadyForQuery last, sometimes cut short.
            let mut answer: Vec<(u8, u8)> = Vec::new();
            if rng.random_bool(0.6) {
                for &tag in &batch {
                    let replies: &[u8] = match tag {
                        b'Q' => b"TDDC",
                        b'P' => b"1",
                        b'B' => b"2",
                        b'D' => [&b"tT"[..], b"n", b"T"][rng.random_range(0..3)],
                        b'E' => [&b"DDC"[..], b"I", b"Ds", b"C"][rng.random_range(0..4)],
                        b'C' => b"3",
                        _ => b"",
                    };
                    answer.extend(replies.iter().map(|&r| (r, b'I')));
                }
                if rng.random_bool(0.2) && !answer.is_empty() {
                    // A reply out of place.
                    let at = rng.random_range(0..answer.len());
                    answer[at].0 = replies[rng.random_range(0..replies.len())];
                }
            } else {
                answer = (0..rng.random_range(0..5))
                    .map(|_| (replies[rng.random_range(0..replies.len())], b'I'))
                    .collect();
            }
            if rng.random_bool(0.8) {
                answer.push((b'Z', statuses[rng.random_range(0..3)]));
            }
            let mut buf = Vec::new();
            let mut ranges = Vec::new();
            for &(tag, status) in &answer {
                let start = buf.len();
                match tag {
                    b'Z' => buf.extend_from_slice(&[tag, 0, 0, 0, 5, status]),
                    _ => buf.extend_from_slice(&[tag, 0, 0, 0, 6, 1, 2]),
                }
                ranges.push(start..buf.len());
            }
            if rng.random_bool(0.1) {
                buf.truncate(buf.len().saturating_sub(rng.random_range(1..4)));
            }
            let before = format!("{one:?}");
            let Some(whole) = one.answer_whole(&buf) else {
                assert_eq!(format!("{one:?}"), before, "refused, yet changed");
                refused += 1;
                continue;
            };
            taken += 1;
            taken_extended += usize::from(batch.contains(&b'S'));
            assert_eq!(whole.len, buf.len(), "{before} {answer:?}");
            // The descriptions the session looks at, taking the replies one by one.
            let mut described = Vec::new();
            for (i, &(tag, status)) in answer.iter().enumerate() {
                if let Some((statement, hidden)) =
                    other.describing().filter(|_| tag == b'T' || tag == b'n')
                {
                    assert!(!hidden, "{before} {answer:?}");
                    described.push((Arc::clone(statement), ranges[i].clone()));
                }
                let got = other.received(tag, Some(status));
                assert_eq!(got, Ok(Disposition::Forward), "{before} {answer:?}");
            }
            taken_described += described.len();
            match (described.as_slice(), &whole.described) {
                ([], None) => {}
                ([(s, r)], Some((statement, reply))) => {
                    assert!(
                        Arc::ptr_eq(s, statement) && r == reply,
                        "{before} {answer:?}"
                    );
                }
                (seen, taken) => panic!("{seen:?} looked at, {taken:?} taken: {before} {answer:?}"),
            }
            assert!(!other.has_takebacks(), "{before} {answer:?}");
            assert_eq!(format!("{one:?}"), format!("{other:?}"), "{answer:?}");
            assert_eq!(whole.status, other.tx_status());
            assert!(one.at_boundary());
            assert_eq!(parsed[0].is_valid(), parsed[1].is_valid(), "{answer:?}");
        }
        assert!(
            taken > 500 && refused > 500 && taken_extended > 200 && taken_described > 50,
            "{taken} taken ({taken_extended} extended, {taken_described} described), {refused} refused"
        );
    }

    #[test]
    fn bulk_passing_stops_at_a_reply_that_is_not_whole_or_must_be_looked_at() {
        let message = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let mut t = ReplyTracker::default();
        assert_eq!(t.untracked_prefix(&message(b'D', b"x")), 0, "nothing owed");
        client(&mut t, "Q");
        let (desc, row, done) = (
            message(b'T', b"t"),
            message(b'D', b"row"),
            message(b'C', b"SELECT 1"),
        );
        let ready = message(b'Z', b"I");
        let replies = [&desc[..], &row, &done, &ready].concat();
        let bulk = desc.len() + row.len() + done.len();
        assert_eq!(
            t.untracked_prefix(&replies),
            bulk,
            "up to the ReadyForQuery"
        );
        assert_eq!(
            t.untracked_prefix(&replies[..bulk - 1]),
            desc.len() + row.len(),
            "a CommandComplete not all here"
        );
        assert_eq!(
            t.untracked_prefix(&[b'D', 0, 0, 0, 3, b'D', 0, 0, 0, 4]),
            0,
            "a bad length"
        );
        // In the extended protocol a CommandComplete ends an Execute: it is looked at.
        let mut t = ReplyTracker::default();
        client(&mut t, "BES");
        server(&mut t, "2").unwrap();
        assert_eq!(t.untracked_prefix(&[&row[..], &done].concat()), row.len());
        // The replies to pgshield's own query are not the client's.
        let mut t = ReplyTracker::default();
        t.sent_with(b'Q', Hide::All, None);
        assert_eq!(t.untracked_prefix(&row), 0);
    }

    #[test]
    fn an_asynchronous_error_changes_nothing() {
        let mut t = ReplyTracker::default();
        server(&mut t, "E").unwrap();
        assert!(t.is_idle());
    }

    #[test]
    fn replies_nobody_asked_for_are_out_of_step() {
        let mut t = ReplyTracker::default();
        assert_eq!(server(&mut t, "Z"), Err(OutOfStep));
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        assert_eq!(server(&mut t, "1"), Err(OutOfStep));
        let mut t = ReplyTracker::default();
        client(&mut t, "Q");
        assert_eq!(t.received(b'Z', Some(b'?')), Err(OutOfStep));
    }
}
