//! Core benchmarks: one accepted transition, one data replay-window check, and `audit verify`
//! throughput. Figures and the command that reproduces them: docs/BENCHMARKS.md.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jumpvpn_core::audit::check::{verify, Source};
use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::replay::{ReplayWindow, Verdict};
use jumpvpn_core::{NodeId, Policy, ReasonCode, SessionRecord, Timestamp};

// The fixtures of the core's tests: T0, candidate, birth, commit.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{birth, candidate, commit, T0};

fn session(id: u128, node: &NodeId) -> SessionRecord {
    commit(
        &birth(id, node, Policy::default(), T0),
        SessionEvent::HandshakeOk {
            candidate: candidate(1),
        },
        node,
        T0,
    )
}

/// One accepted transition: SPEC §4 validation, the new record, and its audit events.
fn transition(c: &mut Criterion) {
    let node = NodeId::new("gw1");
    let recovering = commit(&session(1, &node), SessionEvent::TransportDead, &node, T0);
    let attempt = SessionEvent::Reattach(ReattachAttempt {
        nonce: 1,
        known_version: recovering.state_version,
        candidate: candidate(2),
        proof: ProofVerdict::Valid,
    });
    let ctx = Context {
        now: T0.plus(800),
        node: &node,
    };
    let mut group = c.benchmark_group("transition");
    group.throughput(Throughput::Elements(1));
    group.bench_function("reattach_accepted", |b| {
        b.iter(|| {
            let outcome = apply(black_box(&recovering), black_box(&attempt), &ctx);
            debug_assert!(matches!(outcome, Outcome::Commit(_)));
            outcome
        });
    });
    let attached = session(2, &node);
    group.bench_function("transport_dead", |b| {
        b.iter(|| apply(black_box(&attached), &SessionEvent::TransportDead, &ctx));
    });
    group.finish();
}

/// One data-plane replay-window check (window 8192).
fn replay_window(c: &mut Criterion) {
    let mut group = c.benchmark_group("replay_window");
    group.throughput(Throughput::Elements(1));
    group.bench_function("in_order", |b| {
        let mut w = ReplayWindow::new(8192).expect("8192 is a valid window");
        let mut counter = 0u64;
        b.iter(|| {
            let verdict = w.check_and_update(black_box(counter));
            counter += 1;
            verdict
        });
    });
    group.bench_function("reordered", |b| {
        // A fixed permutation of 0..4096 (xorshift-driven Fisher-Yates): every counter is
        // fresh and arrives less than one window behind the highest.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut perm: Vec<u64> = (0..4096).collect();
        for i in (1..perm.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            perm.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut w = ReplayWindow::new(8192).expect("8192 is a valid window");
        let (mut base, mut i) = (0u64, 0usize);
        b.iter(|| {
            let verdict = w.check_and_update(black_box(base + perm[i]));
            debug_assert_eq!(verdict, Verdict::Fresh);
            i += 1;
            if i == perm.len() {
                i = 0;
                base += 4096;
            }
            verdict
        });
    });
    group.finish();
}

/// A realistic two-node stream made by the state machine itself: sessions created on gw1,
/// switching transports, migrated to gw2, reattached there, and terminated.
fn two_node_stream(sessions: u128) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let gw1 = NodeId::new("gw1");
    let gw2 = NodeId::new("gw2");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut push = |events: Vec<jumpvpn_core::AuditEvent>| {
        for e in events {
            let line = e.to_json_line().into_bytes();
            if e.node_id == gw1 {
                a.push(line)
            } else {
                b.push(line)
            }
        }
    };
    for id in 1..=sessions {
        let mut now = T0.plus(id as u64);
        let mut step =
            |rec: &SessionRecord, ev: SessionEvent, node: &NodeId, now: Timestamp| match apply(
                rec,
                &ev,
                &Context { now, node },
            ) {
                Outcome::Commit(c) => {
                    push(c.events);
                    c.record
                }
                other => panic!("not committed: {other:?}"),
            };
        let birth = birth(id, &gw1, Policy::default(), now);
        let mut rec = step(
            &birth,
            SessionEvent::HandshakeOk {
                candidate: candidate(1),
            },
            &gw1,
            now,
        );
        for n in 1..=3u64 {
            now = now.plus(1_000);
            rec = step(&rec, SessionEvent::TransportDead, &gw1, now);
            now = now.plus(1_000);
            let ev = SessionEvent::Reattach(ReattachAttempt {
                nonce: n,
                known_version: rec.state_version,
                candidate: candidate(n + 1),
                proof: ProofVerdict::Valid,
            });
            rec = step(&rec, ev, &gw1, now);
        }
        rec = step(
            &rec,
            SessionEvent::Freeze {
                reason: ReasonCode::Migration,
            },
            &gw1,
            now,
        );
        let to = SessionEvent::Transfer {
            to: gw2.clone(),
            reason: ReasonCode::Migration,
        };
        rec = step(&rec, to, &gw1, now);
        now = now.plus(100);
        let ev = SessionEvent::Reattach(ReattachAttempt {
            nonce: 10,
            known_version: rec.state_version,
            candidate: candidate(9),
            proof: ProofVerdict::Valid,
        });
        rec = step(&rec, ev, &gw2, now);
        let _ = step(
            &rec,
            SessionEvent::Terminate {
                reason: ReasonCode::PolicyTermination,
            },
            &gw2,
            now,
        );
    }
    (a, b)
}

/// `audit verify` throughput: parse, merge two streams, check every invariant.
fn audit_verify(c: &mut Criterion) {
    let (a, b) = two_node_stream(2_000);
    let events = (a.len() + b.len()) as u64;
    let mut group = c.benchmark_group("audit_verify");
    group.throughput(Throughput::Elements(events));
    group.sample_size(10);
    group.bench_function("two_nodes", |bench| {
        bench.iter_batched(
            || (a.clone(), b.clone()),
            |(a, b)| {
                let sources = vec![
                    Source {
                        name: "gw1.jsonl".to_owned(),
                        lines: a.into_iter().map(Ok::<_, Infallible>),
                    },
                    Source {
                        name: "gw2.jsonl".to_owned(),
                        lines: b.into_iter().map(Ok::<_, Infallible>),
                    },
                ];
                let mut violations = 0u64;
                let summary = verify(sources, |_| violations += 1).expect("in-memory sources");
                assert_eq!(violations, 0);
                summary
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, transition, replay_window, audit_verify);
criterion_main!(benches);
