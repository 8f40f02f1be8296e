//! The gRPC service: thin async shims over the state machine. Only Join
//! waits (for its group); Heartbeat, Leave, StageDone and ProcessExited
//! answer at once.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Shared;
use super::state::JoinResult;
use crate::proto;

pub(super) struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Service { shared }
    }
}

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for Service {
    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinReply>, Status> {
        let request = request.into_inner();
        let wait = (request.wait_ms > 0).then(|| Duration::from_millis(request.wait_ms.into()));
        let (seq, mut reply) = self.shared.update(|state, now| state.join(request, now))?;
        let answered: Option<JoinResult> = match wait {
            None => (&mut reply).await.ok(),
            Some(wait) => match tokio::time::timeout(wait, &mut reply).await {
                Ok(answered) => answered.ok(),
                Err(_) => {
                    if let Some(waiting_for) = self.shared.update(|state, _| state.withdraw(seq)) {
                        return Err(Status::deadline_exceeded(waiting_for));
                    }
                    // Answered (or superseded) while the wait ran out.
                    reply.try_recv().ok()
                }
            },
        };
        // If this call is cancelled, `reply` is dropped and the state sees a
        // closed channel: the worker no longer counts as joined.
        match answered {
            Some(Ok(reply)) => Ok(Response::new(reply)),
            Some(Err(status)) => Err(status),
            None => Err(Status::aborted(
                "this Join was superseded by a newer Join from the same worker",
            )),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let request = request.into_inner();
        let reply = self
            .shared
            .update(|state, now| state.heartbeat(request, now));
        Ok(Response::new(reply))
    }

    async fn leave(
        &self,
        request: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveReply>, Status> {
        let request = request.into_inner();
        self.shared.update(|state, now| state.leave(request, now));
        Ok(Response::new(proto::LeaveReply {}))
    }

    async fn stage_done(
        &self,
        request: Request<proto::StageDoneRequest>,
    ) -> Result<Response<proto::StageDoneReply>, Status> {
        let request = request.into_inner();
        let reply = self
            .shared
            .update(|state, now| state.stage_done(request, now))?;
        Ok(Response::new(reply))
    }

    async fn process_exited(
        &self,
        request: Request<proto::ProcessExitedRequest>,
    ) -> Result<Response<proto::ProcessExitedReply>, Status> {
        let request = request.into_inner();
        self.shared.update(|state, now| {
            state.process_exited(&request.host, request.pid, &request.what, now)
        });
        Ok(Response::new(proto::ProcessExitedReply {}))
    }
}
