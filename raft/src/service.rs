//! The gRPC server side: openraft's RPCs and the `Forward` RPC, decoded and handed to the
//! local [`RaftNode`].

use std::sync::Arc;

use drplane_statemachine::codec::{decode, encode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use openraft::raft::AppendEntriesResponse;

use crate::election::PreVoteRequest;
use crate::forward::ForwardRequest;
use crate::node::RaftNode;
use crate::pb::raft_server::{Raft as RaftRpc, RaftServer};
use crate::pb::Blob;

pub struct RaftService {
    node: Arc<RaftNode>,
}

/// The tonic service to mount on this node's raft address.
pub fn raft_service(node: Arc<RaftNode>) -> RaftServer<RaftService> {
    RaftServer::new(RaftService { node })
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

fn decode_req<T: DeserializeOwned>(req: Request<Blob>) -> Result<T, Status> {
    decode(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
}

fn encode_resp<T: Serialize>(value: &T) -> Result<Response<Blob>, Status> {
    let data = encode(value).map_err(|e| Status::internal(format!("encode: {e}")))?;
    Ok(Response::new(Blob { data }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_req(request)?;
        let res = self.node.raft.append_entries(rpc).await;
        if matches!(&res, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.node.leader_contact();
        }
        encode_resp(&res)
    }

    async fn vote(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_req(request)?;
        let res = self.node.raft.vote(rpc).await;
        encode_resp(&res)
    }

    async fn install_snapshot(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_req(request)?;
        let res = self.node.raft.install_snapshot(rpc).await;
        if res.is_ok() {
            self.node.leader_contact();
        }
        encode_resp(&res)
    }

    async fn forward(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let req: ForwardRequest = decode_req(request)?;
        let res = self.node.handle_forward_from_peer(req).await;
        encode_resp(&res)
    }

    async fn pre_vote(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let req: PreVoteRequest = decode_req(request)?;
        encode_resp(&self.node.handle_pre_vote(&req))
    }
}
