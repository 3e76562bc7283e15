//! rustls configurations for the node port.
//!
//! - Members present their node certificate and require the peer's (mutual
//!   TLS); the server also accepts a connection without a client certificate,
//!   but such a connection may only ask to join (checked in `peer::server`).
//! - A joining machine has no CA yet: it trusts the server only if the chain
//!   it presents contains the CA whose SHA-256 is in the join token.

use super::ca::{cert_sha256, NODE_SERVER_NAME};
use super::{Identity, IdentityError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Cert(e.to_string())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(tls_err)
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut store = RootCertStore::empty();
    for c in certs(ca_pem)? {
        store.add(c).map_err(tls_err)?;
    }
    Ok(Arc::new(store))
}

/// Our chain: the node certificate, then the CA (so joiners can pin it).
fn chain(id: &Identity) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let mut chain = certs(&id.node_cert_pem)?;
    chain.extend(certs(&id.ca_cert_pem)?);
    Ok(chain)
}

pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, IdentityError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca_cert_pem)?, p.clone())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(id)?, key(&id.node_key_pem)?)
        .map_err(tls_err)?;
    Ok(Arc::new(cfg))
}

pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, IdentityError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(&id.ca_cert_pem)?)
        .with_client_auth_cert(chain(id)?, key(&id.node_key_pem)?)
        .map_err(tls_err)?;
    Ok(Arc::new(cfg))
}

/// For a machine that is joining: no client certificate, server pinned by
/// the CA hash from the token.
pub fn join_client_config(ca_sha256: [u8; 32]) -> Result<Arc<ClientConfig>, IdentityError> {
    let p = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        ca_sha256,
        provider: p.clone(),
    });
    let cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A TLS client that presents no certificate and trusts the given CA (tests
/// and diagnostics: shows what a stranger gets).
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, IdentityError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(NODE_SERVER_NAME).expect("the node server name is a valid DNS name")
}

/// Trusts a server whose chain includes the CA pinned by the join token,
/// then verifies the chain against that CA like any WebPKI client.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_sha256(c.as_ref()) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the node's certificate authority does not match the join token".into(),
                )
            })?;
        let mut store = RootCertStore::empty();
        store
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
