//! The byte streams pgshield speaks over, on both sides: plain TCP, or TLS over it (as the
//! TLS server towards clients, as the TLS client towards backends), and Unix-domain sockets:
//! a server's whose `host` is a directory, and pgshield's own for local clients. One enum,
//! so the relay is not generic.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsStream;

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// A server's Unix-domain socket (never TLS, as with libpq). Boxed: unboxed, it would
    /// make every client session's stream 8 bytes larger (see the assertion below).
    Unix(Box<UnixStream>),
    /// Only while a TCP stream is being upgraded to TLS (and after a failed upgrade):
    /// every read and write fails.
    Detached,
    /// An in-memory pipe, for driving the login state machine in fuzzing and tests.
    #[doc(hidden)]
    Memory(tokio::io::DuplexStream),
}

// Every client session holds a `Stream`: no larger than the TCP stream it usually is.
const _: () = assert!(std::mem::size_of::<Stream>() == std::mem::size_of::<TcpStream>());

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection is being upgraded to TLS",
    )
}

/// Where a client connected from: a TCP address, or pgshield's own Unix-domain socket
/// (`listen.unix_socket_dir`), which has no address; `port` is the one in its name
/// (`.s.PGSQL.<port>`), what PgBouncer's `SHOW CLIENTS` shows for such a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    Unix { port: u16 },
}

impl Peer {
    /// The client's IP address; `None` over the Unix-domain socket.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Tcp(addr) => Some(addr.ip()),
            Peer::Unix { .. } => None,
        }
    }

    /// Whether the client is on this machine: over the Unix-domain socket, or from a
    /// loopback address.
    pub fn is_local(&self) -> bool {
        self.ip().is_none_or(|ip| ip.to_canonical().is_loopback())
    }
}

impl From<std::net::SocketAddr> for Peer {
    fn from(addr: std::net::SocketAddr) -> Peer {
        Peer::Tcp(addr)
    }
}

/// `host:port`, or `[local]` for the Unix-domain socket (as PostgreSQL logs it).
impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix { .. } => f.write_str("[local]"),
        }
    }
}

/// Whether a server `host` is the directory of its Unix-domain socket (as libpq reads a
/// host starting with `/`).
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// How a server is named in messages and logs: `host:port` (`[v6]:port` for IPv6), or the
/// path of its Unix-domain socket (`dir/.s.PGSQL.port`, PostgreSQL's own naming).
pub fn server_addr(host: &str, port: u16) -> String {
    if is_socket_dir(host) {
        format!("{}/.s.PGSQL.{port}", host.trim_end_matches('/'))
    } else if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Opens a connection to a server: over TCP (its options set), or to its Unix-domain
/// socket when `host` is a directory.
pub async fn connect_server(host: &str, port: u16) -> io::Result<Stream> {
    if is_socket_dir(host) {
        return Ok(Stream::Unix(Box::new(
            UnixStream::connect(server_addr(host, port)).await?,
        )));
    }
    Ok(Stream::from_tcp(TcpStream::connect((host, port)).await?))
}

/// Idle time before the first keepalive probe, and between probes.
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long data sent may go unacknowledged (and keepalive probes unanswered) before the
/// connection is given up as dead: without it a peer gone silent with data in flight (a
/// host cut off mid-statement) is noticed only after the kernel's retransmissions, some
/// 15 minutes.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// The TCP options of every connection, on both sides: no Nagle delay (the protocol is
/// request/response, and pgshield batches its own writes), keepalive and a user timeout
/// to notice dead peers. Set on the client listeners too, whose accepted connections
/// inherit them.
pub fn set_tcp_options(sock: socket2::SockRef<'_>) -> io::Result<()> {
    // (Each tried, whatever the others did.)
    let nodelay = sock.set_tcp_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL);
    let keepalive = sock.set_tcp_keepalive(&keepalive);
    let user_timeout = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
    nodelay.and(keepalive).and(user_timeout)
}

/// Whether accepted connections carry the options set on their listener (Linux copies
/// them; four system calls per connection saved), looked at on the first connection
/// whose options could be read.
fn options_inherited(sock: &socket2::SockRef<'_>) -> bool {
    static INHERITED: OnceLock<bool> = OnceLock::new();
    if let Some(known) = INHERITED.get() {
        return *known;
    }
    let read = || -> io::Result<bool> {
        Ok(sock.tcp_nodelay()?
            && sock.keepalive()?
            && sock.tcp_keepalive_time()? == KEEPALIVE_TIME
            && sock.tcp_keepalive_interval()? == KEEPALIVE_INTERVAL
            && sock.tcp_user_timeout()? == Some(USER_TIMEOUT))
    };
    match read() {
        Ok(inherited) => *INHERITED.get_or_init(|| inherited),
        Err(_) => false,
    }
}

impl Stream {
    /// Whether written bytes may wait in the stream until it is flushed (TLS records;
    /// the in-memory pipe, to be safe): a plain socket's flush does nothing.
    #[inline]
    pub fn holds_back_writes(&self) -> bool {
        !matches!(self, Stream::Tcp(_) | Stream::Unix(_))
    }

