//! TLS on both sides, with rustls (ring provider; TLS 1.2 and 1.3 only).
//!
//! [`ClientTls`] terminates clients' TLS: it answers SSLRequest and PostgreSQL 17's direct
//! TLS (ALPN `postgresql`). Its certificate and key are read again when their files change
//! (looked at on every new handshake) or on SIGHUP; a reload that fails keeps the material
//! in force and says why. Connections already open keep the session they have.
//!
//! [`ServerTls`] secures backend connections as libpq's `sslmode` does: `prefer` and
//! `require` encrypt without checking the certificate, `verify-ca` checks the chain,
//! `verify-full` the chain and the host name. A backend that fails its check is never used.
//!
//! [`server_end_point`] is the `tls-server-end-point` channel binding data (RFC 5929) for
//! SCRAM-SHA-256-PLUS.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::net::TcpStream;

use crate::config::{
    ChannelBindingMode, ClientTlsConfig, ClientTlsMode, ServerTlsConfig, ServerTlsMode,
};

/// The ALPN protocol name PostgreSQL uses (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("private key", path)?;
    warn_if_readable_by_others(path);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what: "private key",
        path: path.to_owned(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

/// PostgreSQL refuses a private key that others can read (unless root owns it and only
/// its group may read it too); pgshield warns, as a mounted secret (Kubernetes mounts
/// them 0644 by default) is often so.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    // (As PostgreSQL looks: the group's and others' bits only.)
    let group_may_read = if meta.uid() == 0 { 0o040 } else { 0 };
    if meta.mode() & 0o077 & !group_may_read != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.mode() & 0o777),
            "the TLS private key can be read by other users; PostgreSQL would refuse it (chmod 600)"
        );
    }
}

fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            what,
            path: path.to_owned(),
            reason: format!("a certificate cannot be used as a trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::Setup(format!(
            "no system CA certificates found ({}); set tls.server.ca",
            errors.join("; ")
        )));
    }
    Ok(roots)
}

/// The client-facing side: what answers SSLRequest and direct TLS.
pub struct ClientTls {
    settings: ClientTlsConfig,
    current: RwLock<Loaded>,
    /// When reading changed files last failed (they may have been half written): no
    /// new attempt before [`RELOAD_RETRY`] has passed.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

const RELOAD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

struct Loaded {
    material: Arc<Material>,
    /// Modification times of cert, key and CA when they were read.
    stamp: Vec<Option<SystemTime>>,
}

/// What one handshake uses.
pub struct Material {
    pub config: Arc<rustls::ServerConfig>,
    /// `tls-server-end-point` data of the certificate (see [`server_end_point`]).
    pub end_point: Option<Vec<u8>>,
}

impl ClientTls {
    /// Reads the certificate and key; `None` when client TLS is disabled.
    pub fn new(settings: &ClientTlsConfig) -> Result<Option<ClientTls>, TlsError> {
        if settings.mode == ClientTlsMode::Disable {
            return Ok(None);
        }
        let loaded = Self::load(settings)?;
        Ok(Some(ClientTls {
            settings: settings.clone(),
            current: RwLock::new(loaded),
            failed_at: std::sync::Mutex::new(None),
        }))
    }

    /// Plaintext clients are refused.
    pub fn required(&self) -> bool {
        self.settings.mode == ClientTlsMode::Require
    }

