//! The cluster CA: created once by `krg cluster init` (or a first `krgd`),
//! it signs each member's certificate at join.

use super::{Identity, IdentityError, StateMeta};
use krg_types::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

/// Name every node certificate carries, and that peers ask for in TLS.
pub const NODE_SERVER_NAME: &str = "krg-node";

fn cert_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Cert(e.to_string())
}

/// DNS name that encodes a node id in its certificate.
pub fn node_dns_name(id: NodeId) -> String {
    format!("node-{id}.krg")
}

fn node_params(id: NodeId, cluster_id: &str) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_string(), node_dns_name(id)])
        .map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("krg node {id}"));
    dn.push(
        DnType::OrganizationName,
        format!("krg cluster {cluster_id}"),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn ca_params(cluster_id: &str) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("krg cluster CA {cluster_id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Creates a cluster: a CA and node 1's certificate, signed by it.
pub fn init_cluster(addr: &str) -> Result<(Identity, String), IdentityError> {
    let cluster_id = hex::encode(rand::random::<[u8; 8]>());
    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let ca_cert = ca_params(&cluster_id)?
        .self_signed(&ca_key)
        .map_err(cert_err)?;
    let node_id = NodeId::new(1).expect("1 is a valid node id");
    let node_key = KeyPair::generate().map_err(cert_err)?;
    let node_cert = node_params(node_id, &cluster_id)?
        .signed_by(&node_key, &ca_cert, &ca_key)
        .map_err(cert_err)?;
    let node_cert_pem = node_cert.pem();
    let spki = spki_sha256_of_pem(&node_cert_pem)?;
    let identity = Identity {
        meta: StateMeta::new(cluster_id, node_id, addr.to_string()),
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: Some(ca_key.serialize_pem()),
        node_cert_pem,
        node_key_pem: node_key.serialize_pem(),
    };
    Ok((identity, spki))
}

/// A new key and a signing request for it (on the joining machine).
pub fn new_key_and_csr() -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let params = CertificateParams::new(vec![NODE_SERVER_NAME.to_string()]).map_err(cert_err)?;
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(cert_err)?))
}

/// SHA-256 (hex) of the public key in a CSR: what the cluster records, and
/// what peers will see in the certificate issued for it.
pub fn spki_sha256_of_csr(csr_pem: &str) -> Result<String, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| IdentityError::Cert(format!("bad certificate request PEM: {e}")))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(cert_err)?;
    Ok(hex::encode(Sha256::digest(
        csr.certification_request_info.subject_pki.raw,
    )))
}

/// Signs a joining node's CSR: the names in the certificate are ours, never
/// the requester's.
pub fn issue_node_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    id: NodeId,
    cluster_id: &str,
) -> Result<String, IdentityError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(cert_err)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(ca_cert_pem)
        .map_err(cert_err)?
        .self_signed(&ca_key)
        .map_err(cert_err)?;
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err)?;
    csr.params = node_params(id, cluster_id)?;
    Ok(csr.signed_by(&ca_cert, &ca_key).map_err(cert_err)?.pem())
}

/// SHA-256 of a DER certificate.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

pub fn first_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| IdentityError::Cert(format!("bad certificate PEM: {e}")))
}

/// SHA-256 of the CA certificate, as carried in join tokens.
pub fn ca_sha256(ca_cert_pem: &str) -> Result<[u8; 32], IdentityError> {
    Ok(cert_sha256(&first_der(ca_cert_pem)?))
}

/// SHA-256 (hex) of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256_of_der(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(cert_err)?;
    Ok(hex::encode(Sha256::digest(
        cert.tbs_certificate.subject_pki.raw,
    )))
}

pub fn spki_sha256_of_pem(pem: &str) -> Result<String, IdentityError> {
    spki_sha256_of_der(&first_der(pem)?)
}

/// The node id a certificate was issued for (from its `node-<id>.krg` name).
pub fn node_id_of_der(der: &[u8]) -> Option<NodeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => dns
            .strip_prefix("node-")
            .and_then(|rest| rest.strip_suffix(".krg"))
            .and_then(|id| id.parse().ok()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_names_the_node_and_keeps_the_requested_key() {
        let (id, spki1) = init_cluster("10.0.0.1:7470").unwrap();
        assert_eq!(
            node_id_of_der(&first_der(&id.node_cert_pem).unwrap())
                .unwrap()
                .get(),
            1
        );
        assert_eq!(spki_sha256_of_pem(&id.node_cert_pem).unwrap(), spki1);
        let (_key, csr) = new_key_and_csr().unwrap();
        let want = spki_sha256_of_csr(&csr).unwrap();
        let node7 = NodeId::new(7).unwrap();
        let cert = issue_node_cert(
            &id.ca_cert_pem,
            id.ca_key_pem.as_deref().unwrap(),
            &csr,
            node7,
            &id.meta.cluster_id,
        )
        .unwrap();
        let der = first_der(&cert).unwrap();
        assert_eq!(node_id_of_der(&der), Some(node7));
        assert_eq!(spki_sha256_of_der(&der).unwrap(), want);
    }
}
