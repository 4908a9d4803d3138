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
pub use proxy::Proxy;
pub mod devdb;
pub mod http;
pub mod prepared;
