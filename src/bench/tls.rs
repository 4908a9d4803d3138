//! TLS for the benchmark's tokio-postgres clients, on rustls: the certificate is not
//! checked (libpq's `sslmode=require`), since what is measured is the cost of TLS, not
//! trust in a throwaway certificate; SCRAM binds to it as libpq does.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::config::{ServerTlsConfig, ServerTlsMode};
use crate::tls::{ServerTls, TlsError};

/// Makes a TLS connection per new client.
#[derive(Clone)]
pub struct RequireTls(Arc<rustls::ClientConfig>);

impl RequireTls {
    pub fn new() -> Result<RequireTls, TlsError> {
        let tls = ServerTls::new(&ServerTlsConfig {
            mode: ServerTlsMode::Require,
            ca: None,
            ..Default::default()
        })?;
        tls.client_config()
            .map(RequireTls)
            .ok_or_else(|| TlsError::Setup("no TLS configuration".into()))
    }
}

impl<S> MakeTlsConnect<S> for RequireTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type TlsConnect = ConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<ConnectOne> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(ConnectOne(Arc::clone(&self.0), name))
    }
}

pub struct ConnectOne(Arc<rustls::ClientConfig>, ServerName<'static>);

impl<S> TlsConnect<S> for ConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Tls<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let ConnectOne(config, name) = self;
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(Tls(stream))
        })
    }
}

pub struct Tls<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Tls<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // As libpq does over TLS: SCRAM-SHA-256-PLUS when the server offers it.
        let end_point = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| crate::tls::server_end_point(cert.as_ref()));
        match end_point {
            Some(data) => ChannelBinding::tls_server_end_point(data),
            None => ChannelBinding::none(),
        }
    }
}
