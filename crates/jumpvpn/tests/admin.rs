//! The admin API (SPEC §9) served on a real socket, with a fake gateway task behind its
//! channel that answers from an in-memory map and counts what reaches it; and `jumpvpn status`
//! against it, as a library call and as the binary.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use jumpvpn::admin::{serve, AdminError, AdminRequest, AdminState, SessionList, SessionView};
use jumpvpn::admin_client::{AdminClient, Response};
use jumpvpn::metrics::Metrics;
use jumpvpn::status;
use jumpvpn_core::record::{NewSession, SealedSecret, Termination};
use jumpvpn_core::{
    Binding, NodeId, OwnerEpoch, Policy, Proto, ReasonCode, SessionId, SessionRecord, SessionState,
    StateVersion, Timestamp, TransportId,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

const TOKEN: &str = "s3cret-admin-token";
/// The sealed secret of every test record: it must never appear in an answer.
const SECRET: &[u8] = b"SEALED-MASTER-SECRET-DO-NOT-SHOW";
const ATTACHED: &str = "00000000000000000000000000000a11";
const RECOVERING: &str = "00000000000000000000000000000b22";
const T0: u64 = 1_700_000_000_000;

fn sid(text: &str) -> SessionId {
    text.parse().expect("test session ids are well-formed")
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test addresses are well-formed")
}

/// An ATTACHED session with a UDP binding, and a RECOVERING one without.
fn records() -> BTreeMap<SessionId, SessionRecord> {
    let node = NodeId::new("gw1");
    let make = |id: &str, host: u8| {
        SessionRecord::birth(
            NewSession {
                session_id: sid(id),
                owner: node.clone(),
                client_key: [host; 32],
                tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, host)),
                policy: Policy::default().into(),
                secrets: SealedSecret::new(SECRET.to_vec()),
            },
            Timestamp(T0),
        )
    };
    let mut attached = make(ATTACHED, 2);
    attached.state = SessionState::Attached;
    attached.state_version = StateVersion(3);
    attached.owner_epoch = OwnerEpoch(1);
    attached.binding = Some(Binding {
        transport_id: TransportId(7),
        proto: Proto::Udp,
        client_addr: addr("192.0.2.7:40000"),
        gateway_addr: addr("198.51.100.1:51820"),
        bound_at_version: StateVersion(3),
    });
    attached.last_nonce = 424_242;

    let mut recovering = make(RECOVERING, 3);
    recovering.state = SessionState::Recovering;
    recovering.state_version = StateVersion(5);
    recovering.owner_epoch = OwnerEpoch(2);
    recovering.frozen = true;

    [attached, recovering]
        .into_iter()
        .map(|r| (r.session_id, r))
        .collect()
}

/// What reached the fake gateway.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    terminates: Mutex<Vec<(SessionId, String)>>,
}

/// An admin server on 127.0.0.1:0 and a fake gateway task, on their own runtime (so the tests
/// can use the blocking admin client, as the CLI does).
struct Harness {
    url: String,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    seen: Arc<Seen>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    runtime: tokio::runtime::Runtime,
}

impl Harness {
    fn start(token: Option<&str>) -> Self {
        Self::start_with(token, true)
    }

