//! The startup and authentication state machine, end to end: the fuzzer's bytes are all
//! a client ever sends (then it hangs up), to a real pgshield configuration with SCRAM,
//! md5 and trust users and client TLS available. The login must end (no hang, within the
//! harness's timeout) and never panic, whatever it is sent.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgshield::net::Stream;
use pgshield::proxy::Shared;
use pgshield::{Config, Proxy};
use tokio::io::AsyncWriteExt;

struct Harness {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The database is a closed port: logins that get that far fail fast, as they
        // would with the server down.
        let config = Config::from_toml(
            "[listen]\naddr = \"127.0.0.1:0\"\nclient_login_timeout = \"1s\"\n\
             [admin]\nhttp_listen = \"\"\n\
             [pool]\nserver_connect_timeout = \"1s\"\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = 9\n\
             [users.scram]\npassword = \"pw\"\n\
             [users.md5]\nauth = \"md5\"\npassword = \"pw\"\n\
             [users.trust]\nauth = \"trust\"\n",
        )
        .expect("config");
        let proxy = runtime.block_on(Proxy::bind(config)).expect("bind");
        let shared = Arc::clone(proxy.shared());
        Harness { runtime, shared }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(data.len() + 1024);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut stream = Stream::Memory(server);
        let mut buf = BytesMut::new();
        // A new address each time: the login throttle would otherwise slow every run
        // after a few failed logins from one address.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peer = std::net::SocketAddr::from((
            std::net::Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)),
            5555,
        ));
        let login = pgshield::client::handshake::login(
            &h.shared,
            &mut stream,
            &mut buf,
            peer.into(),
            true,
            false,
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), login).await;
        drop(client);
    });
});
