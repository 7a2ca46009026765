//! API errors: every failure is a JSON body `{"error": "...", "line"?, "column"?, ...}` with a
//! 4xx (or, for server faults, 5xx) status.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use netmap_core::{CoreError, StateError, StateErrorKind};
use serde_json::{json, Value};

/// Why a policy was rejected.
#[derive(Debug)]
pub struct PolicyRejection {
    /// What is wrong.
    pub message: String,
    /// Where (1-based line), when known.
    pub line: Option<u32>,
    /// Where (1-based column), when known.
    pub column: Option<u32>,
    /// JSON path of the offending element, when known.
    pub path: Option<String>,
    /// Failing tests, when tests failed.
    pub tests: Option<Value>,
}

/// An error answered to an API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The body is not valid JSON (with the position of the problem).
    #[error("{message}")]
    Json {
        /// What is wrong.
        message: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// The policy was rejected (syntax, validation, tailnet checks or failing tests).
    #[error("{}", .0.message)]
    Policy(Box<PolicyRejection>),
    /// No or an invalid API key.
    #[error("{0}")]
    Unauthorized(String),
    /// The key may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No such tailnet, node, user or route.
    #[error("{0}")]
    NotFound(String),
    /// Method not allowed on this path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than allowed.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The key's rate limit is exhausted.
    #[error("rate limit exceeded; retry later")]
    RateLimited(Duration),
    /// A per-key or per-client cap (requests in progress, streams, invalid-key attempts) is
    /// reached.
    #[error("{0}")]
    TooMany(String, Duration),
    /// The request body did not arrive in time.
    #[error("{0}")]
    BodyTimeout(String),
    /// The server is at a limit (concurrency, streams, write queue) or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A server-side fault (logged; details are not sent to clients).
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::Json { .. } | ApiError::Policy(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) | ApiError::TooMany(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut v = json!({ "error": self.to_string() });
        match self {
            ApiError::Json { line, column, .. } => {
                v["line"] = json!(line);
                v["column"] = json!(column);
            }
            ApiError::Policy(p) => {
                let PolicyRejection {
                    line,
                    column,
                    path,
                    tests,
                    ..
                } = &**p;
                if let Some(l) = line {
                    v["line"] = json!(l);
                }
                if let Some(c) = column {
                    v["column"] = json!(c);
                }
                if let Some(p) = path.as_deref().filter(|p| !p.is_empty()) {
                    v["path"] = json!(p);
                }
                if let Some(t) = tests {
                    v["tests"] = t.clone();
                }
            }
            _ => {}
        }
        v
    }

    /// From a JSON decoding error of a request body.
    pub fn from_json(e: &serde_json::Error) -> ApiError {
        ApiError::Json {
            message: format!("invalid JSON body: {e}"),
            line: e.line(),
            column: e.column(),
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        match e {
            CoreError::Policy(p) => {
                let pos = p.pos();
                ApiError::Policy(Box::new(PolicyRejection {
                    message: p.to_string(),
                    line: Some(pos.line),
                    column: Some(pos.column),
                    path: Some(p.path().to_string()),
                    tests: None,
                }))
            }
            CoreError::PolicyForTailnet(m) => ApiError::Policy(Box::new(PolicyRejection {
                message: m,
                line: None,
                column: None,
                path: None,
                tests: None,
            })),
            CoreError::TestsFailed(report) => {
                let failed: Vec<&netmap_core::TestOutcome> =
                    report.outcomes.iter().filter(|o| !o.passed).collect();
                let first = failed.first();
                let (line, column) = first
                    .and_then(|o| o.pos.split_once(':'))
                    .map(|(l, c)| (l.parse().ok(), c.parse().ok()))
                    .unwrap_or((None, None));
                let message = match first {
                    Some(o) => format!(
                        "policy tests failed ({} of {}): {o}",
                        failed.len(),
                        report.outcomes.len(),
                    ),
                    None => "policy tests failed".to_string(),
                };
                ApiError::Policy(Box::new(PolicyRejection {
                    message,
                    line,
                    column,
                    path: None,
                    tests: serde_json::to_value(&failed).ok(),
                }))
            }
            CoreError::State(m) => ApiError::BadRequest(m),
            CoreError::Invalid(e) => ApiError::from(e),
            CoreError::NotFound(m) => ApiError::NotFound(m),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        match e.kind {
            StateErrorKind::Conflict => ApiError::Conflict(e.to_string()),
            StateErrorKind::Invalid | StateErrorKind::Limit => ApiError::BadRequest(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        match &self {
            ApiError::RateLimited(wait) | ApiError::TooMany(_, wait) => {
                let secs = wait.as_secs() + 1;
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::Unauthorized(_) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body is not read: the connection cannot carry another request.
            ApiError::BodyTimeout(_) | ApiError::TooLarge(_) => {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}
