//! The PostgreSQL wire format, and nothing else: framing, startup packets, the messages
//! pgshield writes itself, and the server side of SCRAM-SHA-256 and md5 authentication.
//!
//! No I/O policy lives here (no timeouts, no pools): functions take bytes and give bytes or
//! typed values back, so they can be unit-tested and fuzzed without sockets. Every length
//! read off the wire is checked before anything is allocated for it.

pub mod frame;
pub mod messages;
pub mod scram;
pub mod sqlstate;
pub mod startup;

pub use frame::{FrameError, Header};
pub use messages::ErrorResponse;