    /// `with_gateway = false`: the gateway's end of the channel is dropped at once.
    fn start_with(token: Option<&str>, with_gateway: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let node = NodeId::new("gw1");
        let metrics = Arc::new(Metrics::new(node.clone()));
        let ready = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (requests, inbox) = mpsc::channel(8);
        if with_gateway {
            runtime.spawn(fake_gateway(inbox, Arc::clone(&seen)));
        } else {
            drop(inbox);
        }
        let state = AdminState::new(
            requests,
            Arc::clone(&metrics),
            Arc::clone(&ready),
            token.map(str::to_owned),
            node,
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let local = listener.local_addr().expect("a local address");
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = runtime.spawn(serve(listener, state, async move {
            let _ = stop.await;
        }));
        Self {
            url: format!("http://{local}"),
            ready,
            metrics,
            seen,
            shutdown: Some(shutdown),
            server: Some(server),
            runtime,
        }
    }

    fn client(&self) -> AdminClient {
        AdminClient::new(&self.url).expect("the harness URL is valid")
    }

    fn authorized(&self, token: &str) -> AdminClient {
        self.client().with_token(token)
    }

    fn get(&self, path: &str) -> Response {
        self.client().get(path).expect("the admin server answers")
    }

    fn requests_seen(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    fn terminates_seen(&self) -> Vec<(SessionId, String)> {
        self.seen
            .terminates
            .lock()
            .expect("the fake gateway did not panic")
            .clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Graceful shutdown: `serve` returns once the signal fires.
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let outcome = self.runtime.block_on(server);
            if !std::thread::panicking() {
                outcome
                    .expect("the server task did not panic")
                    .expect("serve returned cleanly");
            }
        }
    }
}

/// The gateway side: answers from a map of records, as the real gateway will from its own.
async fn fake_gateway(mut inbox: mpsc::Receiver<AdminRequest>, seen: Arc<Seen>) {
    let mut sessions = records();
    while let Some(request) = inbox.recv().await {
        seen.requests.fetch_add(1, Ordering::SeqCst);
        match request {
            AdminRequest::ListSessions { reply } => {
                // Deliberately not in ID order: the server sorts.
                let list = sessions.values().rev().map(SessionView::from).collect();
                let _ = reply.send(list);
            }
            AdminRequest::GetSession { id, reply } => {
                let _ = reply.send(sessions.get(&id).map(SessionView::from));
            }
            AdminRequest::Terminate { id, reason, reply } => {
                seen.terminates
                    .lock()
                    .expect("no panic while holding the lock")
                    .push((id, reason));
                let answer = match sessions.get_mut(&id) {
                    None => Err(AdminError::NotFound(id)),
                    Some(r) if r.is_terminated() => Err(AdminError::AlreadyTerminated(id)),
                    Some(r) => {
                        r.state = SessionState::Terminated;
                        r.state_version = StateVersion(r.state_version.get() + 1);
                        r.binding = None;
                        r.termination = Some(Termination {
                            reason: ReasonCode::PolicyTermination,
                            at: Timestamp(T0 + 60_000),
                        });
                        Ok(SessionView::from(&*r))
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }
}

fn json_body(response: &Response) -> Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

fn error_of(response: &Response) -> String {
    json_body(response)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {}", response.text()))
        .to_owned()
}

/// Asserts that no representation of the sealed secret (or other internals) is in `text`.
fn assert_no_secrets(text: &str) {
    let secret = std::str::from_utf8(SECRET).expect("ASCII");
    let decimal: Vec<String> = SECRET.iter().map(u8::to_string).collect();
    let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    for leak in [
        secret.to_owned(),
        BASE64.encode(SECRET),
        hex,
        decimal[..6].join(","),
        "secrets".to_owned(),
        "last_nonce".to_owned(),
        "424242".to_owned(),
    ] {
        assert!(!text.contains(&leak), "{leak:?} appears in {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Health, readiness, metrics

#[test]
fn healthz_answers_ok_and_readyz_follows_the_ready_flag() {
    let h = Harness::start(Some(TOKEN));
    let health = h.get("/healthz");
    assert_eq!((health.status, health.text().trim()), (200, "ok"));

    let not_ready = h.get("/readyz");
    assert_eq!(not_ready.status, 503, "{}", not_ready.text());
    h.ready.store(true, Ordering::SeqCst);
    let ready = h.get("/readyz");
    assert_eq!((ready.status, ready.text().trim()), (200, "ready"));
    assert_eq!(
        h.requests_seen(),
        0,
        "health checks never bother the gateway"
    );
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    let h = Harness::start(Some(TOKEN));
    h.metrics.handshakes_total.add(5);
    h.metrics.sessions_active.set(2);
    h.metrics.reattach_rejected(ReasonCode::StaleVersion);
    let response = h.get("/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.text();
    assert!(
        text.contains("\njumpvpn_handshakes_total{node=\"gw1\"} 5\n"),
        "{text}"
    );
    assert!(
        text.contains("\njumpvpn_sessions_active{node=\"gw1\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\njumpvpn_reattach_rejected_total{node=\"gw1\",reason=\"STALE_VERSION\"} 1\n"
        ),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reading sessions

#[test]
fn list_shows_every_session_in_id_order_without_secrets() {
    let h = Harness::start(Some(TOKEN));
    let response = h.get("/v1/sessions");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_no_secrets(&response.text());
    let body = json_body(&response);
    assert_eq!(body["node"], "gw1");
    let sessions = body["sessions"].as_array().expect("a list");
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0]["session_id"], ATTACHED);
    assert_eq!(sessions[1]["session_id"], RECOVERING);

    assert_eq!(
        sessions[0],
        json!({
            "session_id": ATTACHED,
            "state": "ATTACHED",
            "state_version": 3,
            "owner": "gw1",
            "owner_epoch": 1,
            "frozen": false,
            "binding": {
                "transport_id": 7,
                "proto": "udp",
                "client_addr": "192.0.2.7:40000",
                "gateway_addr": "198.51.100.1:51820",
                "bound_at_version": 3,
            },
            "client_key": BASE64.encode([2u8; 32]),
            "tunnel_ip": "10.77.0.2",
            "created_ms": T0,
            "state_changed_ms": T0,
            "switches_total": 0,
            "termination": null,
        })
    );
    assert_eq!(sessions[1]["state"], "RECOVERING");
    assert_eq!(sessions[1]["binding"], Value::Null);
    assert_eq!(sessions[1]["frozen"], true);

    // The typed view reads it back.
    let list: SessionList = h.client().get_json("/v1/sessions").expect("a session list");
    assert_eq!(list.sessions.len(), 2);
    assert_eq!(h.requests_seen(), 2);
}

#[test]
fn get_shows_one_session_without_secrets() {
    let h = Harness::start(Some(TOKEN));
    let response = h.get(&format!("/v1/sessions/{RECOVERING}"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_no_secrets(&response.text());
    let view: SessionView = serde_json::from_slice(&response.body).expect("a session view");
    assert_eq!(view.session_id, sid(RECOVERING));
    assert_eq!(view.state, SessionState::Recovering);
    assert_eq!((view.state_version, view.owner_epoch), (5, 2));
    assert_eq!(view.binding, None);
}

#[test]
fn a_malformed_session_id_is_400_naming_it_and_an_unknown_one_404() {
    let h = Harness::start(Some(TOKEN));
    let bad = h.get("/v1/sessions/not-a-session");
    assert_eq!(bad.status, 400, "{}", bad.text());
    let message = error_of(&bad);
    assert!(message.contains("not-a-session"), "{message}");
    assert!(message.contains("session id"), "{message}");
    assert_eq!(
        h.requests_seen(),
        0,
        "a malformed id never reaches the gateway"
    );

    let unknown = "ffffffffffffffffffffffffffffffff";
    let missing = h.get(&format!("/v1/sessions/{unknown}"));
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert!(error_of(&missing).contains(unknown));

    let nowhere = h.get("/v2/nothing");
    assert_eq!(nowhere.status, 404);
    assert!(error_of(&nowhere).contains("/v2/nothing"));
}

// ---------------------------------------------------------------------------------------------
// Terminate and authorization

#[test]
fn terminate_needs_the_token_and_only_then_reaches_the_gateway_once() {
    let h = Harness::start(Some(TOKEN));
    let path = format!("/v1/sessions/{ATTACHED}/terminate");
    let body = json!({"reason": "abuse report 17"});

    let anonymous = h.client().post_json(&path, &body).expect("answers");
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    assert!(error_of(&anonymous).contains("token"));
    assert_eq!(
        h.requests_seen(),
        0,
        "an anonymous call reached the gateway"
    );

    let wrong = h
        .authorized("s3cret-admin-tokem")
        .post_json(&path, &body)
        .expect("answers");
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert!(!wrong.text().contains(TOKEN), "the answer shows the token");
    let prefix = h
        .authorized(&TOKEN[..TOKEN.len() - 1])
        .post_json(&path, &body)
        .expect("answers");
    assert_eq!(prefix.status, 401, "a prefix of the token was accepted");
    assert_eq!(h.requests_seen(), 0, "a wrong token reached the gateway");

    let done = h
        .authorized(TOKEN)
        .post_json(&path, &body)
        .expect("answers");
    assert_eq!(done.status, 200, "{}", done.text());
    let view: SessionView = serde_json::from_slice(&done.body).expect("a session view");
    assert_eq!(view.state, SessionState::Terminated);
    assert_eq!(view.state_version, 4);
    assert_eq!(
        json_body(&done)["termination"],
        json!({"reason": "POLICY_TERMINATION", "at_ms": T0 + 60_000})
    );
    assert_eq!(
        h.terminates_seen(),
        vec![(sid(ATTACHED), "abuse report 17".to_owned())]
    );
    assert_eq!(h.requests_seen(), 1);

    // Again: the gateway's refusal comes back as 409.
    let again = h
        .authorized(TOKEN)
        .post_json(&path, &json!({}))
        .expect("answers");
    assert_eq!(again.status, 409, "{}", again.text());
    assert!(error_of(&again).contains("already terminated"));
}

#[test]
fn terminate_checks_the_token_before_the_id_and_the_body() {
    let h = Harness::start(Some(TOKEN));
    let bad_id = h
        .client()
        .post_json("/v1/sessions/zzz/terminate", &json!({"reason": 1}))
        .expect("answers");
    assert_eq!(bad_id.status, 401, "{}", bad_id.text());

    let with_token = h.authorized(TOKEN);
    let bad_id = with_token
        .post_json("/v1/sessions/zzz/terminate", &json!({}))
        .expect("answers");
    assert_eq!(bad_id.status, 400);
    assert!(error_of(&bad_id).contains("zzz"));
    let bad_body = with_token
        .post_json(
            &format!("/v1/sessions/{ATTACHED}/terminate"),
            &json!({"reason": 1}),
        )
        .expect("answers");
    assert_eq!(bad_body.status, 400);
    assert!(
        error_of(&bad_body).contains("\"reason\""),
        "{}",
        bad_body.text()
    );
    assert_eq!(h.requests_seen(), 0);

    let unknown = with_token
        .post_json(
            "/v1/sessions/ffffffffffffffffffffffffffffffff/terminate",
            &json!({}),
        )
        .expect("answers");
    assert_eq!(unknown.status, 404, "{}", unknown.text());
}

#[test]
fn without_a_configured_token_mutating_calls_are_forbidden() {
    let h = Harness::start(None);
    let path = format!("/v1/sessions/{ATTACHED}/terminate");
    for client in [h.client(), h.authorized(TOKEN), h.authorized("")] {
        let response = client.post_json(&path, &json!({})).expect("answers");
        assert_eq!(response.status, 403, "{}", response.text());
        assert!(error_of(&response).contains("token_file"));
    }
    assert_eq!(h.requests_seen(), 0);
    // Reading needs no token.
    assert_eq!(h.get("/v1/sessions").status, 200);
}

#[test]
fn endpoints_not_built_yet_answer_501_after_authorization() {
    let h = Harness::start(Some(TOKEN));
    let posts = [
        (
            format!("/v1/sessions/{ATTACHED}/migrate"),
            json!({"to": "gw2"}),
        ),
        ("/v1/node/drain".to_owned(), json!({})),
        ("/v1/cluster/failover".to_owned(), json!({"from": "gw1"})),
    ];
    for (path, body) in &posts {
        let anonymous = h.client().post_json(path, body).expect("answers");
        assert_eq!(anonymous.status, 401, "{path}");
        let response = h.authorized(TOKEN).post_json(path, body).expect("answers");
        assert_eq!(response.status, 501, "{path}: {}", response.text());
        assert!(error_of(&response).contains("not implemented"));
    }
    assert_eq!(h.get("/v1/cluster").status, 501);
    assert_eq!(h.requests_seen(), 0);
}

#[test]
fn a_gateway_that_is_gone_is_503() {
    let h = Harness::start_with(Some(TOKEN), false);
    let response = h.get("/v1/sessions");
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(error_of(&response).contains("gateway"));
    // Health does not depend on the gateway task.
    assert_eq!(h.get("/healthz").status, 200);
}

// ---------------------------------------------------------------------------------------------
// jumpvpn status

#[test]
fn status_renders_a_table_of_the_sessions() {
    let h = Harness::start(Some(TOKEN));
    let list = status::fetch(&h.client()).expect("the list");
    let table = status::render_table(&list.sessions, T0 + 312_000);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "SESSION",
            "STATE",
            "VERSION",
            "EPOCH",
            "OWNER",
            "PROTO",
            "CLIENT",
            "TUNNEL_IP",
            "AGE"
        ]
    );
    let attached: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        attached,
        [
            ATTACHED,
            "ATTACHED",
            "3",
            "1",
            "gw1",
            "udp",
            "192.0.2.7:40000",
            "10.77.0.2",
            "5m12s"
        ]
    );
    let recovering: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        recovering,
        [
            RECOVERING,
            "RECOVERING*",
            "5",
            "2",
            "gw1",
            "-",
            "-",
            "10.77.0.3",
            "5m12s"
        ]
    );
    // Aligned, the last column to the right: every row is as wide as the header.
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
    assert!(!table.contains(" \n"), "trailing spaces: {table:?}");
}

#[test]
fn status_binary_prints_the_table_and_exits_0() {
    let h = Harness::start(Some(TOKEN));
    let out = Command::new(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(["status", "--admin", &h.url])
        .output()
        .expect("run jumpvpn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert!(stdout.starts_with("SESSION "), "{stdout}");
    for needle in [ATTACHED, "ATTACHED", RECOVERING, "RECOVERING*"] {
        assert!(stdout.contains(needle), "{needle} missing from {stdout}");
    }
}

#[test]
fn status_binary_names_the_unreachable_url_and_exits_2() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(["status", "--admin", &url])
        .output()
        .expect("run jumpvpn");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("jumpvpn: cannot reach admin API at {url}: ")),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(["status", "--admin", "https://127.0.0.1:51900"])
        .output()
        .expect("run jumpvpn");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid admin URL \"https://127.0.0.1:51900\""),
        "{stderr}"
    );
}
