//! The byte streams pgshield speaks over, on both sides. One enum so that TLS can join as a
//! variant without making the relay generic.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
}

impl Stream {
    /// Prepares a fresh TCP connection: no Nagle delay (the protocol is request/response,
    /// and pgshield batches its own writes) and keepalive to notice dead peers.
    pub fn from_tcp(tcp: TcpStream) -> Stream {
        let _ = tcp.set_nodelay(true);
        let sock = socket2::SockRef::from(&tcp);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(60))
            .with_interval(std::time::Duration::from_secs(10));
        let _ = sock.set_tcp_keepalive(&keepalive);
        Stream::Tcp(tcp)
    }

    /// True when the peer has closed the connection or sent bytes nobody asked for
    /// (on an idle backend that means a FATAL, e.g. after `pg_terminate_backend`).
    /// Never blocks.
    pub fn peer_closed_or_spoke(&self) -> bool {
        let Stream::Tcp(tcp) = self;
        let mut probe = [0u8; 1];
        match tcp.try_read(&mut probe) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Best-effort write that never waits (used from `Drop`).
    pub fn try_write_now(&self, bytes: &[u8]) {
        let Stream::Tcp(tcp) = self;
        let _ = tcp.try_write(bytes);
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
