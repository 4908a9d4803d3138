//! Hostile and broken input: oversized, truncated, unknown and out-of-order messages,
//! thousands of random and mutated byte streams, sockets that never speak, and a flood of
//! failed logins, each while well-behaved clients keep working with correct results.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{raw, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A trust user for raw protocol clients, and a password user for tokio-postgres ones.
async fn proxy(role: &str, extra: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "{extra}\n[users.{role}]\nauth = \"trust\"\nserver_password = \"pw\"\n\
         [users.{role}_pw]\npassword = \"pw\"\nserver_user = \"{role}\"\nserver_password = \"pw\"\n"
    ))
    .await
}

/// A well-behaved client: runs `rounds` parameterised queries and checks every answer.
async fn well_behaved(proxy: &TestProxy, role: &str, rounds: i32) -> Result<(), String> {
    let conn = proxy
        .connect(&format!("{role}_pw"), "pw")
        .await
        .map_err(|e| format!("login: {e}"))?;
    for i in 0..rounds {
        let row = conn
            .client
            .query_one("SELECT $1::int + 1", &[&i])
            .await
            .map_err(|e| format!("query {i}: {e}"))?;
        let got: i32 = row.get(0);
        if got != i + 1 {
            return Err(format!("query {i}: wrong answer {got}"));
        }
    }
    Ok(())
}

/// Sends `bytes` after logging in, and returns the SQLSTATE of the error that follows,
/// having checked the connection is then closed.
async fn error_after_login(addr: SocketAddr, user: &str, bytes: &[u8]) -> String {
    let mut s = raw::login_trusted(addr, user).await;
    raw::send(&mut s, bytes).await;
    let code = loop {
        match raw::read_message(&mut s).await {
            Some((b'E', body)) => break raw::error_code(&body),
            Some(_) => continue,
            None => panic!("closed without an error after {bytes:?}"),
        }
    };
    assert!(raw::closed(&mut s).await, "closed after {bytes:?}");
    code
}

fn header(tag: u8, len: i32) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m
}

#[tokio::test]
async fn bad_messages_get_08p01_and_close_only_their_client() {
    let proxy = proxy("hostile_bad", "[listen]\nmax_message_size = 1048576\n").await;
    let addr = proxy.addr;
    let bystander = tokio::spawn({
        let proxy_conf = proxy.config("hostile_bad_pw", "pw");
        async move {
            let conn = common::connect(&proxy_conf).await.expect("bystander login");
            for i in 0..200 {
                let n: i32 = conn
                    .client
                    .query_one("SELECT $1::int * 2", &[&i])
                    .await
                    .expect("bystander query")
                    .get(0);
                assert_eq!(n, i * 2);
            }
        }
    });
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Over max_message_size: refused from the length field, before any body arrives.
        ("too large", header(b'Q', 2 * 1024 * 1024)),
        ("largest length there is", header(b'd', i32::MAX)),
        ("negative length", header(b'Q', -5)),
        ("length below 4", header(b'Q', 3)),
        ("unknown type", raw::message(b'z', b"")),
        (
            "a password message after login",
            raw::message(b'p', b"secret\0"),
        ),
        (
            "a startup packet after login",
            raw::startup(&[("user", "x")]),
        ),
    ];
    for (what, bytes) in &cases {
        assert_eq!(
            error_after_login(addr, "hostile_bad", bytes).await,
            "08P01",
            "{what}"
        );
    }
    // A message cut short, then silence, then a hang-up: the proxy just closes.
    let mut s = raw::login_trusted(addr, "hostile_bad").await;
    let mut truncated = header(b'Q', 100);
    truncated.extend_from_slice(b"SELECT");
    raw::send(&mut s, &truncated).await;
    drop(s);
    bystander.await.expect("the bystander never noticed");
    well_behaved(&proxy, "hostile_bad", 5)
        .await
        .expect("still serving");
}

/// A tiny deterministic PRNG (xorshift64*), so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a real client of `user` might send: startup, simple and extended queries, Sync,
/// Terminate.
fn valid_stream(user: &str) -> Vec<u8> {
    let mut bytes = raw::startup(&[("user", user), ("database", "app")]);
    bytes.extend(raw::query("SELECT 1; SELECT 'x'"));
    bytes.extend(raw::parse_bind_execute("SELECT 2"));
    bytes.extend(raw::SYNC);
    bytes.extend(raw::query("BEGIN; SELECT 3; COMMIT"));
    bytes.extend(raw::TERMINATE);
    bytes
}

