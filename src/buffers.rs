//! Reading without a buffer of one's own while waiting, so that an idle client holds
//! none: a read lands in the worker thread's scratch space and only the bytes that came
//! are copied into the session's buffer (which is freed again when it empties and the
//! session goes quiet). A reader waiting on a socket holds nothing; a busy one pays a
//! copy of what it read.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

/// The most one read takes.
pub const CHUNK: usize = 16 * 1024;

/// The most room made at once for the rest of a message whose header came: its length is
/// the peer's word, and a client announcing 256 MiB and sending nothing more should not
/// be given them. Larger messages grow the buffer as their bytes arrive.
pub const RESERVE_AHEAD: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
    /// Small empty buffers that sessions on this thread gave up as they went idle, for the
    /// next one that needs a buffer: a transaction in transaction mode takes three, and
    /// allocating each anew and growing it cost about 500 instructions a transaction.
    /// Bounded ([`SPARES`] of at most [`KEEP_WHILE_HELD`] bytes), so idle clients still
    /// hold nothing.
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// How many spare buffers a thread keeps.
const SPARES: usize = 32;

/// The least memory a buffer is given when no spare one is at hand: most of what a
/// transaction sends or gets back fits, so that buffers passed on as spares rarely need
/// growing (one grown for each of a transaction's messages cost about 150 instructions).
const LEAST: usize = 512;

/// Gives an empty buffer with no memory a spare one's, when `n` bytes fit in it, or new
/// memory for at least `n` bytes.
fn take_spare(buf: &mut BytesMut, n: usize) {
    if n <= KEEP_WHILE_HELD {
        if let Some(spare) = SPARE.with(|s| s.borrow_mut().pop()) {
            *buf = spare;
            return;
        }
    }
    buf.reserve(n.max(LEAST));
}

/// Reads what `stream` has now into `buf` (through the thread's scratch space);
/// `Ready(Ok(0))` is end of stream.
pub fn poll_read<R: AsyncRead + Unpin>(
    stream: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut read = ReadBuf::new(&mut scratch[..]);
        match Pin::new(stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let got = read.filled();
                // (Nothing at the end of the stream: no memory for it.)
                if buf.capacity() == 0 && !got.is_empty() {
                    take_spare(buf, got.len());
                }
                buf.extend_from_slice(got);
                Poll::Ready(Ok(got.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// Gives a buffer with no memory room for `n` bytes (plus a little for what pgshield
/// adds) at once, so that messages appended one by one do not grow it step by step.
pub fn reserve_empty(buf: &mut BytesMut, n: usize) {
    if buf.capacity() == 0 && n > 0 {
        take_spare(buf, n + 64);
        buf.reserve(n + 64);
    }
}

/// The most of an empty buffer's memory a session holding a backend keeps.
pub const KEEP_WHILE_HELD: usize = 4 * 1024;

/// Frees an empty buffer's memory if there is more than `keep` bytes of it (a buffer
/// holding bytes is kept).
pub fn release(buf: &mut BytesMut, keep: usize) {
    if !buf.is_empty() {
        return;
    }
    // capacity() leaves out the room before what was read (a buffer read to its end
    // shows none): taking that room back shows the whole allocation, and a kept buffer
    // starts again from its beginning. (It fails for one sharing its memory.)
    // (An unused buffer fails too, and is not kept: sessions read or send what they hold.)
    let whole = buf.try_reclaim(buf.capacity() + 1);
    if buf.capacity() <= keep {
        return;
    }
    let freed = std::mem::take(buf);
    if whole && freed.capacity() <= KEEP_WHILE_HELD {
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(freed);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[tokio::test]
    async fn reads_land_in_the_buffer_and_an_empty_buffer_is_freed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"hello")
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let n = std::future::poll_fn(|cx| poll_read(&mut b, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
        release(&mut buf, 0);
        assert_eq!(buf.len(), 5, "bytes are kept");
        let _ = buf.split_to(5);
        release(&mut buf, 0);
        assert_eq!(buf.capacity(), 0);
        // Read to its very end, a buffer shows no capacity but still holds its memory.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"exactly sixteen!");
        buf.advance(16);
        assert_eq!(buf.capacity(), 0);
        release(&mut buf, 0);
        assert!(!buf.try_reclaim(1), "its memory is freed");
        drop(a);
        let n = std::future::poll_fn(|cx| poll_read(&mut b, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(n, 0, "end of stream");
    }

    #[test]
    fn a_freed_small_buffer_serves_the_next_that_needs_one_on_the_thread() {
        SPARE.with(|s| s.borrow_mut().clear());
        let mut small = BytesMut::with_capacity(1000);
        small.extend_from_slice(b"reply");
        small.advance(5);
        release(&mut small, 0);
        assert_eq!(small.capacity(), 0, "the session holds nothing");
        let mut big = BytesMut::with_capacity(KEEP_WHILE_HELD * 2);
        release(&mut big, 0);
        assert_eq!(
            SPARE.with(|s| s.borrow().len()),
            1,
            "only small ones are kept"
        );
        let mut next = BytesMut::new();
        reserve_empty(&mut next, 10);
        assert_eq!(next.capacity(), 1000, "the spare, whole");
        let mut another = BytesMut::new();
        reserve_empty(&mut another, 10);
        assert!(another.capacity() >= 74, "none left: a new one");
        for _ in 0..SPARES + 5 {
            let mut b = BytesMut::with_capacity(64);
            b.extend_from_slice(b"sent");
            b.advance(4);
            release(&mut b, 0);
        }
        assert_eq!(SPARE.with(|s| s.borrow().len()), SPARES, "bounded");
        SPARE.with(|s| s.borrow_mut().clear());
    }

    #[test]
    fn a_buffer_kept_while_a_backend_is_held_is_small_however_far_it_was_read() {
        // Small: kept.
        let mut buf = BytesMut::with_capacity(100);
        buf.extend_from_slice(b"hello");
        buf.advance(5);
        release(&mut buf, 1024);
        assert_eq!(buf.capacity(), 100, "kept, from its beginning again");
        // Large, and read almost to its end: capacity() alone would look small.
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(&vec![0; (1 << 20) - 10]);
        buf.advance((1 << 20) - 10);
        assert!(buf.capacity() <= 1024);
        release(&mut buf, 1024);
        assert_eq!(buf.capacity(), 0, "the whole allocation is freed");
    }
}
