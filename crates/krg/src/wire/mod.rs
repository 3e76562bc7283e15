//! Framing and messages of krg's two protocols: the node port (peer ⇄ peer,
//! over mutual TLS) and the client socket (user ⇄ local krgd, Unix socket).
//!
//! A frame is a 4-byte big-endian length and a postcard-encoded message; the
//! length is checked against [`FRAME_BYTES_MAX`] before a byte of the body is
//! read. Every connection opens with a [`Hello`] carrying a magic number and
//! the protocol version, so a stranger or an older krg is told apart from a
//! peer at once.

pub mod client;
pub mod peer;
pub mod stream;

use futures::{SinkExt, StreamExt};
use krg_types::limits::FRAME_BYTES_MAX;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// "KRG\x01": first field of every hello.
pub const MAGIC: u32 = 0x4b52_4701;
/// Version of the wire protocol, bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 2;

/// What a connection is for; chosen by the side that connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnKind {
    /// Multiplexed requests between members (raft, gossip, jobs control).
    Rpc,
    /// A machine asking to become a member; the only kind allowed without a
    /// client certificate.
    Join,
    /// One job's streams between its execution node and its home node.
    Stream,
    /// A user's command on the local Unix socket.
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: u32,
    pub version: u16,
    pub kind: ConnKind,
}

impl Hello {
    pub fn new(kind: ConnKind) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            kind,
        }
    }

    /// Checks magic and version; the error is the sentence logged and sent back.
    pub fn check(&self) -> Result<(), WireError> {
        if self.magic != MAGIC {
            return Err(WireError::BadMagic(self.magic));
        }
        if self.version != PROTOCOL_VERSION {
            return Err(WireError::Version {
                theirs: self.version,
                ours: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("undecodable message ({0})")]
    Decode(postcard::Error),
    #[error("message could not be encoded ({0})")]
    Encode(postcard::Error),
    #[error("not a krg peer (bad magic {0:#x})")]
    BadMagic(u32),
    #[error("protocol version {theirs} is not supported (this krg speaks {ours}): upgrade the older node")]
    Version { theirs: u16, ours: u16 },
    #[error("no message within {0} ms")]
    Timeout(u64),
}

/// A framed, typed connection over any byte stream.
pub struct FrameConn<S> {
    inner: Framed<S, LengthDelimitedCodec>,
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(FRAME_BYTES_MAX)
        .new_codec()
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameConn<S> {
    pub fn new(io: S) -> Self {
        FrameConn {
            inner: Framed::new(io, codec()),
        }
    }

    /// The connection of [`FrameConn::into_inner`] again, with whatever it
    /// had read ahead.
    pub fn from_framed(inner: Framed<S, LengthDelimitedCodec>) -> Self {
        FrameConn { inner }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let bytes = postcard::to_stdvec(msg).map_err(WireError::Encode)?;
        self.inner.send(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Queues a message without flushing (for batching stream chunks).
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let bytes = postcard::to_stdvec(msg).map_err(WireError::Encode)?;
        self.inner.feed(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        SinkExt::<bytes::Bytes>::flush(&mut self.inner).await?;
        Ok(())
    }

    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, WireError> {
        match self.inner.next().await {
            None => Err(WireError::Closed),
            Some(Err(e)) => Err(WireError::Io(e)),
            Some(Ok(frame)) => postcard::from_bytes(&frame).map_err(WireError::Decode),
        }
    }

    pub async fn recv_timeout<T: DeserializeOwned>(&mut self, ms: u64) -> Result<T, WireError> {
        match tokio::time::timeout(std::time::Duration::from_millis(ms), self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(WireError::Timeout(ms)),
        }
    }

    pub fn into_inner(self) -> Framed<S, LengthDelimitedCodec> {
        self.inner
    }

    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

/// Decodes one message from a frame body.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(frame).map_err(WireError::Decode)
}

/// Encodes one message into a frame body.
pub fn encode<T: Serialize>(msg: &T) -> Result<bytes::Bytes, WireError> {
    postcard::to_stdvec(msg)
        .map(Into::into)
        .map_err(WireError::Encode)
}

/// A stable error code sent over the wire with a human sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or out of bounds.
    BadRequest,
    /// The caller may not do this (not root, not the owner, no certificate).
    PermissionDenied,
    /// The thing named does not exist (node, gpid, image).
    NotFound,
    /// The cluster cannot do it now (no leader, node down); retrying may work.
    Unavailable,
    /// A join token is wrong, expired or used.
    BadToken,
    /// Refused by policy (unmovable job, limit reached).
    Refused,
    /// A fault inside krgd.
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
        }
    }
}