/// Random bytes, or a valid stream with random bytes changed, inserted, removed or cut.
fn hostile_stream(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    if rng.below(4) == 0 {
        let len = 1 + rng.below(2048);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut bytes = valid.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len());
        match rng.below(4) {
            0 => bytes[at] = rng.next() as u8,
            1 => bytes.insert(at, rng.next() as u8),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at.max(1)),
        }
        if bytes.is_empty() {
            bytes.push(0);
        }
    }
    bytes
}

/// Sends `bytes`, reads whatever comes back for a moment, hangs up.
async fn throw(addr: SocketAddr, bytes: Vec<u8>) -> usize {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = s.write_all(&bytes).await;
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(300);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

#[tokio::test]
async fn thousands_of_random_and_mutated_streams_leave_good_clients_unharmed() {
    const STREAMS: usize = 3000;
    const AT_ONCE: usize = 64;
    let proxy = proxy(
        "hostile_fuzz",
        "[listen]\nclient_login_timeout = \"2s\"\n[pool]\nmax_size = 4\nborrow_timeout = \"30s\"\n",
    )
    .await;
    let addr = proxy.addr;
    let workload: Vec<_> = (0..4)
        .map(|_| {
            let conf = proxy.config("hostile_fuzz_pw", "pw");
            tokio::spawn(async move {
                let conn = common::connect(&conf).await.map_err(|e| e.to_string())?;
                let started = Instant::now();
                let mut i = 0i64;
                // Runs for as long as the storm lasts (it stops once told, below).
                while started.elapsed() < Duration::from_secs(120) {
                    let row = conn
                        .client
                        .query_one("SELECT $1::bigint * 3, pg_backend_pid()", &[&i])
                        .await
                        .map_err(|e| format!("query {i}: {e}"))?;
                    if row.get::<_, i64>(0) != i * 3 {
                        return Err(format!("query {i}: wrong answer"));
                    }
                    i += 1;
                    if conn.client.is_closed() {
                        return Err("closed".into());
                    }
                    if STORM_OVER.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
                Ok::<i64, String>(i)
            })
        })
        .collect();
    let rss_before = rss_kib();
    let seed = 0x5eed_f00d_u64;
    let mut rng = Rng(seed);
    let valid = valid_stream("hostile_fuzz");
    let streams: Vec<Vec<u8>> = (0..STREAMS)
        .map(|_| hostile_stream(&mut rng, &valid))
        .collect();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut storm = Vec::with_capacity(STREAMS);
    for bytes in streams {
        let permit = std::sync::Arc::clone(&semaphore)
            .acquire_owned()
            .await
            .expect("semaphore");
        storm.push(tokio::spawn(async move {
            let got = throw(addr, bytes).await;
            drop(permit);
            got
        }));
    }
    let mut answered = 0;
    for t in storm {
        if t.await.expect("no panic") > 0 {
            answered += 1;
        }
    }
    STORM_OVER.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workload {
        total += w
            .await
            .expect("no panic")
            .unwrap_or_else(|e| panic!("a good client was hurt (seed {seed:#x}): {e}"));
    }
    let rss_after = rss_kib();
    eprintln!(
        "{STREAMS} hostile streams ({answered} answered); good clients ran {total} queries; \
         RSS {rss_before} KiB before, {rss_after} KiB after (test process and proxy together)"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    assert!(total > 0);
    well_behaved(&proxy, "hostile_fuzz", 20)
        .await
        .expect("still serving after the storm");
}

static STORM_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn silent_sockets_are_closed_after_the_login_timeout_and_cost_little() {
    const SILENT: usize = 1000;
    let proxy = proxy(
        "hostile_silent",
        "[listen]\nclient_login_timeout = \"2s\"\n",
    )
    .await;
    let before = rss_kib();
    let mut sockets = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        sockets.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    // Let pgshield accept them all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_kib();
    eprintln!(
        "RSS with {SILENT} silent sockets: {before} KiB before, {during} KiB during ({} KiB each, test process and proxy together)",
        during.saturating_sub(before) / SILENT as u64
    );
    assert!(
        during.saturating_sub(before) < 64 * 1024,
        "{SILENT} silent sockets grew RSS from {before} to {during} KiB"
    );
    well_behaved(&proxy, "hostile_silent", 10)
        .await
        .expect("a good client logs in past them");
    for (i, s) in sockets.iter_mut().enumerate() {
        assert!(raw::closed(s).await, "silent socket {i} was never closed");
    }
}

/// An md5 login from `source` with `password`; returns how long the whole attempt took
/// and the SQLSTATE of its refusal (None: logged in).
async fn login_from(
    source: &str,
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> (Duration, Option<String>) {
    let started = Instant::now();
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("address"))
        .expect("bind the source address");
    let mut s = socket.connect(addr).await.expect("connect");
    raw::send(
        &mut s,
        &raw::startup(&[("user", user), ("database", "app")]),
    )
    .await;
    let (tag, body) = raw::read_message(&mut s).await.expect("md5 challenge");
    assert_eq!((tag, &body[..4]), (b'R', &5i32.to_be_bytes()[..]));
    let salt: [u8; 4] = body[4..8].try_into().expect("salt");
    let mut response =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
            .into_bytes();
    response.push(0);
    raw::send(&mut s, &raw::message(b'p', &response)).await;
    let (tag, body) = raw::read_message(&mut s).await.expect("an answer");
    let outcome = (tag == b'E').then(|| raw::error_code(&body));
    (started.elapsed(), outcome)
}

#[tokio::test]
async fn failed_logins_from_one_address_are_slowed_and_other_addresses_are_not() {
    common::create_role("hostile_guess", "pw").await;
    let proxy =
        TestProxy::start("[users.hostile_guess]\nauth = \"md5\"\npassword = \"pw\"\n").await;
    let addr = proxy.addr;
    let mut took = Vec::new();
    for _ in 0..5 {
        let (elapsed, refused) = login_from("127.0.0.2", addr, "hostile_guess", "guess").await;
        assert_eq!(refused.as_deref(), Some("28P01"));
        took.push(elapsed);
    }
    // The first three are free; then 250 ms, 500 ms, … (lower bounds only).
    assert!(took[3] >= Duration::from_millis(250), "{took:?}");
    assert!(took[4] >= Duration::from_millis(500), "{took:?}");
    // The wait comes before authentication, so the right password waits too: a guesser
    // cannot learn anything by hanging up early.
    let (right, refused) = login_from("127.0.0.2", addr, "hostile_guess", "pw").await;
    assert_eq!(refused, None);
    assert!(right >= Duration::from_secs(1), "{right:?}");
    // While the next guess waits out its second, another address logs in.
    let guess = tokio::spawn(login_from("127.0.0.2", addr, "hostile_guess", "guess"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let conn = proxy
        .connect("hostile_guess", "pw")
        .await
        .expect("another address is not slowed");
    let login = started.elapsed();
    let (slowed, _) = guess.await.expect("no panic");
    assert!(slowed >= Duration::from_secs(1), "{slowed:?}");
    assert!(
        login < slowed,
        "the good login ({login:?}) did not wait behind the guesser ({slowed:?})"
    );
    conn.client.simple_query("SELECT 1").await.expect("works");
}

#[tokio::test]
async fn bytes_sent_behind_an_ssl_request_before_its_answer_are_refused() {
    let proxy = proxy("hostile_early", "").await;
    // An SSLRequest and, in the same write, what would be a TLS ClientHello: PostgreSQL
    // refuses data sent before it answered (CVE-2021-23214), and so does pgshield.
    let mut bytes = raw::request(80877103, &[]);
    bytes.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &bytes).await;
    let (tag, body) = raw::read_message(&mut s).await.expect("an answer");
    assert_eq!((tag, raw::error_code(&body)), (b'E', "08P01".to_owned()));
    assert!(raw::closed(&mut s).await);
    // A well-behaved SSLRequest still gets its answer.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::request(80877103, &[])).await;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
}

/// A client that sends without reading what pgshield answers itself (ReadyForQuery for
/// each Sync between transactions) is read no faster than it reads: PostgreSQL stops
/// reading a client it cannot write to, and pgshield's memory for it stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_is_not_read_without_end() {
    let proxy = proxy("hostile_flood", "").await;
    let stream = raw::login_trusted(proxy.addr, "hostile_flood").await;
    let (_unread, mut write) = stream.into_split();
    // 12 MB of Syncs (each answered with a 6-byte ReadyForQuery), never read.
    let flood = raw::SYNC.repeat(12 * 1024 * 1024 / raw::SYNC.len());
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&flood).await;
        write
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pool = proxy
        .shared
        .pools
        .get("app", "hostile_flood")
        .expect("pool");
    let read = pool.stats.total(|t| &t.bytes_received);
    assert!(
        read < 4 * 1024 * 1024,
        "{read} bytes read from a client that reads nothing"
    );
    assert!(!writer.is_finished(), "the client is held back");
    writer.abort();
}
