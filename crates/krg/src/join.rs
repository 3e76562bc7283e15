//! The joining side: a machine with a token asks a member to admit it.

use crate::identity::tls::{join_client_config, server_name};
use crate::identity::token::JoinToken;
use crate::identity::{ca, Identity, StateMeta};
use crate::wire::peer::{JoinRequest, JoinResponse};
use crate::wire::{ConnKind, FrameConn, Hello, RemoteError};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] crate::identity::token::MalformedToken),
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{addr} is not a member of the cluster this token is for ({reason})")]
    WrongCluster { addr: String, reason: String },
    #[error("the cluster refused to admit this node: {0}")]
    Refused(String),
    #[error("the cluster's answer is inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// Joins the cluster of the member at `member_addr`; returns the new
/// identity (not yet saved).
pub async fn join(
    member_addr: &str,
    token_text: &str,
    our_addr: &str,
) -> Result<Identity, JoinError> {
    let token = JoinToken::parse(token_text)?;
    let (key_pem, csr_pem) = ca::new_key_and_csr()?;
    let want_spki = ca::spki_sha256_of_csr(&csr_pem)?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unreachable = |reason: String| JoinError::Unreachable {
        addr: member_addr.to_string(),
        reason,
    };
    let exchange = async {
        let tcp = TcpStream::connect(member_addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = TlsConnector::from(join_client_config(token.ca_sha256)?)
            .connect(server_name(), tcp)
            .await
            .map_err(|e| JoinError::WrongCluster {
                addr: member_addr.to_string(),
                reason: e.to_string(),
            })?;
        let mut conn = FrameConn::new(tls);
        conn.send(&Hello::new(ConnKind::Join))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let hello: Result<(), RemoteError> =
            conn.recv().await.map_err(|e| unreachable(e.to_string()))?;
        hello.map_err(|e| JoinError::Refused(e.message))?;
        conn.send(&JoinRequest {
            token_secret: token.secret.clone(),
            csr_pem,
            addr: our_addr.to_string(),
            hostname,
            version: krg_types::KRG_VERSION.to_string(),
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        let resp: JoinResponse = conn.recv().await.map_err(|e| unreachable(e.to_string()))?;
        resp.map_err(|e| JoinError::Refused(e.message))
    };
    let accepted = tokio::time::timeout(JOIN_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {} s", JOIN_TIMEOUT.as_secs())))??;
    if ca::ca_sha256(&accepted.ca_cert_pem)? != token.ca_sha256 {
        return Err(JoinError::Inconsistent(
            "the CA certificate does not match the token".into(),
        ));
    }
    if ca::spki_sha256_of_pem(&accepted.cert_pem)? != want_spki {
        return Err(JoinError::Inconsistent(
            "the certificate is not for this node's key".into(),
        ));
    }
    Ok(Identity {
        meta: StateMeta::new(accepted.cluster_id, accepted.node_id, our_addr.to_string()),
        ca_cert_pem: accepted.ca_cert_pem,
        ca_key_pem: None,
        node_cert_pem: accepted.cert_pem,
        node_key_pem: key_pem,
    })
}
