//! The client side of the socket, used by `krg`.

use crate::node::config::DEFAULT_SOCKET;
use crate::wire::client::{ClientRequest, ClientResponse, ClientResult};
use crate::wire::{ConnKind, FrameConn, Hello, RemoteError, WireError};
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach krgd at {path}: {source} (is krgd running? KRG_SOCKET selects another socket)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lost the connection to krgd: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("krgd answered with something unexpected")]
    Unexpected,
}

/// The socket named by KRG_SOCKET, or the default one.
pub fn socket_path() -> PathBuf {
    std::env::var_os("KRG_SOCKET")
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

pub struct Client {
    pub conn: FrameConn<UnixStream>,
}

impl Client {
    /// Connects and sends `first` right behind the greeting, without
    /// waiting for krgd's answer to it: a round trip less (0.8 ms of a
    /// `krg run true` here). A krgd that refuses the greeting says so in
    /// that answer and reads nothing further.
    pub async fn connect_with(path: &Path, first: &ClientRequest) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let mut conn = FrameConn::new(stream);
        conn.send(&Hello::new(ConnKind::Client)).await?;
        conn.send(first).await?;
        let ok: Result<(), RemoteError> = conn.recv().await?;
        ok?;
        Ok(Client { conn })
    }
}

/// Connects to the default socket and sends one request.
pub async fn request(req: ClientRequest) -> Result<ClientResponse, ClientError> {
    let mut client = Client::connect_with(&socket_path(), &req).await?;
    let resp: ClientResult = client.conn.recv().await?;
    Ok(resp?)
}
