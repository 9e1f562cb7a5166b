//! The admin API of SPEC §9: HTTP/JSON on `admin.listen`.
//!
//! ```text
//!   HTTP client ──▶ axum router ──(auth for mutating calls)──▶ AdminRequest ──mpsc──▶ gateway
//!                        ▲                                                              │
//!                        └──────────────── reply (oneshot) ◀────────────────────────────┘
//! ```
//!
//! The server never touches gateway state: it sends an [`AdminRequest`] down a channel to the
//! task that owns the sessions and waits (bounded by [`GATEWAY_TIMEOUT`]) for the answer. So an
//! admin call is serialised with the protocol's own events, and a slow or dead gateway shows
//! up as `503`, not as a hung admin server.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | `200 ok` while the process serves |
//! | `GET /readyz` | `200 ready` once the gateway says so, `503 not ready` before |
//! | `GET /metrics` | Prometheus text format ([`Metrics::render`]) |
//! | `GET /v1/sessions` | [`SessionList`]: the node and its sessions, by session ID |
//! | `GET /v1/sessions/{id}` | one [`SessionView`]; `400` for a malformed ID, `404` unknown |
//! | `POST /v1/sessions/{id}/terminate` | body `{"reason": "..."}`, optional; the [`SessionView`] |
//! | `POST /v1/sessions/{id}/migrate` | `501` for now |
//! | `POST /v1/node/drain` | `501` for now |
//! | `POST /v1/cluster/failover` | `501` for now |
//! | `GET /v1/cluster` | `501` for now |
//!
//! Errors are JSON: `{"error": "what went wrong"}`, with the status of [`AdminError::status`].
//!
//! Mutating calls (every `POST`) need `Authorization: Bearer <token>`, compared in constant
//! time. A missing or wrong token is `401` and the request never reaches the gateway. When no
//! token is configured (`admin.token_file` unset), mutating calls are refused with `403`:
//! read-only use needs no secret, but nothing can be changed without one.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use jumpvpn_core::{Binding, NodeId, ReasonCode, SessionId, SessionRecord, SessionState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::metrics::Metrics;

/// How long the admin server waits for the gateway to take and answer a request.
pub const GATEWAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest `reason` accepted by `terminate` (it goes to the logs).
const MAX_REASON_LEN: usize = 256;

/// A request from the admin server to the gateway task that owns the sessions.
#[derive(Debug)]
pub enum AdminRequest {
    /// Every session this node carries.
    ListSessions {
        /// Where to answer.
        reply: oneshot::Sender<Vec<SessionView>>,
    },
    /// One session, if this node has it.
    GetSession {
        /// Which.
        id: SessionId,
        /// Where to answer.
        reply: oneshot::Sender<Option<SessionView>>,
    },
    /// End a session (an operator's `POLICY_TERMINATION`).
    Terminate {
        /// Which.
        id: SessionId,
        /// The operator's words, for the logs; empty when none was given. The audit reason
        /// code is the gateway's to choose.
        reason: String,
        /// Where to answer: the session as terminated, or why not.
        reply: oneshot::Sender<Result<SessionView, AdminError>>,
    },
}

/// Why an admin call failed. Each variant maps to one HTTP status ([`AdminError::status`]);
/// the body is `{"error": "<Display>"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminError {
    /// No such session on this node: 404.
    NotFound(SessionId),
    /// The session has already ended: 409.
    AlreadyTerminated(SessionId),
    /// The request conflicts with the session's state or ownership: 409.
    Conflict(String),
    /// The store or the gateway cannot serve the request now: 503.
    Unavailable(String),
    /// The request is malformed; the message names the field: 400.
    BadRequest(String),
    /// A mutating call without the right bearer token: 401.
    Unauthorized,
    /// A mutating call while no admin token is configured: 403.
    NoTokenConfigured,
    /// The endpoint exists but is not built yet: 501.
    NotImplemented(&'static str),
    /// No such endpoint: 404.
    NoRoute(String),
}

impl AdminError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::NotFound(_) | AdminError::NoRoute(_) => StatusCode::NOT_FOUND,
            AdminError::AlreadyTerminated(_) | AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NoTokenConfigured => StatusCode::FORBIDDEN,
            AdminError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::NotFound(id) => write!(f, "no session {id} on this node"),
            AdminError::AlreadyTerminated(id) => write!(f, "session {id} is already terminated"),
            AdminError::Conflict(what) => write!(f, "conflict: {what}"),
            AdminError::Unavailable(what) => write!(f, "unavailable: {what}"),
            AdminError::BadRequest(what) => f.write_str(what),
            AdminError::Unauthorized => {
                f.write_str("missing or wrong admin token: send `Authorization: Bearer <token>`")
            }
            AdminError::NoTokenConfigured => f.write_str(
                "mutating admin calls are disabled: the gateway has no admin token \
                 (set admin.token_file)",
            ),
            AdminError::NotImplemented(what) => write!(f, "{what} is not implemented yet"),
            AdminError::NoRoute(what) => write!(f, "no such endpoint: {what}"),
        }
    }
}

