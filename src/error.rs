//! The one place errors become responses.
//!
//! Every phase of the request path returns `Result<_, ProxyError>`; [`ProxyError::into_response`]
//! is the only function that turns an error into bytes on the wire, always as a `metav1.Status`
//! JSON body so kubectl prints it properly (docs/protocols.md §3.2). Messages are written for the
//! person at the terminal; authentication failures say only "Unauthorized" on the wire and keep
//! the detail for the log, so a probing client learns nothing about why its token failed.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::RelayBody;
pub use crate::net::UpstreamFailure;

/// Who is at fault: decides the log level and the metric label, never the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

/// Every way a request can fail inside the relay.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The detail is logged, never sent: a client learns only that its credential was refused.
    #[error("unauthorized: {0}")]
    Unauthorized(crate::auth::AuthError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("misdirected request: {0}")]
    Misdirected(String),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    #[error("request header fields too large")]
    HeaderTooLarge,
    #[error("too many requests: {message}")]
    TooManyRequests { message: String, retry_after: u64 },
    #[error("cluster {cluster}: upstream {}: {detail}", .failure.as_label())]
    Upstream {
        cluster: String,
        failure: UpstreamFailure,
        detail: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// 401 whose short `hint` *is* sent (unlike [`Unauthorized`](Self::Unauthorized)): Entra
    /// refused to exchange a valid token (MFA, expiry, revocation), so the user has to sign in
    /// again and must be told so. `detail` (Entra's description) stays in the log.
    #[error("sign in again: {hint}: {detail}")]
    SignInAgain { hint: String, detail: String },
    /// 503: the relay cannot get its upstream credential for `cluster` (Entra outage or
    /// timeout, unreadable token file). `detail` stays in the log.
    #[error("cluster {cluster}: upstream credential unavailable: {detail}")]
    CredentialUnavailable { cluster: String, detail: String },
    /// 503: `audit.mode: blocking` and the audit record cannot be written.
    #[error("audit log {sink} cannot be written")]
    AuditUnavailable { sink: String },
    /// 503: the cluster requires session recording and the recording store cannot be
    /// written, so the session is not started.
    #[error("recording store unavailable for cluster {cluster}")]
    RecordingUnavailable { cluster: String, detail: String },
    /// 401 with Entra's claims challenge: a rule would admit the request if the token carried
    /// the Conditional Access authentication context `auth_context` (step-up). `message` names
    /// the command that gets such a token.
    #[error("step-up required: authentication context {auth_context}")]
    StepUp {
        auth_context: String,
        message: String,
    },
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            Self::Upstream { .. } => Fault::Upstream,
            Self::Internal(_) => Fault::Internal,
            Self::CredentialUnavailable { .. } => Fault::Upstream,
            Self::AuditUnavailable { .. } => Fault::Internal,
            Self::RecordingUnavailable { .. } => Fault::Internal,
            _ => Fault::Client,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { failure, .. } => match failure {
                UpstreamFailure::ConnectRefused
                | UpstreamFailure::Tls
                | UpstreamFailure::Refused => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamFailure::ConnectTimeout | UpstreamFailure::ResponseTimeout => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                UpstreamFailure::Protocol | UpstreamFailure::UpgradeRejected => {
                    StatusCode::BAD_GATEWAY
                }
            },
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::SignInAgain { .. } => StatusCode::UNAUTHORIZED,
            Self::CredentialUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::StepUp { .. } => StatusCode::UNAUTHORIZED,
            Self::AuditUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RecordingUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `metav1.Status` reason kubectl shows in `Error from server (<Reason>)`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "BadRequest",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::NotFound(_) => "NotFound",
            // Kubernetes has no reason for 421; a distinct word tells users what to fix.
            Self::Misdirected(_) => "Misdirected",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::HeaderTooLarge => "RequestHeaderFieldsTooLarge",
            Self::TooManyRequests { .. } => "TooManyRequests",
            Self::Upstream { failure, .. } => match failure {
                UpstreamFailure::ConnectRefused
                | UpstreamFailure::Tls
                | UpstreamFailure::Refused => "ServiceUnavailable",
                UpstreamFailure::ConnectTimeout | UpstreamFailure::ResponseTimeout => "Timeout",
                UpstreamFailure::Protocol | UpstreamFailure::UpgradeRejected => "InternalError",
            },
            Self::Internal(_) => "InternalError",
            Self::SignInAgain { .. } => "Unauthorized",
            Self::CredentialUnavailable { .. } => "ServiceUnavailable",
            Self::StepUp { .. } => "Unauthorized",
            Self::AuditUnavailable { .. } => "ServiceUnavailable",
            Self::RecordingUnavailable { .. } => "ServiceUnavailable",
        }
    }

    /// The message sent to the client. Unauthorized and internal errors hide their detail.
    fn public_message(&self) -> String {
        match self {
            Self::Unauthorized(_) => "Unauthorized".to_owned(),
            Self::Internal(_) => "internal error in kube-relay".to_owned(),
            Self::TooManyRequests { message, .. } => message.clone(),
            Self::SignInAgain { hint, .. } => hint.clone(),
            Self::StepUp { message, .. } => message.clone(),
            Self::AuditUnavailable { sink } => format!(
                "kube-relay cannot write its audit log ({sink}) and audit.mode is blocking: requests are refused until records can be written again"
            ),
            // The store's location and error stay in the relay's log (Internal faults are
            // logged with their detail): a kubectl user needs the what, not the where.
            Self::RecordingUnavailable { cluster, .. } => format!(
                "cluster {cluster} requires session recording and the recording store cannot be written right now: the session was not started; try again later, or ask the relay's administrators (kube-relay doctor checks the store)"
            ),
            Self::CredentialUnavailable { cluster, .. } => format!(
                "cluster {cluster} is unavailable: kube-relay cannot get its credential for the cluster from Entra ID right now; try again in a minute"
            ),
            Self::Upstream {
                cluster, failure, ..
            } => match failure {
                UpstreamFailure::ConnectRefused => {
                    format!("cluster {cluster} is unavailable: kube-relay cannot connect to its API server")
                }
                UpstreamFailure::Tls => format!(
                    "cluster {cluster} is unavailable: TLS with its API server failed (check the cluster CA and server name)"
                ),
                UpstreamFailure::ConnectTimeout => {
                    format!("cluster {cluster}: timed out connecting to its API server")
                }
                UpstreamFailure::ResponseTimeout => {
                    format!("cluster {cluster}: its API server did not answer in time")
                }
                UpstreamFailure::Protocol => {
                    format!("cluster {cluster}: its API server sent an invalid response")
                }
                UpstreamFailure::UpgradeRejected => format!(
                    "cluster {cluster}: its API server answered the stream upgrade with a redirect or an invalid handshake"
                ),
                UpstreamFailure::Refused => format!(
                    "cluster {cluster} is unavailable: its API server refused the request without processing it (it is closing connections or overloaded); retry"
                ),
            },
            other => other.to_string(),
        }
    }

    /// Renders the error as a Status response. Called from exactly one place on the request path.
    pub fn into_response(self) -> Response<RelayBody> {
        let status = self.status();
        // client-go waits this long and sends the request again, on a 429 or a 5xx
        // (docs/protocols.md); the Status mirrors it in `details.retryAfterSeconds`.
        let retry_after = match &self {
            Self::TooManyRequests { retry_after, .. } => Some(*retry_after),
            // The cluster processed nothing, so the request may be sent again as it was.
            Self::Upstream {
                failure: UpstreamFailure::Refused,
                ..
            } => Some(1),
            _ => None,
        };
        let body = StatusBody {
            kind: "Status",
            api_version: "v1",
            metadata: EmptyObject {},
            status: "Failure",
            message: self.public_message(),
            reason: self.reason(),
            details: match &self {
                Self::Upstream { cluster, .. } | Self::CredentialUnavailable { cluster, .. } => {
                    Some(Details {
                        name: Some(cluster.clone()),
                        kind: Some("clusters"),
                        retry_after_seconds: retry_after,
                    })
                }
                Self::TooManyRequests { .. } => Some(Details {
                    name: None,
                    kind: None,
                    retry_after_seconds: retry_after,
                }),
                _ => None,
            },
            code: status.as_u16(),
        };
        // Serialising a struct of strings cannot fail; fall back to a fixed body anyway so this
        // function has no panic path.
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(crate::body::full(json));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::StepUp { auth_context, .. } = &self {
            // Entra's claims challenge (docs/protocols.md §2): the client asks the authority
            // for a token with this `claims` request and retries.
            let challenge = format!(
                "Bearer realm=\"kube-relay\", error=\"insufficient_claims\", claims=\"{}\"",
                crate::wire::login::step_up_claims_b64(auth_context)
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        } else if status == StatusCode::UNAUTHORIZED {
            // client-go re-runs its credential plugin on a 401; the challenge names the scheme.
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kube-relay\""),
            );
        }
        resp
    }
}

