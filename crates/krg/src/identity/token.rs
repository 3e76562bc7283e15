//! Join tokens: `krgjoin1.<sha256 of the CA certificate>.<secret>`.
//!
//! The CA hash lets the joining machine check it talks to the right cluster
//! before it sends anything (as kubeadm's discovery hash does); the secret
//! proves the cluster's administrator let it in. The cluster stores only the
//! secret's SHA-256, and each token is consumed by its first use.

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "krgjoin1";
const SECRET_BYTES: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: [u8; 32],
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed join token: expected krgjoin1.<64 hex digits>.<32 hex digits>, as printed by `krg cluster token`")]
pub struct MalformedToken;

impl JoinToken {
    pub fn generate(ca_sha256: [u8; 32]) -> Self {
        let mut secret = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        JoinToken {
            ca_sha256,
            secret: hex::encode(secret),
        }
    }

    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let mut parts = text.trim().split('.');
        let (Some(prefix), Some(ca), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedToken);
        };
        if prefix != PREFIX || secret.len() != SECRET_BYTES * 2 || hex::decode(secret).is_err() {
            return Err(MalformedToken);
        }
        let ca: [u8; 32] = hex::decode(ca)
            .map_err(|_| MalformedToken)?
            .try_into()
            .map_err(|_| MalformedToken)?;
        Ok(JoinToken {
            ca_sha256: ca,
            secret: secret.to_string(),
        })
    }

    pub fn secret_hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

/// What the replicated state stores for a token.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}",
            hex::encode(self.ca_sha256),
            self.secret
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let t = JoinToken::generate([7; 32]);
        let back = JoinToken::parse(&t.to_string()).unwrap();
        assert_eq!(back, t);
        assert_eq!(JoinToken::parse("krgjoin1.zz.zz"), Err(MalformedToken));
        assert_eq!(JoinToken::parse(""), Err(MalformedToken));
        assert_eq!(JoinToken::parse(&format!("{t}.x")), Err(MalformedToken));
        assert_ne!(t.secret_hash(), t.secret);
    }
}
