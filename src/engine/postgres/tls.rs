//! TLS to PostgreSQL with libpq's `sslmode` semantics, on rustls.
//!
//! | sslmode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | if the server offers it | no |
//! | `require` | always | no; with `sslrootcert`, the chain (like libpq) |
//! | `verify-ca` | always | chain against `sslrootcert` or the system roots |
//! | `verify-full` | always | chain and host name (or IP address) |
//!
//! <https://www.postgresql.org/docs/15/libpq-ssl.html#LIBPQ-SSL-SSLMODE-STATEMENTS>

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What tokio-postgres negotiates (verification is the connector's job).
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The endpoint's `sslmode` (libpq's default, `prefer`, when not given).
pub fn mode_of(endpoint: &crate::config::Endpoint) -> Result<SslMode> {
    match endpoint.param("sslmode") {
        Some(v) => {
            SslMode::parse(v).ok_or_else(|| Error::Definite(format!("unknown sslmode {v:?}")))
        }
        None => Ok(SslMode::Prefer),
    }
}

/// Add what to do when the server's certificate chain leads to no trusted root.
pub fn with_trust_hint(message: String) -> String {
    if message.contains("UnknownIssuer") {
        format!(
            "{message}; the server certificate is not signed by a root this machine trusts: pass ?sslrootcert=/path/to/ca.pem"
        )
    } else {
        message
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(message: String) -> Error {
    Error::Definite(message)
}

fn roots(root_cert: Option<&Path>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                tls_error(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| tls_error(format!("sslrootcert {}: {e}", path.display())))?;
                store
                    .add(cert)
                    .map_err(|e| tls_error(format!("sslrootcert {}: {e}", path.display())))?;
            }
            if store.is_empty() {
                return Err(tls_error(format!(
                    "sslrootcert {} holds no certificate",
                    path.display()
                )));
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                // Some system bundles carry certificates rustls rejects; skip them like libpq.
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(tls_error(
                    "no trusted root certificates found on this system; pass ?sslrootcert=/path/ca.pem".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// A connector for `mode`, or `None` when TLS is disabled.
pub fn connector(mode: SslMode, root_cert: Option<&Path>) -> Result<Option<MakeRustlsConnect>> {
    Ok(client_config(mode, root_cert)?.map(MakeRustlsConnect::new))
}

/// The rustls configuration for `mode`, or `None` when TLS is disabled.
pub fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<Option<ClientConfig>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(format!("TLS setup: {e}")))?;
    let verify_chain = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => false,
        SslMode::Require => root_cert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let config = if verify_chain {
        let roots = Arc::new(roots(root_cert)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| tls_error(format!("TLS setup: {e}")))?;
        if mode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner: webpki }))
                .with_no_client_auth()
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    };
    Ok(Some(config))
}

/// `prefer`/`require`: encryption without authenticating the server (libpq's behaviour).
/// Handshake signatures are still checked, so the session key belongs to the presented cert.
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_libpq() {
        assert_eq!(SslMode::parse("allow"), Some(SslMode::Prefer));
        assert_eq!(SslMode::parse("verify-full"), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("on"), None);
        assert!(connector(SslMode::Disable, None).unwrap().is_none());
        assert!(connector(SslMode::Require, None).unwrap().is_some());
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let err = connector(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
