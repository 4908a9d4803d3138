//! pgshield: a PostgreSQL connection proxy that lends many clients a bounded pool of
//! backend connections, queueing them instead of letting the database fall over.
//!
//! Start with `docs/ARCHITECTURE.md` for the map of these modules.

pub mod admin;
pub mod bench;
pub mod buffers;
pub mod client;
pub mod config;
pub mod epoch;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod tls;

pub use config::Config;

/// A HashMap hashed with foldhash, for maps looked up per connection or per message whose
/// keys pgshield makes (ids, cancel keys, its own statement names) or its configuration
/// bounds: std's SipHash cost more than the rest of such a lookup. Not for keys a client
/// picks freely: foldhash is quick, not built to resist an attacker who times it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub use proxy::Proxy;
pub mod devdb;
pub mod http;
pub mod prepared;

/// Locks a mutex whose data stays consistent between statements: a panic elsewhere while
/// it was held (a bug) must not take every later user down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
