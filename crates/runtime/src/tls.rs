//! TLS for the coordinator's gRPC channel (rustls, through tonic): the
//! coordinator serves its certificate, workers check it against a CA they
//! are given (or the system's roots). The job token then never crosses the
//! network in the clear.

use std::fmt;
use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::RuntimeError;

/// The coordinator's certificate chain and private key, PEM-encoded.
/// `Debug` does not show the key.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// Where they came from, for errors.
    origin: String,
}

impl ServerTls {
    /// From PEM text in memory.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        ServerTls {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            origin: "the PEM given".into(),
        }
    }

    /// From a certificate chain file and a private key file (PEM).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, RuntimeError> {
        Ok(ServerTls {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "private key")?,
            origin: format!("{} and {}", cert.display(), key.display()),
        })
    }

    pub(crate) fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("origin", &self.origin)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// How a worker checks the coordinator's certificate.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    ca_pem: Option<Vec<u8>>,
    domain: Option<String>,
}

impl ClientTls {
    /// Trust the system's root certificates.
    pub fn system_roots() -> Self {
        Self::default()
    }

    /// Trust certificates issued by this CA (PEM); a self-signed
    /// coordinator certificate is its own CA.
    pub fn with_ca_pem(ca_pem: impl Into<Vec<u8>>) -> Self {
        ClientTls {
            ca_pem: Some(ca_pem.into()),
            domain: None,
        }
    }

    /// [`ClientTls::with_ca_pem`] from a file.
    pub fn from_ca_file(path: &Path) -> Result<Self, RuntimeError> {
        Ok(Self::with_ca_pem(read(path, "CA certificate")?))
    }

    /// Checks the certificate for this name instead of the URL's host
    /// (e.g. a coordinator reached by IP whose certificate names its host).
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        match &self.domain {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, RuntimeError> {
    let pem = std::fs::read(path).map_err(|e| {
        RuntimeError::Tls(format!(
            "cannot read the TLS {what} {}: {e}",
            path.display()
        ))
    })?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(RuntimeError::Tls(format!(
            "the TLS {what} {} is not PEM (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(pem)
}
