//! The conformance suite against the embedded (redb) store, plus durability: restart
//! persistence and an acknowledged write surviving `kill -9`.

mod suite;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jumpvpn_core::{SessionId, StateVersion};
use jumpvpn_store::embedded::EmbeddedStore;
use jumpvpn_store::SessionStore;

conformance_tests!(store());

fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path().join("sessions.db")).expect("open");
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_share_commits() {
    let (_dir, s) = store();
    suite::racers_have_exactly_one_winner_per_version(&s, 16, 200).await;
    // Racing writers share commits: far fewer fsyncs than acknowledged writes.
    assert!(
        s.commits() < 16 * 200,
        "{} commits for 3200 requests",
        s.commits()
    );
}

#[tokio::test(start_paused = true)]
async fn liveness_expiry_is_seen_by_another_node() {
    let (_dir, a) = store();
    let b = a.clone();
    suite::liveness_expiry_is_seen_by_another_node(&a, &b, 1_000, || {
        tokio::time::advance(Duration::from_millis(1_001))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn failover_write_waits_for_the_owner_lease_to_expire() {
    let (_dir, s) = store();
    suite::failover_write_waits_for_the_owner_lease_to_expire(&s, 1_000, || {
        tokio::time::advance(Duration::from_millis(1_001))
    })
    .await;
}

#[tokio::test]
async fn closed_store_fails_closed_and_mutates_nothing() {
    let (_dir, s) = store();
    let (x, y) = (s.clone(), s.clone());
    suite::unavailable_store_fails_closed_and_mutates_nothing(
        &s,
        || async move { x.close() },
        || async move { y.reopen().expect("reopen") },
    )
    .await;
}

#[tokio::test]
async fn records_survive_a_restart_of_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sessions.db");
    let r = suite::record(0xfeed, "gw1");
    let r2 = suite::bumped(&r, 42);
    {
        let s = EmbeddedStore::open(&path).expect("open");
        s.create(&r).await.expect("create");
        s.compare_and_swap(StateVersion(1), &r2).await.expect("CAS");
        s.close();
    }
    let s = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(s.get(r.session_id).await.expect("get"), Some(r2));
    let listed = s.list_by_owner(&r.owner, None, 10).await.expect("list");
    assert_eq!(listed.len(), 1, "the owner index survives too");
}

#[tokio::test]
async fn an_unopenable_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-a-db");
    std::fs::write(&path, b"this is not a redb file, it is text").expect("write");
    let err = EmbeddedStore::open(&path)
        .err()
        .expect("opening garbage must fail");
    assert!(err.to_string().contains("not-a-db"), "{err}");
}

/// The session the crash writer advances, and the environment variable that makes this test
/// binary act as the writer.
const CRASH_SESSION: u128 = 0xdead_beef;
const CHILD_ENV: &str = "JUMPVPN_CRASH_WRITER_DB";

/// Run as a child: create the session, then CAS forever, printing each acknowledged version.
async fn crash_writer(path: &str) {
    let s = EmbeddedStore::open(path).expect("child open");
    let mut r = suite::record(CRASH_SESSION, "gw1");
    s.create(&r).await.expect("child create");
    let mut out = std::io::stdout().lock();
    loop {
        let next = suite::bumped(&r, r.state_version.get() + 1);
        s.compare_and_swap(r.state_version, &next)
            .await
            .expect("child CAS");
        r = next;
        // Printed only after the commit is durable.
        writeln!(out, "{}", r.state_version).expect("stdout");
        out.flush().expect("stdout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        crash_writer(&path).await;
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sessions.db");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "acknowledged_writes_survive_kill_9",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the writer");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < 300 {
        assert!(
            Instant::now() < deadline,
            "the writer acknowledged only {acked} writes"
        );
        match lines.next() {
            Some(Ok(line)) => {
                if let Ok(v) = line.trim().parse::<u64>() {
                    acked = v;
                }
            }
            other => panic!("the writer stopped early: {other:?}"),
        }
    }
    // SIGKILL: no destructor, no flush, no clean shutdown.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let s = EmbeddedStore::open(&path).expect("reopen after kill -9");
    let stored = s
        .get(SessionId::from_u128(CRASH_SESSION))
        .await
        .expect("the record decodes: no torn write")
        .expect("the session is present");
    assert!(
        stored.state_version.get() >= acked,
        "acknowledged version {acked} lost: the store has {}",
        stored.state_version
    );
    assert_eq!(
        stored.last_nonce,
        stored.state_version.get(),
        "the record is whole"
    );
}