/// A `metav1.Status` failure body, for answers written outside the request path (the
/// framing check refuses before hyper parses a request).
pub fn status_json(code: u16, reason: &'static str, message: &str) -> Vec<u8> {
    let body = StatusBody {
        kind: "Status",
        api_version: "v1",
        metadata: EmptyObject {},
        status: "Failure",
        message: message.to_owned(),
        reason,
        details: None,
        code,
    };
    serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody {
    kind: &'static str,
    api_version: &'static str,
    metadata: EmptyObject,
    status: &'static str,
    message: String,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    code: u16,
}

#[derive(Serialize)]
struct EmptyObject {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    async fn body_json(resp: Response<RelayBody>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn unauthorized_is_status_with_challenge_and_no_detail() {
        let resp = ProxyError::Unauthorized(crate::auth::AuthError {
            failure: crate::auth::AuthFailure::Signature,
            detail: "signature mismatch for kid abc".into(),
        })
        .into_response();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let v = body_json(resp).await;
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "Unauthorized");
        assert_eq!(v["code"], 401);
        assert_eq!(v["message"], "Unauthorized");
        assert!(!v.to_string().contains("kid abc"));
    }

    #[tokio::test]
    async fn upstream_errors_name_the_cluster() {
        let resp = ProxyError::Upstream {
            cluster: "prod".into(),
            failure: UpstreamFailure::ConnectRefused,
            detail: "connection refused".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 503);
        let v = body_json(resp).await;
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["details"]["name"], "prod");
        assert!(v["message"].as_str().unwrap().contains("prod"));
    }

    /// A request the cluster refused unprocessed every time: 503 with `Retry-After`, so
    /// client-go sends it again by itself.
    #[tokio::test]
    async fn a_refused_request_is_503_with_retry_after() {
        let resp = ProxyError::Upstream {
            cluster: "prod".into(),
            failure: UpstreamFailure::Refused,
            detail: "h2 GOAWAY".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let v = body_json(resp).await;
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["details"]["name"], "prod");
        assert_eq!(v["details"]["retryAfterSeconds"], 1);
        assert!(!v.to_string().contains("GOAWAY"), "{v}");
    }

    #[tokio::test]
    async fn sign_in_again_sends_the_hint_and_a_challenge_but_not_the_detail() {
        let resp = ProxyError::SignInAgain {
            hint: "sign in again (kubelogin remove-tokens)".into(),
            detail: "AADSTS50076: MFA required".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
        let v = body_json(resp).await;
        assert_eq!(v["reason"], "Unauthorized");
        assert_eq!(v["message"], "sign in again (kubelogin remove-tokens)");
        assert!(!v.to_string().contains("AADSTS"));
    }

    #[tokio::test]
    async fn credential_unavailable_names_the_cluster_not_the_detail() {
        let resp = ProxyError::CredentialUnavailable {
            cluster: "prod".into(),
            detail: "token endpoint answered 500".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(
            ProxyError::CredentialUnavailable {
                cluster: "prod".into(),
                detail: String::new()
            }
            .fault(),
            Fault::Upstream
        );
        let v = body_json(resp).await;
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["details"]["name"], "prod");
        assert!(v["message"].as_str().unwrap().contains("prod"));
        assert!(!v.to_string().contains("answered 500"));
    }

    #[test]
    fn codes_match_reasons() {
        let cases = [
            (ProxyError::BadRequest("x".into()), 400, "BadRequest"),
            (ProxyError::Forbidden("x".into()), 403, "Forbidden"),
            (ProxyError::NotFound("x".into()), 404, "NotFound"),
            (ProxyError::Misdirected("x".into()), 421, "Misdirected"),
            (
                ProxyError::HeaderTooLarge,
                431,
                "RequestHeaderFieldsTooLarge",
            ),
            (
                ProxyError::Upstream {
                    cluster: "c".into(),
                    failure: UpstreamFailure::ResponseTimeout,
                    detail: String::new(),
                },
                504,
                "Timeout",
            ),
            (
                ProxyError::Upstream {
                    cluster: "c".into(),
                    failure: UpstreamFailure::Protocol,
                    detail: String::new(),
                },
                502,
                "InternalError",
            ),
        ];
        for (err, code, reason) in cases {
            assert_eq!(err.status().as_u16(), code);
            assert_eq!(err.reason(), reason);
        }
    }
}
