//! How a worker's session travels: the token from `JoinResponse.session_token`
//! rides on every later call as gRPC metadata `authorization: Bearer <token>`.
//! [`SessionAuth`] adds it on the client; [`bearer_token`] reads it on the
//! server.

use std::sync::{Arc, RwLock};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key that carries the session (and, for operator calls, the
/// operator token).
pub const AUTHORIZATION: &str = "authorization";

/// The scheme in front of the token.
const BEARER: &str = "Bearer ";

/// The token of an `authorization: Bearer <token>` entry, if the request has
/// one.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get(AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix(BEARER)?.trim();
    (!token.is_empty()).then_some(token)
}

/// Puts `authorization: Bearer <token>` on `request`. Fails (INVALID_ARGUMENT)
/// only for a token that is not printable ASCII.
pub fn with_bearer<T>(mut request: Request<T>, token: &str) -> Result<Request<T>, Status> {
    request
        .metadata_mut()
        .insert(AUTHORIZATION, bearer_value(token)?);
    Ok(request)
}

fn bearer_value(token: &str) -> Result<AsciiMetadataValue, Status> {
    let mut value: AsciiMetadataValue = format!("{BEARER}{token}")
        .parse()
        .map_err(|_| Status::invalid_argument("a bearer token must be printable ASCII"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// A client interceptor that sends the current session token, shared by every
/// clone: [`SessionAuth::set`] after a join and each client built over the
/// same `SessionAuth` (a heartbeat task's, say) sends the new token.
#[derive(Clone, Default)]
pub struct SessionAuth {
    value: Arc<RwLock<Option<AsciiMetadataValue>>>,
}

impl std::fmt::Debug for SessionAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionAuth(..)")
    }
}

impl SessionAuth {
    /// Sends `token` from now on; an empty token (a coordinator that issues
    /// no sessions) sends nothing.
    pub fn set(&self, token: &str) -> Result<(), Status> {
        let value = if token.is_empty() {
            None
        } else {
            Some(bearer_value(token)?)
        };
        if let Ok(mut slot) = self.value.write() {
            *slot = value;
        }
        Ok(())
    }
}

impl Interceptor for SessionAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = self.value.read().ok().and_then(|slot| slot.clone());
        if let Some(value) = value {
            request.metadata_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_session_rides_on_every_request_of_every_clone() {
        let auth = SessionAuth::default();
        let mut clone = auth.clone();
        let request = clone.call(Request::new(())).unwrap();
        assert_eq!(bearer_token(request.metadata()), None);
        auth.set("abc123").unwrap();
        let request = clone.call(Request::new(())).unwrap();
        assert_eq!(bearer_token(request.metadata()), Some("abc123"));
        auth.set("").unwrap();
        let request = clone.call(Request::new(())).unwrap();
        assert_eq!(bearer_token(request.metadata()), None);
        assert!(auth.set("line\nbreak").is_err());
    }

    #[test]
    fn only_a_bearer_entry_is_a_token() {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(request.metadata()), None);
        let request = with_bearer(Request::new(()), "xyz").unwrap();
        assert_eq!(bearer_token(request.metadata()), Some("xyz"));
    }
}