impl std::error::Error for AdminError {}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// `GET /v1/sessions`: the sessions of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// The node that answered.
    pub node: NodeId,
    /// Its sessions, ordered by session ID.
    pub sessions: Vec<SessionView>,
}

/// A session record as the admin API shows it: everything an operator needs, no secrets (no
/// sealed master secret, no nonces, no policy internals).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// 32 lowercase hex characters.
    pub session_id: SessionId,
    /// The state of SPEC §3.
    pub state: SessionState,
    /// The record version.
    pub state_version: u64,
    /// The owner node.
    pub owner: NodeId,
    /// The ownership fencing token.
    pub owner_epoch: u64,
    /// Frozen for a migration.
    pub frozen: bool,
    /// The active transport, `null` when there is none.
    pub binding: Option<Binding>,
    /// The client's static public key, base64 (public, so safe to show).
    pub client_key: String,
    /// The client's address inside the tunnel.
    pub tunnel_ip: IpAddr,
    /// Birth, in ms since the Unix epoch.
    pub created_ms: u64,
    /// Last change of state, in ms since the Unix epoch.
    pub state_changed_ms: u64,
    /// Accepted transport switches over the session's life.
    pub switches_total: u64,
    /// Why and when the session ended, `null` while it lives.
    pub termination: Option<TerminationView>,
}

/// Why and when a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminationView {
    /// The reason code.
    pub reason: ReasonCode,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
}

impl From<&SessionRecord> for SessionView {
    fn from(record: &SessionRecord) -> Self {
        Self {
            session_id: record.session_id,
            state: record.state,
            state_version: record.state_version.get(),
            owner: record.owner.clone(),
            owner_epoch: record.owner_epoch.get(),
            frozen: record.frozen,
            binding: record.binding,
            client_key: BASE64.encode(record.client_key),
            tunnel_ip: record.tunnel_ip,
            created_ms: record.timestamps.created.as_millis(),
            state_changed_ms: record.timestamps.state_changed.as_millis(),
            switches_total: record.switches.total(),
            termination: record.termination.map(|t| TerminationView {
                reason: t.reason,
                at_ms: t.at.as_millis(),
            }),
        }
    }
}

/// What the admin server needs: the way to the gateway, the metrics, readiness and the token.
#[derive(Clone)]
pub struct AdminState {
    requests: mpsc::Sender<AdminRequest>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    token: Option<Arc<Zeroizing<String>>>,
    node: NodeId,
}

