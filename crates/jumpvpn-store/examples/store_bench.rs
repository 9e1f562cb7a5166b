//! Store benchmark: CAS throughput and latency per backend at 1, 16 and 64 concurrent writers
//! (each writer advances its own session, so every CAS is a real commit, not a conflict).
//! Figures and the command that reproduces them: docs/BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release -p jumpvpn-store --example store_bench -- [SECONDS] [BACKEND...]
//! ```
//! BACKEND is `memory`, `embedded`, `etcd` (this crate's etcd backend) or `etcd-raw` (plain
//! etcd-client transactions doing the same work: one compare-on-`mod_revision` transaction per
//! CAS with the revision known from the previous write, the fastest a hand-written client can
//! do it). Both etcd variants run against one 3-member etcd cluster started on loopback for the
//! run (the test harness: data on `/dev/shm`). Default: all four.

use std::time::{Duration, Instant};

use jumpvpn_core::{SessionRecord, StateVersion};
use jumpvpn_store::embedded::EmbeddedStore;
use jumpvpn_store::etcd::{EtcdStore, EtcdTimeouts};
use jumpvpn_store::memory::MemoryStore;
use jumpvpn_store::{codec, SessionStore};

#[path = "../tests/etcd_cluster/mod.rs"]
mod etcd_cluster;

const WRITERS: [u64; 3] = [1, 16, 64];

// The conformance suite's record (version 1, ATTACHED), so the bench writes what the tests do.
#[path = "../tests/suite/mod.rs"]
mod suite;

fn record(id: u128) -> SessionRecord {
    suite::record(id, "gw1")
}

/// One run's result.
struct Run {
    ops: u64,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
}

async fn run<S: SessionStore + Clone>(store: &S, writers: u64, seconds: f64, base: u128) -> Run {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = record(base + u128::from(w));
            store.create(&r).await.expect("create");
            let mut latencies = Vec::new();
            while Instant::now() < stop {
                let mut next = r.clone();
                next.state_version = StateVersion(r.state_version.get() + 1);
                let t = Instant::now();
                store
                    .compare_and_swap(r.state_version, &next)
                    .await
                    .expect("CAS");
                latencies.push(t.elapsed().as_nanos() as u64);
                r = next;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    summarise(all, start.elapsed())
}

/// Plain etcd-client: per writer one key, each CAS one transaction comparing the key's
/// `mod_revision` with the one its previous write produced, putting the encoded record.
async fn run_raw(endpoints: &[String], writers: u64, seconds: f64, base: u128) -> Run {
    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
    let client = Client::connect(endpoints, None).await.expect("connect");
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = record(base + u128::from(w));
            let key = format!("/bench-raw/{}", r.session_id);
            let put = client
                .put(key.as_str(), codec::encode(&r), None)
                .await
                .expect("put");
            let mut rev = put.header().map(|h| h.revision()).expect("revision");
            let mut latencies = Vec::new();
            while Instant::now() < stop {
                let mut next = r.clone();
                next.state_version = StateVersion(r.state_version.get() + 1);
                let t = Instant::now();
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key.as_str(), codec::encode(&next), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let answer = client.txn(txn).await.expect("txn");
                assert!(
                    answer.succeeded(),
                    "a single writer per key never conflicts"
                );
                rev = answer.header().map(|h| h.revision()).expect("revision");
                latencies.push(t.elapsed().as_nanos() as u64);
                r = next;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    summarise(all, start.elapsed())
}

/// Throughput and percentiles from every CAS latency (ns) of a run.
fn summarise(mut latencies: Vec<u64>, elapsed: Duration) -> Run {
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or(0) as f64 / 1_000.0
    };
    Run {
        ops: latencies.len() as u64,
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn print(backend: &str, writers: u64, r: &Run, extra: &str) {
    let rate = r.ops as f64 / r.elapsed.as_secs_f64();
    println!(
        "| {backend} | {writers} | {rate:>12.0} | {:>9.1} | {:>9.1} | {extra} |",
        r.p50_us, r.p99_us
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let seconds: f64 = match args.peek().and_then(|a| a.parse().ok()) {
        Some(s) => {
            args.next();
            s
        }
        None => 3.0,
    };
    let mut backends: Vec<String> = args.collect();
    if backends.is_empty() {
        backends = vec![
            "memory".into(),
            "embedded".into(),
            "etcd".into(),
            "etcd-raw".into(),
        ];
    }
    let cluster = if backends.iter().any(|b| b.starts_with("etcd")) {
        Some(etcd_cluster::Cluster::start(3).await)
    } else {
        None
    };
    println!("| backend | writers | CAS/s | p50 µs | p99 µs | notes |");
    println!("|---|---|---|---|---|---|");
    let mut base = 1u128 << 64;
    for backend in &backends {
        for writers in WRITERS {
            base += 1 << 32;
            match backend.as_str() {
                "memory" => {
                    let s = MemoryStore::new();
                    let r = run(&s, writers, seconds, base).await;
                    print("memory", writers, &r, "");
                }
                "embedded" => {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let s = EmbeddedStore::open(dir.path().join("bench.db")).expect("open");
                    let before = s.commits();
                    let r = run(&s, writers, seconds, base).await;
                    let fsyncs = (s.commits() - before) as f64 / r.elapsed.as_secs_f64();
                    let per = r.ops as f64 / (s.commits() - before).max(1) as f64;
                    print(
                        "embedded",
                        writers,
                        &r,
                        &format!("{fsyncs:.0} fsyncs/s, {per:.1} writes per fsync"),
                    );
                }
                "etcd" => {
                    let endpoints = cluster.as_ref().expect("cluster started").endpoints();
                    let s = EtcdStore::connect(&endpoints, "/bench/", EtcdTimeouts::default())
                        .await
                        .expect("connect");
                    let r = run(&s, writers, seconds, base).await;
                    print("etcd (jumpvpn-store)", writers, &r, "3 members");
                }
                "etcd-raw" => {
                    let endpoints = cluster.as_ref().expect("cluster started").endpoints();
                    let r = run_raw(&endpoints, writers, seconds, base).await;
                    print("etcd (raw etcd-client txn)", writers, &r, "3 members");
                }
                other => panic!("unknown backend {other:?}: memory, embedded, etcd or etcd-raw"),
            }
        }
    }
}
