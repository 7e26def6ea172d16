//! The request path's one error type: what went wrong with a request, whose side it is on,
//! and whether another origin may be tried. `respond` turns it into the answer a client gets
//! (status, message, whether the connection closes) from one table.
//!
//! Startup errors (a listener that cannot bind, a certificate that does not load) are
//! `crate::Error`; nothing here happens before the node serves.

use http::StatusCode;

use crate::origin;

/// Whose side a failure is on: the client's request, the origin's answer, or our own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Origin,
    Us,
}

/// Why a request was not answered from the cache or the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    // The client's request: framing, target, host, method.
    #[error("Content-Length and Transfer-Encoding together")]
    AmbiguousFraming,
    #[error("request loop: this request has already passed this node")]
    Loop,
    #[error("CONNECT is not supported")]
    Connect,
    #[error("the request target must be a path")]
    TargetNotPath,
    #[error("exactly one Host header is required")]
    HostCount,
    #[error("invalid Host")]
    InvalidHost,
    #[error("this host is not served here")]
    UnknownHost,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("a GET or HEAD request may not have a body")]
    BodyWithoutUse,
    #[error("invalid request target")]
    InvalidTarget,
    #[error("the path climbs above the root")]
    PathAboveRoot,
    #[error("encoded slashes are not accepted here")]
    EscapedSlash,
    #[error("invalid percent-encoding in the path")]
    BadPercentEncoding,
    #[error("malformed request body")]
    MalformedBody,
    #[error("request body too slow")]
    SlowBody,
    #[error("PURGE is not allowed from this address")]
    PurgeForbidden,
    #[error("not cached (only-if-cached)")]
    OnlyIfCached,
    #[error("precondition failed")]
    PreconditionFailed,
    #[error("range not satisfiable")]
    RangeNotSatisfiable,
    // Our own limits.
    #[error("too many requests from this client")]
    ClientRate,
    #[error("too many requests for this site")]
    SiteRate,
    #[error("every origin is at its connection limit")]
    OriginsBusy,
    // The origin.
    #[error("the origin did not answer in time")]
    OriginTimeout,
    #[error("the origin could not be reached")]
    OriginUnreachable,
    #[error("the origin failed to answer")]
    OriginFailed,
    #[error("the origin's response was cut off")]
    OriginCutOff,
    #[error("the stored response could not be revalidated")]
    NotRevalidated,
    /// The origin answered with this server error (a follower of a fill whose leader served
    /// stale in its place gets it when it has nothing to serve stale).
    #[error("the origin answered with an error")]
    OriginStatus(StatusCode),
}

impl ProxyError {
    /// The status a client gets. With [`ProxyError::closes`] and the message (`Display`),
    /// the one table `respond::error` answers from.
    pub(crate) fn status(self) -> StatusCode {
        use ProxyError::*;
        match self {
            AmbiguousFraming | TargetNotPath | HostCount | InvalidHost | BodyWithoutUse
            | InvalidTarget | PathAboveRoot | EscapedSlash | BadPercentEncoding | MalformedBody => {
                StatusCode::BAD_REQUEST
            }
            PurgeForbidden => StatusCode::FORBIDDEN,
            Connect | MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            SlowBody => StatusCode::REQUEST_TIMEOUT,
            PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            UnknownHost => StatusCode::MISDIRECTED_REQUEST,
            ClientRate | SiteRate => StatusCode::TOO_MANY_REQUESTS,
            OriginUnreachable | OriginFailed | OriginCutOff => StatusCode::BAD_GATEWAY,
            OriginsBusy => StatusCode::SERVICE_UNAVAILABLE,
            OnlyIfCached | OriginTimeout | NotRevalidated => StatusCode::GATEWAY_TIMEOUT,
            Loop => StatusCode::LOOP_DETECTED,
            OriginStatus(status) => status,
        }
    }

    /// Whether an HTTP/1 client is asked to close: the request's framing or target cannot
    /// be trusted (or a loop is cut), so nothing more should be read from the connection.
    pub(crate) fn closes(self) -> bool {
        use ProxyError::*;
        matches!(
            self,
            AmbiguousFraming
                | Loop
                | TargetNotPath
                | HostCount
                | InvalidHost
                | BodyWithoutUse
                | InvalidTarget
                | PathAboveRoot
                | EscapedSlash
                | BadPercentEncoding
                | MalformedBody
                | SlowBody
        )
    }

