//! A raw gRPC client for the service tests that behaves like one worker:
//! after [`Client::remember`] every call carries the session token of its
//! last join (`authorization: Bearer <token>`), as `cohort-worker` does.

use std::ops::{Deref, DerefMut};

use cohort_proto::session::SessionAuth;
use cohort_proto::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Grpc = CoordinatorClient<InterceptedService<Channel, SessionAuth>>;

pub struct Client {
    grpc: Grpc,
    session: SessionAuth,
    token: String,
}

impl Client {
    pub async fn connect(addr: &str) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client::over(channel)
    }

    /// A client over an existing channel (a TLS one, say).
    pub fn over(channel: Channel) -> Client {
        let session = SessionAuth::default();
        Client {
            grpc: CoordinatorClient::with_interceptor(channel, session.clone()),
            session,
            token: String::new(),
        }
    }

    /// Sends the session of `response` from now on.
    pub fn remember(&mut self, response: &pb::JoinResponse) {
        self.use_session(&response.session_token);
    }

    /// Sends `token` as the session from now on (to impersonate, or to test
    /// a bad token).
    pub fn use_session(&mut self, token: &str) {
        self.session.set(token).unwrap();
        self.token = token.to_string();
    }

    /// The session token this client sends (for a hand-built request).
    #[allow(dead_code)]
    pub fn session_token(&self) -> &str {
        &self.token
    }
}

impl Deref for Client {
    type Target = Grpc;

    fn deref(&self) -> &Grpc {
        &self.grpc
    }
}

impl DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Grpc {
        &mut self.grpc
    }
}