    /// The material for a new handshake, read again first if a file changed.
    pub fn current(&self) -> Arc<Material> {
        let stamp = self.stamp();
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if current.stamp == stamp {
                return Arc::clone(&current.material);
            }
        }
        let mut failed_at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        if failed_at.is_none_or(|at| at.elapsed() >= RELOAD_RETRY) {
            match self.reload() {
                Ok(()) => *failed_at = None,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate files changed but cannot be loaded (yet); still serving the previous ones");
                    *failed_at = Some(std::time::Instant::now());
                }
            }
        }
        drop(failed_at);
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&current.material)
    }

    /// Reads the certificate, key and CA again; on error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Self::load(&self.settings)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        tracing::info!("client TLS certificate loaded");
        Ok(())
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        stamp_of(&self.settings)
    }

    fn load(settings: &ClientTlsConfig) -> Result<Loaded, TlsError> {
        let stamp = stamp_of(settings);
        let (Some(cert), Some(key)) = (&settings.cert, &settings.key) else {
            return Err(TlsError::Setup(
                "tls.client needs cert and key unless mode = \"disable\"".into(),
            ));
        };
        let certs = load_certs("certificate", cert)?;
        let end_point = certs.first().and_then(|c| server_end_point(c));
        let key = load_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match &settings.ca {
            Some(ca) => {
                let roots = load_roots("client CA", ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Setup(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid {
                what: "certificate and key",
                path: cert.clone(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Loaded {
            material: Arc::new(Material {
                config: Arc::new(config),
                end_point,
            }),
            stamp,
        })
    }
}

fn stamp_of(settings: &ClientTlsConfig) -> Vec<Option<SystemTime>> {
    [&settings.cert, &settings.key, &settings.ca]
        .into_iter()
        .map(|p| {
            p.as_ref()
                .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        })
        .collect()
}

/// The backend side: how pgshield secures and checks its server connections.
pub struct ServerTls {
    /// What it was made from (a reload compares them).
    settings: ServerTlsConfig,
    mode: ServerTlsMode,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish()
    }
}

impl ServerTls {
    pub fn new(settings: &ServerTlsConfig) -> Result<ServerTls, TlsError> {
        if settings.ca.is_some()
            && matches!(
                settings.mode,
                ServerTlsMode::Prefer | ServerTlsMode::Require
            )
        {
            tracing::warn!("tls.server.ca is used only by verify-ca and verify-full: with this mode server certificates are not checked");
        }
        let provider = provider();
        let roots = || match &settings.ca {
            Some(ca) => load_roots("server CA", ca),
            None => system_roots(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let mut config = match settings.mode {
            ServerTlsMode::Disable => {
                return Ok(ServerTls {
                    settings: settings.clone(),
                    mode: settings.mode,
                    config: None,
                })
            }
            ServerTlsMode::Prefer | ServerTlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    provider,
                    chain: None,
                }))
                .with_no_client_auth(),
            ServerTlsMode::VerifyCa => {
                let chain = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots()?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsError::Setup(format!("server CA: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Lenient {
                        provider,
                        chain: Some(chain),
                    }))
                    .with_no_client_auth()
            }
            ServerTlsMode::VerifyFull => builder
                .with_root_certificates(roots()?)
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ServerTls {
            settings: settings.clone(),
            mode: settings.mode,
            config: Some(Arc::new(config)),
        })
    }

    pub fn mode(&self) -> ServerTlsMode {
        self.mode
    }

    pub fn channel_binding(&self) -> ChannelBindingMode {
        self.settings.channel_binding
    }

    /// The rustls client configuration (None when disabled), for other clients of
    /// servers: the benchmark's TLS connections.
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.config.clone()
    }

    /// Made from the same settings (the CA file may have been read again since): a
    /// backend secured by one is as good as one secured by the other.
    pub fn same_settings(&self, other: &ServerTls) -> bool {
        self.settings == other.settings
    }

    /// Runs the TLS handshake on a connection whose server answered SSLRequest with `S`.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let Some(config) = &self.config else {
            return Err(io::Error::other("TLS to servers is disabled"));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
    }
}

/// The checks of `prefer` / `require` (none: any certificate, as libpq) and `verify-ca`
/// (the chain must lead to a trusted CA; the name in it may be anything). Either way the
/// handshake's signatures are checked against the certificate presented.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    /// `verify-ca`'s chain check.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name: a name error means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `tls-server-end-point` channel binding data: the hash of the server's certificate,
/// with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1). `None` for
/// algorithms that do not define one (Ed25519, RSA-PSS), as PostgreSQL.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, … }, … }
    let (0x30, cert, _) = der_element(cert_der)? else {
        return None;
    };
    let (_, _, rest) = der_element(cert)?;
    let (0x30, algorithm, _) = der_element(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_element(algorithm)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let (prefix, last) = oid.split_at(oid.len().checked_sub(1)?);
    let hash = match (prefix, last) {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1: SHA-256 by RFC 5929.
        (RSA, [0x04 | 0x05]) => 256,
        (RSA, [0x0e]) => 224,
        (RSA, [0x0b]) => 256,
        (RSA, [0x0c]) => 384,
        (RSA, [0x0d]) => 512,
        (ECDSA_SHA2, [0x01]) => 224,
        (ECDSA_SHA2, [0x02]) => 256,
        (ECDSA_SHA2, [0x03]) => 384,
        (ECDSA_SHA2, [0x04]) => 512,
        _ if oid == ECDSA_SHA1 => 256,
        _ => return None,
    };
    Some(match hash {
        224 => sha2::Sha224::digest(cert_der).to_vec(),
        256 => sha2::Sha256::digest(cert_der).to_vec(),
        384 => sha2::Sha384::digest(cert_der).to_vec(),
        _ => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// One DER element: (tag, contents, what follows).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        cert.der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let der = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            server_end_point(&der),
            Some(sha2::Sha384::digest(&der).to_vec())
        );
        let der = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point(&der),
            Some(sha2::Sha256::digest(&der).to_vec())
        );
        assert_eq!(server_end_point(&self_signed(&rcgen::PKCS_ED25519)), None);
        assert_eq!(server_end_point(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(server_end_point(b""), None);
    }
}
