//! The crate's one error type. Every variant names the peer (rank and the
//! address it listens on) or the operation at fault, because the reader of a
//! log line on one worker has to know which *other* worker to look at.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A member of the group as errors name it: its rank and the address it
/// listens on (the one the coordinator handed out, not an ephemeral port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} ({})", self.rank, self.addr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The arguments cannot form a group (rank out of range, missing address…).
    #[error("invalid group setup: {0}")]
    Setup(String),

    /// A call whose arguments are wrong on this rank alone.
    #[error("{op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },

    #[error("could not connect to {peer} within {waited:?}: {source}")]
    ConnectTimeout {
        peer: Peer,
        waited: Duration,
        #[source]
        source: io::Error,
    },

    #[error("no valid connection from {peer} within {waited:?} (listening on {local})")]
    AcceptTimeout {
        peer: Peer,
        local: SocketAddr,
        waited: Duration,
    },

    /// The peer answered the handshake and said no: a different job or
    /// session, protocol version, rank or world size. Retrying cannot help.
    #[error("{peer} refused the connection: {reason}")]
    Refused { peer: Peer, reason: String },

    /// The handshake's proofs did not match: the peer holds another
    /// generation's secret (a stale worker, or ranks handed different
    /// secrets), or it is not a member of the group at all. Retrying cannot
    /// help.
    #[error("authentication with {peer} failed: {detail}")]
    Unauthenticated { peer: Peer, detail: String },

    /// Nothing moved for a whole `io_timeout`: the peer hung, or the network
    /// between us did.
    #[error("{op} with {peer}: no progress for {timeout:?} (peer hung or network down)")]
    Timeout {
        op: &'static str,
        peer: Peer,
        timeout: Duration,
    },

    /// The peer closed or reset the connection: it exited, crashed, or gave up
    /// on the collective after an error of its own.
    #[error("{op} with {peer}: connection closed by the peer ({source})")]
    Closed {
        op: &'static str,
        peer: Peer,
        #[source]
        source: io::Error,
    },

    #[error("{op} with {peer}: {source}")]
    Io {
        op: &'static str,
        peer: Peer,
        #[source]
        source: io::Error,
    },

    /// The peer speaks our protocol but is running a different collective
    /// (another op, length, root or sequence number): a bug in the caller.
    #[error("{peer} is out of step: {detail}")]
    Mismatch { peer: Peer, detail: String },

    /// The rank's [`Interrupt`](crate::Interrupt) was flipped: the group
    /// is over (the coordinator dropped a member), whatever the links say.
    #[error("collective interrupted: {reason}")]
    Interrupted { reason: String },

    /// An earlier error broke the group; its members must re-form it.
    #[error("the group is broken by an earlier error ({first}); re-form it")]
    Broken { first: String },

    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),

    #[error("NCCL {op} on rank {rank}: {detail}")]
    Nccl {
        op: &'static str,
        rank: usize,
        detail: String,
    },

    #[error("CUDA {op}: {detail}")]
    Cuda { op: &'static str, detail: String },
}

impl Error {
    /// Classifies an I/O error on a link: a timeout or a closed connection
    /// are the two that callers (and the coordinator) act on differently.
    pub(crate) fn link(op: &'static str, peer: Peer, timeout: Duration, source: io::Error) -> Self {
        use io::ErrorKind::*;
        match source.kind() {
            WouldBlock | TimedOut => Error::Timeout { op, peer, timeout },
            // std's text for a short read_exact ("failed to fill whole
            // buffer") hides what happened.
            UnexpectedEof => Error::Closed {
                op,
                peer,
                source: io::Error::new(UnexpectedEof, "end of stream"),
            },
            ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                Error::Closed { op, peer, source }
            }
            _ => Error::Io { op, peer, source },
        }
    }
}
