//! The bearer token, and the status mapping of oversized messages.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` on every request it guards.
///
/// Both the expected and the presented token are hashed with SHA-256 and the digests
/// compared in constant time, so neither the content nor the length of the token leaks
/// through timing.
#[derive(Clone)]
pub struct Auth {
    digest: [u8; 32],
}

impl Auth {
    /// Refuses tokens shorter than 16 characters or with characters a header cannot carry.
    pub fn new(token: &str) -> Result<Auth, String> {
        if token.len() < 16 {
            return Err(format!(
                "the token has {} characters; at least 16 are required",
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Auth {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether a presented `authorization` header value carries the token.
    pub fn accepts(&self, header: &[u8]) -> bool {
        let presented = header.strip_prefix(b"Bearer ").unwrap_or(b"");
        let digest: [u8; 32] = Sha256::digest(presented).into();
        // An empty token never matches (the configured one has at least 16 characters).
        bool::from(digest.ct_eq(&self.digest)) && !presented.is_empty()
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get("authorization") {
            Some(v) if self.accepts(v.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token (metadata `authorization: Bearer <token>`)",
            )),
        }
    }
}

/// tonic answers a message over the size limit with OUT_OF_RANGE; the service reports it as
/// RESOURCE_EXHAUSTED (what gRPC's other implementations use), naming the limit.
#[derive(Clone)]
pub struct Oversize<S>(pub S);

impl<S: NamedService> NamedService for Oversize<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for Oversize<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            if headers.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11") {
                headers.insert("grpc-status", http::HeaderValue::from_static("8"));
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        let auth = Auth::new("0123456789abcdef-token").unwrap();
        assert!(auth.accepts(b"Bearer 0123456789abcdef-token"));
        assert!(!auth.accepts(b"Bearer 0123456789abcdef-tokeN"));
        assert!(!auth.accepts(b"Bearer 0123456789abcdef-token "));
        assert!(!auth.accepts(b"0123456789abcdef-token"));
        assert!(!auth.accepts(b"Bearer "));
        assert!(!auth.accepts(b""));
        assert!(Auth::new("short").is_err());
        assert!(Auth::new("has a space in the token").is_err());
    }
}
