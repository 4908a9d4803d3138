// A measuring stick, not pgshield: the least a tokio transaction pooler does for a
// pgbench select1 transaction (simple Query only, trust, 20 backends to 127.0.0.1:5440,
// listening on 127.0.0.1:6460; W=workers). Experiment code: it unwraps and panics on
// anything unexpected. See docs/BENCHMARKS.md (fourth session of 2026-11-28).
// Also: PORT=port to listen on; P=1: a thread per worker, each with its own
// current-thread runtime, SO_REUSEPORT listener and 20/W backends; WEIGHT=spread|tight:
// dead weight run per client message (src/weight.rs; seventh session); WEIGHT=data|datatight:
// 100 updates per client message of the session's own memory, in 100 cache lines or in one.
use bytes::{Buf, BytesMut};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
mod weight;
// 0: none, 1: spread, 2: tight, 3: data, 4: datatight (src/weight.rs).
static WEIGHT: std::sync::LazyLock<u8> = std::sync::LazyLock::new(|| match std::env::var("WEIGHT").as_deref() { Ok("spread") => 1, Ok("tight") => 2, Ok("data") => 3, Ok("datatight") => 4, _ => 0 });

#[global_allocator]
static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Pool { idle: Mutex<Vec<TcpStream>>, sem: Semaphore }

fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    b.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] { b.extend_from_slice(k.as_bytes()); b.push(0); b.extend_from_slice(v.as_bytes()); b.push(0); }
    b.push(0);
    let n = b.len() as u32; b[..4].copy_from_slice(&n.to_be_bytes()); b
}

// Reads messages until ReadyForQuery; returns everything read before it (params etc).
async fn until_ready(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(8192); let mut out = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len { break; }
            let msg = buf.split_to(1 + len);
            if msg[0] == b'Z' { return out; }
            if msg[0] == b'S' { out.extend_from_slice(&msg); }
        }
        if s.read_buf(&mut buf).await.unwrap() == 0 { panic!("eof") }
    }
}

async fn session(mut c: TcpStream, pool: Arc<Pool>, params: Arc<Vec<u8>>) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(8192);
    // startup (no SSL)
    loop {
        c.read_buf(&mut buf).await?;
        if buf.len() >= 4 { let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize; if buf.len() >= n {
            let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            buf.advance(n);
            if code == 80877103 { c.write_all(b"N").await?; continue; }
            break; } }
    }
    let mut hello = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    hello.extend_from_slice(&params);
    hello.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2, b'Z', 0, 0, 0, 5, b'I']);
    c.write_all(&hello).await?;
    let mut sbuf = BytesMut::with_capacity(8192);
    let mut mem = vec![0u64; if *WEIGHT >= 3 { 800 } else { 0 }];
    loop {
        // wait for a complete client message
        loop {
            if buf.len() >= 5 { let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize; if buf.len() >= 1 + len { break; } }
            if c.read_buf(&mut buf).await? == 0 { return Ok(()); }
        }
        if buf[0] == b'X' { return Ok(()); }
        match *WEIGHT { 1 | 2 => { std::hint::black_box(weight::weight(buf.len() as u64, *WEIGHT == 1)); } 3 | 4 => { std::hint::black_box(weight::touch(&mut mem, *WEIGHT == 3)); } _ => {} }
        let permit = pool.sem.acquire().await.unwrap(); permit.forget();
        let mut s = pool.idle.lock().unwrap().pop().unwrap();
        s.write_all(&buf).await?; buf.clear();
        // relay until ReadyForQuery 'I'
        let mut done = false;
        while !done {
            s.read_buf(&mut sbuf).await?;
            let mut i = 0;
            while sbuf.len() - i >= 5 {
                let len = u32::from_be_bytes([sbuf[i + 1], sbuf[i + 2], sbuf[i + 3], sbuf[i + 4]]) as usize;
                if sbuf.len() - i < 1 + len { break; }
                if sbuf[i] == b'Z' && sbuf[i + 5] == b'I' { done = true; }
                i += 1 + len;
            }
            c.write_all(&sbuf[..i]).await?; sbuf.advance(i);
        }
        pool.idle.lock().unwrap().push(s); pool.sem.add_permits(1);
    }
}

fn main() {
    let workers: usize = std::env::var("W").ok().and_then(|w| w.parse().ok()).unwrap_or(2);
    if std::env::var("P").is_ok() { return percore(workers); }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
    rt.block_on(async {
        let (pool, params) = connect_pool(20).await;
        let l = TcpListener::bind(addr()).await.unwrap();
        loop {
            let (c, _) = l.accept().await.unwrap();
            let (p, pr) = (pool.clone(), params.clone());
            tokio::spawn(async move { let _ = session(c, p, pr).await; });
        }
    });
}

async fn connect_pool(n: usize) -> (Arc<Pool>, Arc<Vec<u8>>) {
    let mut idle = Vec::new(); let mut params = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect("127.0.0.1:5440").await.unwrap(); s.set_nodelay(true).unwrap();
        s.write_all(&startup("bench", "bench")).await.unwrap();
        params = until_ready(&mut s).await; idle.push(s);
    }
    (Arc::new(Pool { idle: Mutex::new(idle), sem: Semaphore::new(n) }), Arc::new(params))
}

// Thread per core: each thread its own current_thread runtime, listener (SO_REUSEPORT)
// and pool shard of 20/W backends.
fn percore(workers: usize) {
    assert!((1..=20).contains(&workers), "W: 1 to 20 workers share the 20 backends");
    let mut threads = Vec::new();
    for _ in 0..workers {
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (pool, params) = connect_pool(20 / workers).await;
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.set_reuseport(true).unwrap(); sock.set_reuseaddr(true).unwrap();
                sock.bind(addr().parse().unwrap()).unwrap();
                let l = sock.listen(1024).unwrap();
                loop {
                    let (c, _) = l.accept().await.unwrap();
                    let (p, pr) = (pool.clone(), params.clone());
                    tokio::spawn(async move { let _ = session(c, p, pr).await; });
                }
            });
        }));
    }
    for t in threads { t.join().unwrap(); }
}

fn addr() -> String { format!("127.0.0.1:{}", std::env::var("PORT").unwrap_or_else(|_| "6460".into())) }