    /// A connection pgshield opened (to a backend): its TCP options set.
    pub fn from_tcp(tcp: TcpStream) -> Stream {
        let _ = set_tcp_options(socket2::SockRef::from(&tcp));
        Stream::Tcp(tcp)
    }

    /// A connection accepted from a client listener (whose TCP options are set): the
    /// options are set again only where the kernel did not copy them.
    pub fn from_accepted(tcp: TcpStream) -> Stream {
        let sock = socket2::SockRef::from(&tcp);
        if !options_inherited(&sock) {
            let _ = set_tcp_options(sock);
        }
        Stream::Tcp(tcp)
    }

    /// A connection accepted on pgshield's Unix-domain socket.
    pub fn from_accepted_unix(unix: UnixStream) -> Stream {
        Stream::Unix(Box::new(unix))
    }

    /// Takes the TCP stream out to wrap it in TLS, leaving `Detached`; `None` if the
    /// stream is not plain TCP.
    pub fn take_tcp(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Stream::Detached) {
            Stream::Tcp(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The peer's address (unspecified for in-memory streams).
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.tcp()
            .and_then(|t| t.peer_addr().ok())
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The peer's address over TCP (TLS included), if it is a TCP stream.
    pub fn tcp_peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp().and_then(|t| t.peer_addr().ok())
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp().and_then(|t| t.local_addr().ok())
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Stream::Unix(_))
    }

    /// The TCP connection underneath.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(tcp) => Some(tcp),
            Stream::Tls(tls) => Some(tls.get_ref().0),
            Stream::Unix(_) | Stream::Detached | Stream::Memory(_) => None,
        }
    }

    /// The certificate a backend presented over TLS.
    pub fn peer_server_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(tls) => match tls.as_ref() {
                TlsStream::Client(c) => c.get_ref().1.peer_certificates()?.first(),
                TlsStream::Server(_) => None,
            }
            .map(|c| c.as_ref()),
            _ => None,
        }
    }

    /// True when the peer has closed the connection or sent bytes nobody asked for
    /// (on an idle backend that means a FATAL, e.g. after `pg_terminate_backend`).
    /// Never blocks. A byte it finds is consumed: the connection is not used again.
    pub fn peer_closed_or_spoke(&self) -> bool {
        let mut probe = [0u8; 1];
        let read = match (self, self.tcp()) {
            (Stream::Unix(unix), _) => unix.try_read(&mut probe),
            (_, Some(tcp)) => tcp.try_read(&mut probe),
            (_, None) => return true,
        };
        match read {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Best-effort write that never waits (used from `Drop`); plain TCP or a Unix-domain
    /// socket only, since a TLS record cannot be written without waiting.
    pub fn try_write_now(&self, bytes: &[u8]) {
        match self {
            Stream::Tcp(tcp) => {
                let _ = tcp.try_write(bytes);
            }
            Stream::Unix(unix) => {
                let _ = unix.try_write(bytes);
            }
            _ => {}
        }
    }

    /// Writes all of `bytes` and flushes (TLS may hold written data until flushed).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }
}

impl Stream {
    /// For a stream whose last read said `Pending` (setting the task's waker with the
    /// socket): whether a read now would still say so, since the socket has not turned
    /// readable. Only a plain socket can tell; a TLS stream may hold bytes it has already
    /// decrypted, and is always read.
    pub fn still_unreadable(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.try_io(Interest::READABLE, || Ok(())).is_err(),
            Stream::Unix(s) => s.try_io(Interest::READABLE, || Ok(())).is_err(),
            Stream::Tls(_) | Stream::Detached | Stream::Memory(_) => false,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Memory(s) => Pin::new(s).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Memory(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

/// Every client and backend is a file descriptor: take all the system allows.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_named_by_address_or_by_socket_path() {
        assert_eq!(server_addr("db.internal", 5432), "db.internal:5432");
        assert_eq!(server_addr("::1", 6000), "[::1]:6000");
        assert_eq!(
            server_addr("/var/run/postgresql/", 5433),
            "/var/run/postgresql/.s.PGSQL.5433"
        );
        assert_eq!(server_addr("/", 5432), "/.s.PGSQL.5432");
        assert!(is_socket_dir("/tmp") && !is_socket_dir("tmp") && !is_socket_dir("@pg"));
    }

    #[tokio::test]
    async fn connections_both_ways_give_up_on_a_peer_gone_silent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let out = connect_server("127.0.0.1", addr.port())
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        for stream in [out, Stream::from_accepted(accepted)] {
            let Stream::Tcp(tcp) = &stream else {
                panic!("a TCP stream");
            };
            let sock = socket2::SockRef::from(tcp);
            assert_eq!(sock.tcp_user_timeout().expect("read"), Some(USER_TIMEOUT));
            assert!(sock.keepalive().expect("read") && sock.tcp_nodelay().expect("read"));
        }
    }
}
