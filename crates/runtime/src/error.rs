//! The crate's one error type. Every variant names the coordinator, worker
//! or address at fault; none carries the job token.

use std::net::SocketAddr;
use std::time::Duration;

/// Errors of the coordinator and of the worker's client.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A coordinator setting or a name that makes no sense.
    /// TLS material that cannot be read or used, or a TLS handshake that
    /// failed (names the file or the coordinator).
    #[error("TLS: {0}")]
    Tls(String),

    #[error("invalid runtime config: {0}")]
    Config(String),
    /// A job token that cannot travel in gRPC metadata.
    #[error("invalid job token: {0}")]
    Token(String),
    /// The coordinator or its status page cannot listen.
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        /// What was to listen: "coordinator" or "status page".
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A tokio runtime could not be built.
    #[error("cannot start a tokio runtime for the {what}: {source}")]
    Runtime {
        /// Whose runtime: "coordinator" or "worker membership".
        what: &'static str,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator's URL cannot be used.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The coordinator answered a call with an error that retrying cannot
    /// fix: wrong or missing token, another protocol version, the job ended.
    #[error("coordinator {coordinator} refused {rpc} ({code:?}): {message}")]
    Refused {
        /// The coordinator's URL.
        coordinator: String,
        /// The call: "Join", "Heartbeat", "Leave" or "StageDone".
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The coordinator's explanation.
        message: String,
    },
    /// No group formed (or the coordinator could not be reached) before the
    /// worker's deadline.
    #[error("no group formed at coordinator {coordinator} within {waited:?}: {detail}")]
    JoinTimeout {
        /// The coordinator's URL.
        coordinator: String,
        /// How long the worker tried.
        waited: Duration,
        /// What the coordinator was waiting for, or the last connection error.
        detail: String,
    },
    /// A call other than Join could not reach the coordinator.
    #[error("coordinator {coordinator} unreachable for {rpc}: {detail}")]
    Unreachable {
        /// The coordinator's URL.
        coordinator: String,
        /// The call.
        rpc: &'static str,
        /// The transport's or status' explanation.
        detail: String,
    },
    /// The job failed for good (see the reason).
    #[error("the job failed: {0}")]
    JobFailed(String),
    /// More failures than `max_restarts` allows.
    #[error(
        "restart budget exhausted: {max_restarts} restart(s) allowed (max_restarts), then {cause}"
    )]
    RestartBudgetExhausted {
        /// The budget.
        max_restarts: u32,
        /// The failure that found it spent.
        cause: String,
    },
    /// The coordinator was shut down before the job ended.
    #[error("the coordinator at {0} was shut down before the job ended")]
    Shutdown(SocketAddr),
}

impl RuntimeError {
    /// The gRPC status code of a refusal, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            RuntimeError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The call belonged to a generation that is over (the group re-formed
    /// meanwhile): join the new one rather than fail.
    pub fn is_generation_over(&self) -> bool {
        self.code() == Some(tonic::Code::Aborted)
    }
}
