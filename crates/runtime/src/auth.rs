//! The job token: every RPC carries it in metadata (`authorization: Bearer
//! <token>` or `x-dalle-token: <token>`), the coordinator checks it in a
//! tonic interceptor with a constant-time comparison. The token never
//! appears in logs, errors or `Debug` output.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::RuntimeError;

const TOKEN_HEADER: &str = "x-dalle-token";

/// The secret every RPC of a job carries. `Debug` shows `Token(<redacted>)`;
/// there is no `Display`.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// A token given by the user (config or environment): printable ASCII
    /// without spaces, so it can travel in a header.
    pub fn new(token: impl Into<String>) -> Result<Self, RuntimeError> {
        let token = token.into();
        if token.is_empty() {
            return Err(RuntimeError::Token("it is empty".into()));
        }
        if let Some(at) = token.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(RuntimeError::Token(format!(
                "character {} of {} is not printable ASCII (spaces and non-ASCII cannot travel in gRPC metadata)",
                at + 1,
                token.len()
            )));
        }
        Ok(Token(token.into()))
    }

    /// A fresh random token (128 bits, hex), for a job that was given none:
    /// `dalle launch` hands it to the workers it starts.
    pub fn random() -> Self {
        use rand::Rng;
        let bytes: [u8; 16] = rand::rng().random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Token(hex.into())
    }

    /// The secret itself, to hand to a worker (environment of a child
    /// process); never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A token kept in a file (its first line; surrounding whitespace is
    /// dropped), so that it shows neither in `ps` nor in shell history.
    pub fn from_file(path: &std::path::Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RuntimeError::Token(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        Token::new(text.lines().next().unwrap_or_default().trim()).map_err(|e| {
            RuntimeError::Token(format!("{} holds no usable token: {e}", path.display()))
        })
    }

    /// The token a command was given: from `file` when there is one (it wins
    /// over a value on the command line or in the environment), else
    /// `given`; `None` when neither is.
    pub fn given(
        file: Option<&std::path::Path>,
        given: Option<&str>,
    ) -> Result<Option<Self>, RuntimeError> {
        match (file, given) {
            (Some(file), _) => Token::from_file(file).map(Some),
            (None, Some(token)) => Token::new(token).map(Some),
            (None, None) => Ok(None),
        }
    }

    pub(crate) fn matches(&self, offered: &[u8]) -> bool {
        // Lengths may leak through timing; the bytes do not.
        self.0.as_bytes().ct_eq(offered).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The coordinator's interceptor: refuses a call whose token is missing or
/// wrong with `Unauthenticated`.
#[derive(Clone)]
pub(crate) struct CheckToken(pub(crate) Token);

impl Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match offered_token(request.metadata()) {
            None => Err(Status::unauthenticated(
                "missing job token: send it as `authorization: Bearer <token>` or `x-dalle-token: <token>` \
                 (the coordinator and every worker of a job share one token)",
            )),
            Some(offered) if self.0.matches(offered) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong job token: this worker belongs to another job or was given another token",
            )),
        }
    }
}

fn offered_token(metadata: &MetadataMap) -> Option<&[u8]> {
    if let Some(value) = metadata.get("authorization") {
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&value[scheme.len()..]);
        }
    }
    metadata.get(TOKEN_HEADER).map(|value| value.as_bytes())
}

/// The worker's interceptor: adds `authorization: Bearer <token>` to every
/// call, as a sensitive header (not indexed by HPACK, hidden by `Debug`).
#[derive(Clone)]
pub(crate) struct AttachToken(AsciiMetadataValue);

impl AttachToken {
    pub(crate) fn new(token: &Token) -> Self {
        let mut value: AsciiMetadataValue = format!("Bearer {}", token.expose())
            .parse()
            .expect("Token::new admits only printable ASCII");
        value.set_sensitive(true);
        AttachToken(value)
    }
}

impl fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AttachToken(<redacted>)")
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(token: &str, headers: &[(&'static str, &str)]) -> Result<(), Status> {
        let mut request = Request::new(());
        for (key, value) in headers {
            request.metadata_mut().insert(*key, value.parse().unwrap());
        }
        CheckToken(Token::new(token).unwrap())
            .call(request)
            .map(|_| ())
    }

    #[test]
    fn either_header_is_accepted_and_anything_else_refused() {
        assert!(check("s3cret", &[("authorization", "Bearer s3cret")]).is_ok());
        assert!(check("s3cret", &[("authorization", "bearer s3cret")]).is_ok());
        assert!(check("s3cret", &[("x-dalle-token", "s3cret")]).is_ok());
        let missing = check("s3cret", &[]).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("missing job token"));
        for wrong in ["s3cre", "s3cret2", "S3CRET", ""] {
            let err = check("s3cret", &[("x-dalle-token", wrong)]).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(err.message().contains("wrong job token"));
            assert!(!err.message().contains("s3cret"));
        }
        // A Basic credential is not a bearer token.
        let basic = check("s3cret", &[("authorization", "Basic s3cret")]).unwrap_err();
        assert!(basic.message().contains("missing job token"));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let token = Token::new("hunter2-very-secret").unwrap();
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        let attach = AttachToken::new(&token);
        assert!(!format!("{attach:?}").contains("hunter2"));
        let random = Token::random();
        assert_eq!(random.expose().len(), 32);
        assert_ne!(random.expose(), Token::random().expose());
    }

    #[test]
    fn tokens_that_cannot_travel_in_a_header_are_refused() {
        assert!(Token::new("").is_err());
        assert!(Token::new("has space").is_err());
        assert!(Token::new("naïve").is_err());
        assert!(Token::new("ok-Token_1.2~").is_ok());
    }
}