    /// Whose side the failure is on.
    pub(crate) fn side(self) -> Side {
        use ProxyError::*;
        match self {
            // A loop is a configuration that leads a site back to us.
            ClientRate | SiteRate | OriginsBusy | Loop => Side::Us,
            OriginTimeout | OriginUnreachable | OriginFailed | OriginCutOff | NotRevalidated
            | OriginStatus(_) => Side::Origin,
            _ => Side::Client,
        }
    }

    /// Whether the same request may go to another origin: nothing reached the origin (no
    /// connection, or every connection busy) or the connection broke before an answer. A
    /// request that timed out was received and maybe acted on; client errors would fail the
    /// same way anywhere.
    pub(crate) fn retryable(self) -> bool {
        matches!(
            self,
            ProxyError::OriginUnreachable | ProxyError::OriginsBusy | ProxyError::OriginFailed
        )
    }

    /// True when no origin could be reached at all (refused, reset, no address): the cache
    /// is disconnected, and RFC 9111 §4.2.4 lets it serve what it has stored.
    pub(crate) fn unreachable(self) -> bool {
        matches!(
            self,
            ProxyError::OriginUnreachable | ProxyError::OriginsBusy | ProxyError::OriginFailed
        )
    }
}

impl From<&origin::Error> for ProxyError {
    fn from(e: &origin::Error) -> ProxyError {
        match e {
            origin::Error::Timeout { .. } => ProxyError::OriginTimeout,
            origin::Error::Saturated { .. } => ProxyError::OriginsBusy,
            origin::Error::Connect { .. } => ProxyError::OriginUnreachable,
            origin::Error::Request { .. } | origin::Error::Dns(_) | origin::Error::Tls { .. } => {
                ProxyError::OriginFailed
            }
        }
    }
}

impl From<crate::proxy::path::PathError> for ProxyError {
    fn from(e: crate::proxy::path::PathError) -> ProxyError {
        use crate::proxy::path::PathError;
        match e {
            PathError::AboveRoot => ProxyError::PathAboveRoot,
            PathError::EscapedSlash => ProxyError::EscapedSlash,
            PathError::BadEncoding => ProxyError::BadPercentEncoding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ProxyError; 28] = {
        use ProxyError::*;
        [
            AmbiguousFraming,
            Loop,
            Connect,
            TargetNotPath,
            HostCount,
            InvalidHost,
            UnknownHost,
            MethodNotAllowed,
            BodyWithoutUse,
            InvalidTarget,
            PathAboveRoot,
            EscapedSlash,
            BadPercentEncoding,
            MalformedBody,
            SlowBody,
            PurgeForbidden,
            OnlyIfCached,
            PreconditionFailed,
            RangeNotSatisfiable,
            ClientRate,
            SiteRate,
            OriginsBusy,
            OriginTimeout,
            OriginUnreachable,
            OriginFailed,
            OriginCutOff,
            NotRevalidated,
            OriginStatus(StatusCode::INTERNAL_SERVER_ERROR),
        ]
    };

    #[test]
    fn client_errors_are_4xx_and_never_retried() {
        for e in ALL {
            let status = e.status();
            match e.side() {
                Side::Client if e != ProxyError::OnlyIfCached => {
                    assert!(status.is_client_error(), "{e:?}: {status}")
                }
                Side::Origin => assert!(status.is_server_error(), "{e:?}: {status}"),
                _ => {}
            }
            if e.side() == Side::Client {
                assert!(!e.retryable(), "{e:?}");
            }
        }
    }

    #[test]
    fn origin_failures_map_to_gateway_statuses() {
        assert_eq!(
            ProxyError::OriginTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ProxyError::OriginsBusy.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::OriginUnreachable.status(),
            StatusCode::BAD_GATEWAY
        );
        assert!(ProxyError::OriginUnreachable.retryable());
        assert!(!ProxyError::OriginTimeout.retryable());
        assert!(!ProxyError::OriginTimeout.unreachable());
    }
}