impl AdminState {
    /// `token` is the bearer token for mutating calls; `None` (or an empty token) disables
    /// them (`403`). `ready` is what `/readyz` reports.
    pub fn new(
        requests: mpsc::Sender<AdminRequest>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
        token: Option<String>,
        node: NodeId,
    ) -> Self {
        Self {
            requests,
            metrics,
            ready,
            token: token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::new(Zeroizing::new(t))),
            node,
        }
    }
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("node", &self.node)
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Reads an admin token file (`admin.token_file`): its content without surrounding
/// whitespace. The error names the file and never shows its content.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read admin token file {}", path.display()))?,
    );
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("admin token file {} is empty", path.display());
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        anyhow::bail!(
            "admin token file {} holds characters that cannot go in an HTTP header \
             (use printable ASCII without spaces)",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// The admin API's routes over `state`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/terminate", post(terminate))
        .route("/v1/sessions/{id}/migrate", post(migrate))
        .route("/v1/node/drain", post(drain))
        .route("/v1/cluster/failover", post(failover))
        .route("/v1/cluster", get(cluster))
        .fallback(no_route)
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` completes, then finishes the requests
/// in flight and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn list_sessions(State(state): State<AdminState>) -> Result<Json<SessionList>, AdminError> {
    let mut sessions = ask(&state, |reply| AdminRequest::ListSessions { reply }).await?;
    sessions.sort_by_key(|s| s.session_id);
    Ok(Json(SessionList {
        node: state.node.clone(),
        sessions,
    }))
}

async fn get_session(
    State(state): State<AdminState>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Json<SessionView>, AdminError> {
    let id = session_id(id)?;
    ask(&state, |reply| AdminRequest::GetSession { id, reply })
        .await?
        .map(Json)
        .ok_or(AdminError::NotFound(id))
}

async fn terminate(
    State(state): State<AdminState>,
    headers: HeaderMap,
    id: Result<UrlPath<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<SessionView>, AdminError> {
    authorize(&state, &headers)?;
    let id = session_id(id)?;
    let reason = terminate_reason(&body)?;
    tracing::info!(session = %id, reason = %reason, "admin: terminate requested");
    let view = ask(&state, |reply| AdminRequest::Terminate {
        id,
        reason,
        reply,
    })
    .await??;
    Ok(Json(view))
}

async fn migrate(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<SessionView>, AdminError> {
    authorize(&state, &headers)?;
    Err(AdminError::NotImplemented("session migration"))
}

async fn drain(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<SessionList>, AdminError> {
    authorize(&state, &headers)?;
    Err(AdminError::NotImplemented("node drain"))
}

async fn failover(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<SessionList>, AdminError> {
    authorize(&state, &headers)?;
    Err(AdminError::NotImplemented("cluster failover"))
}

async fn cluster() -> AdminError {
    AdminError::NotImplemented("the cluster view")
}

async fn no_route(method: Method, uri: Uri) -> AdminError {
    // Only the path: a query string might carry something that should not be echoed.
    AdminError::NoRoute(format!("{method} {}", uri.path()))
}

/// Checks the bearer token of a mutating call, before anything else is looked at.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(expected) = &state.token else {
        return Err(AdminError::NoTokenConfigured);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer(value.as_bytes()));
    match given {
        Some(given) if constant_time_eq(given, expected.as_bytes()) => Ok(()),
        _ => {
            tracing::warn!("admin: mutating call refused: missing or wrong token");
            Err(AdminError::Unauthorized)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Compares in time that depends only on the expected token's length, not on where the
/// first difference is.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// The `{id}` of the path, or a 400 that names it.
fn session_id(path: Result<UrlPath<String>, PathRejection>) -> Result<SessionId, AdminError> {
    let UrlPath(text) =
        path.map_err(|e| AdminError::BadRequest(format!("invalid session id in path: {e}")))?;
    text.parse()
        .map_err(|e| AdminError::BadRequest(format!("path: {e}")))
}

/// The `reason` of a terminate body: empty or absent body, or `{"reason": "..."}`.
fn terminate_reason(body: &[u8]) -> Result<String, AdminError> {
    if body.trim_ascii().is_empty() {
        return Ok(String::new());
    }
    let bad = |what: String| AdminError::BadRequest(format!("body: {what}"));
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err(bad(
            r#"expected a JSON object such as {"reason": "..."}"#.to_owned()
        ));
    };
    let reason = match fields.remove("reason") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(text)) => text,
        Some(_) => return Err(bad("field \"reason\" must be a string".to_owned())),
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(format!(
            "unknown field {unknown:?} (expected only \"reason\")"
        )));
    }
    if reason.len() > MAX_REASON_LEN {
        return Err(bad(format!(
            "field \"reason\" is longer than {MAX_REASON_LEN} bytes"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(bad("field \"reason\" holds control characters".to_owned()));
    }
    Ok(reason)
}

/// Sends a request to the gateway and waits for its answer, at most [`GATEWAY_TIMEOUT`].
async fn ask<T>(
    state: &AdminState,
    request: impl FnOnce(oneshot::Sender<T>) -> AdminRequest,
) -> Result<T, AdminError> {
    let (reply, answer) = oneshot::channel();
    let exchange = async {
        state
            .requests
            .send(request(reply))
            .await
            .map_err(|_| AdminError::Unavailable("the gateway is not running".to_owned()))?;
        answer
            .await
            .map_err(|_| AdminError::Unavailable("the gateway dropped the request".to_owned()))
    };
    tokio::time::timeout(GATEWAY_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AdminError::Unavailable(format!(
                "the gateway did not answer within {} s",
                GATEWAY_TIMEOUT.as_secs()
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_takes_the_token_of_a_case_insensitive_scheme() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn constant_time_eq_needs_equal_length_and_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret\0", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn terminate_reason_names_the_bad_field() {
        assert_eq!(terminate_reason(b""), Ok(String::new()));
        assert_eq!(terminate_reason(b"{}"), Ok(String::new()));
        assert_eq!(
            terminate_reason(br#"{"reason": "abuse"}"#),
            Ok("abuse".to_owned())
        );
        let err = terminate_reason(br#"{"reason": 5}"#).expect_err("a number is refused");
        assert!(err.to_string().contains("\"reason\""), "{err}");
        let err = terminate_reason(br#"{"why": "x"}"#).expect_err("unknown field");
        assert!(err.to_string().contains("\"why\""), "{err}");
        assert!(terminate_reason(b"[1]").is_err());
        assert!(terminate_reason(b"{").is_err());
    }

    #[test]
    fn token_files_are_trimmed_and_errors_name_the_file_not_the_content() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "  tok-123\n").expect("writable");
        assert_eq!(read_token_file(&path).expect("reads"), "tok-123");

        for bad in ["\n", "two words-secretish\n"] {
            std::fs::write(&path, bad).expect("writable");
            let message = format!("{:#}", read_token_file(&path).expect_err(bad));
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(!message.contains("secretish"), "{message}");
        }
        let missing = dir.path().join("missing.token");
        let message = format!("{:#}", read_token_file(&missing).expect_err("missing"));
        assert!(message.contains("missing.token"), "{message}");
    }

    #[test]
    fn debug_of_the_state_hides_the_token() {
        let (tx, _rx) = mpsc::channel(1);
        let state = AdminState::new(
            tx,
            Arc::new(Metrics::new(NodeId::new("gw1"))),
            Arc::new(AtomicBool::new(false)),
            Some("hunter2-token".to_owned()),
            NodeId::new("gw1"),
        );
        let debug = format!("{state:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }
}
