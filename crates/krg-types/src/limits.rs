//! Every bound on input that krg accepts, with its reason.

/// Largest frame on the node port or the client socket. Frames carry stream
/// chunks (at most `STREAM_CHUNK_BYTES_MAX`) or control messages; raft
/// snapshots are sent in chunks below this too.
pub const FRAME_BYTES_MAX: usize = 4 << 20;

/// Largest chunk of a job's stdio in one frame: big enough for throughput,
/// small enough that one job cannot hog a connection.
pub const STREAM_CHUNK_BYTES_MAX: usize = 128 << 10;

/// Bytes of stream data in flight between the execution node and the deputy
/// before the writer waits (back-pressure window).
pub const STREAM_WINDOW_BYTES: u64 = 1 << 20;

/// argv of a job, in bytes (Linux's own limit is about 2 MiB for argv+env).
pub const ARGV_BYTES_MAX: usize = 1 << 20;

/// Environment of a job, in bytes.
pub const ENV_BYTES_MAX: usize = 1 << 20;

/// Entries in a job's environment.
pub const ENV_ENTRIES_MAX: usize = 8192;

/// Host name, address and similar short strings from peers.
pub const SHORT_STRING_BYTES_MAX: usize = 256;

/// Join tokens alive at once (each is a record in the replicated state).
pub const JOIN_TOKENS_MAX: usize = 1024;

/// Longest join-token lifetime a user may ask for.
pub const JOIN_TOKEN_TTL_SECS_MAX: u64 = 7 * 24 * 3600;

/// Members of one cluster (node ids are 12 bits).
pub const NODES_MAX: usize = 4095;

/// Concurrent client connections a krgd serves on its Unix socket.
pub const CLIENT_CONNECTIONS_MAX: usize = 4096;

/// Concurrent peer connections a krgd accepts on its node port.
pub const PEER_CONNECTIONS_MAX: usize = 4096;

/// Time a peer or client has to send its first frame.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Jobs kept in the replicated job table, finished ones included.
pub const JOB_TABLE_MAX: usize = 100_000;

/// Largest raft snapshot a node takes from its leader (the replicated
/// state: nodes, tokens, images, policies; far below this).
pub const SNAPSHOT_BYTES_MAX: u64 = 256 << 20;
