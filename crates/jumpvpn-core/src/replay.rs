//! Anti-replay: the control-plane nonce rule and the data-plane sliding window (RFC 6479 style).
//!
//! The control plane needs one integer per session: a nonce is fresh only when strictly greater
//! than the last accepted one ([`control_nonce_is_fresh`]). The data plane tolerates reordering,
//! so it keeps a window instead, described below.
//!
//! Every data packet carries a 64-bit counter. The receiver accepts each counter at most once and
//! only while it is within `W` packets of the highest counter accepted so far, where `W` is
//! [`ReplayWindow::window_size`]. This module holds the sliding bitmap that answers that question
//! in constant time and bounded memory.
//!
//! # Ring of blocks
//!
//! The bitmap is a ring of `N` 64-bit blocks. Counter `c` belongs to the (conceptually unbounded)
//! block number `c >> 6`, which lives in ring slot `(c >> 6) % N`, at bit `c & 63`. The ring
//! holds the block that contains the highest counter and the `N - 1` block numbers just below it.
//! When a newer counter moves the highest counter into a later block, only the slots of the
//! blocks that were passed over are zeroed; a jump of `N` blocks or more simply zeroes the whole
//! ring. Nothing is ever shifted, so accepting a new highest counter costs at most `N` word
//! writes however far it jumps, and in-order traffic usually touches a single word.
//!
//! # Why the window is exact
//!
//! The requested size is rounded up to a multiple of 64, giving `W`, and the ring has
//! `N = W / 64 + 1` blocks. With highest counter `h`, the counters that must be remembered are
//! the `W` consecutive values `h - W + 1 ..= h`. Because they can start at any bit offset, they
//! span at most `W / 64 + 1 = N` block numbers, so each of them has its own live slot: none is
//! evicted while still inside the window and no two of them alias. The one extra block is what
//! makes this hold at every alignment of `h`; without it the usable window would shrink to
//! anywhere between `W - 63` and `W` depending on `h % 64`.
//!
//! The lowest live block may also hold bits of counters that are already outside the window.
//! Those bits are never consulted: a counter with `h - c >= W` is rejected as
//! [`Verdict::TooOld`] by arithmetic before the bitmap is read. So the accepted range is exactly
//! `W` packets behind `h`, independent of how `h` is aligned.
//!
//! # The bitmap only when it holds something
//!
//! A gateway holds a window per session, and most sessions are idle most of the time: the ring
//! (`8 * N` bytes, 1,032 for the default 8,192 packets) is therefore allocated only while it
//! remembers something besides `h` itself. Without a ring, the window knows that `h` was
//! accepted and that no other counter within `W` of it was. That is the state of a window that
//! has accepted one counter, and of one whose every counter came `W` or more above the previous
//! (control packets mostly do: their counters follow the sender's clock in units of 2^-20 ms).
//! The ring is allocated, with `h`'s bit set, by the first counter accepted within `W` of `h`,
//! above or below it, and dropped when a counter `W` or more above `h` expires all it held. The
//! verdicts are exactly those of a window that always kept its ring.
//!
//! # Compaction
//!
//! [`ReplayWindow::compact`] drops the ring of a window that went idle and keeps only `h`: from
//! then on every counter at or below that `h` is refused, `h` as [`Verdict::Replayed`] and the
//! others as [`Verdict::TooOld`], whether or not they were seen. Counters above it are judged as
//! before. This only ever refuses more, never accepts a replay: a counter a compacted window
//! accepts is above every counter it accepted before compaction, and the uncompacted window fed
//! the same packets would have accepted it too. What is lost is a packet that was still in
//! flight, out of order, when the window was compacted; the caller compacts only after a
//! silence far longer than any reordering.
//!
//! # Verdicts
//!
//! With `W = window_size()`, `h` the highest accepted counter and `f` the highest counter at
//! the last compaction (none if never compacted):
//!
//! * nothing accepted yet, or `c > h`: [`Verdict::Fresh`];
//! * `h - c >= W`: [`Verdict::TooOld`], whether or not `c` was accepted before (the window no
//!   longer remembers it);
//! * `c < f`: [`Verdict::TooOld`] likewise (compaction forgot it);
//! * otherwise [`Verdict::Replayed`] if `c` was accepted before, else [`Verdict::Fresh`].
//!
//! Counter `0` is a valid first counter and every value up to and including `u64::MAX` works;
//! no computation can overflow.

use core::fmt;

/// SPEC §6 `control_replay`: a control nonce is fresh only when strictly greater than the last
/// accepted one.
pub const fn control_nonce_is_fresh(last_accepted: u64, nonce: u64) -> bool {
    nonce > last_accepted
}

/// Bits per bitmap block.
const BLOCK_BITS: u64 = 64;
/// `log2(BLOCK_BITS)`: shifting a counter right by this gives its block number.
const BLOCK_SHIFT: u32 = BLOCK_BITS.trailing_zeros();
/// Mask selecting a counter's bit position inside its block.
const BIT_MASK: u64 = BLOCK_BITS - 1;

/// Data-plane anti-replay window (RFC 6479): remembers which of the last
/// [`window_size`](Self::window_size) counters below the highest accepted one have been seen,
/// in bounded memory and constant time per packet.
///
/// Typical use: [`check`](Self::check) the counter of a received packet, authenticate the
/// packet, then [`update`](Self::update) the window; or use
/// [`check_and_update`](Self::check_and_update) when the packet is already authenticated.
/// [`compact`](Self::compact) an idle window to give its memory back.
#[derive(Clone)]
pub struct ReplayWindow {
    /// The bitmap, while it remembers a counter other than `highest` (module documentation,
    /// "The bitmap only when it holds something"). `None`: no counter within the window other
    /// than `highest` was accepted at or above `floor`.
    ring: Option<Ring>,
    /// Effective window `W`: a multiple of 64 in `MIN_SIZE..=MAX_SIZE`.
    window: u64,
    /// Highest counter accepted so far, `None` until the first one.
    highest: Option<u64>,
    /// Counters below this are refused whatever the bitmap says: the highest counter at the
    /// last compaction, 0 if never compacted. Never above `highest`.
    floor: u64,
}

/// The ring of bitmap blocks. Invariant: its length is `window / 64 + 1`, which is between 33
/// and 16385, so it is never zero and always fits in a `u64`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ring(Box<[u64]>);

impl ReplayWindow {
    /// Smallest window allowed.
    pub const MIN_SIZE: u64 = 2048;
    /// Largest window allowed (2^20 packets, about 128 KiB of bitmap).
    pub const MAX_SIZE: u64 = 1 << 20;

    /// Creates an empty window covering `size` packets. Allocates nothing: the bitmap comes
    /// with the first counter that needs it.
    ///
    /// `size` must be in `MIN_SIZE..=MAX_SIZE`, otherwise a [`WindowSizeError`] is returned. It is
    /// rounded up to a multiple of 64 (so `2049` becomes `2112`), and the bitmap has
    /// `size / 64 + 1` blocks so that the effective window is exactly
    /// [`window_size`](Self::window_size) packets at every alignment (see the module
    /// documentation).
    ///
    /// # Errors
    ///
    /// [`WindowSizeError`] if `size` is below `MIN_SIZE` or above `MAX_SIZE`.
    pub fn new(size: u64) -> Result<Self, WindowSizeError> {
        if !(Self::MIN_SIZE..=Self::MAX_SIZE).contains(&size) {
            return Err(WindowSizeError { size });
        }
        // size <= 2^20, so rounding up to a multiple of 64 cannot overflow, and the result
        // stays <= 2^20 because 2^20 is itself a multiple of 64.
        let window = size.div_ceil(BLOCK_BITS) * BLOCK_BITS;
        Ok(Self {
            ring: None,
            window,
            highest: None,
            floor: 0,
        })
    }

    /// The exact number of packets behind the highest counter that are still accepted: the
    /// requested size rounded up to a multiple of 64.
    ///
    /// A counter `c <= highest` can be [`Verdict::Fresh`] only if `highest - c < window_size()`.
    #[must_use]
    pub fn window_size(&self) -> u64 {
        self.window
    }

    /// The highest counter accepted so far, or `None` if no counter has been accepted.
    #[must_use]
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Whether the bitmap is currently allocated (`8 * (window_size() / 64 + 1)` bytes).
    #[must_use]
    pub fn holds_bitmap(&self) -> bool {
        self.ring.is_some()
    }

    /// Drops the bitmap and refuses, from now on, every counter at or below the highest one
    /// accepted so far (see the module documentation, "Compaction"). For a window that has
    /// seen no packet for a long time; it never makes a replay acceptable. Does nothing to a
    /// window that has accepted nothing.
    pub fn compact(&mut self) {
        if let Some(highest) = self.highest {
            self.ring = None;
            self.floor = highest;
        }
    }

    /// Checks `counter` and, if it is fresh, marks it seen.
    ///
    /// Returns [`Verdict::Fresh`] if the packet must be accepted (the window now remembers it),
    /// and [`Verdict::Replayed`] or [`Verdict::TooOld`] if it must be dropped (the window is left
    /// unchanged). O(1): the only loop clears at most the ring's block count.
    #[inline]
    #[must_use = "a packet whose verdict is not Fresh must be dropped"]
    pub fn check_and_update(&mut self, counter: u64) -> Verdict {
        self.update(counter)
    }

    /// Checks `counter` without marking it, so a packet can be authenticated first and then
    /// committed with [`update`](Self::update).
    ///
    /// Never changes the window. A `Fresh` verdict from `check` is only a prediction: another
    /// packet with the same counter may be committed in between, which `update` detects.
    #[inline]
    #[must_use = "a packet whose verdict is not Fresh must be dropped"]
    pub fn check(&self, counter: u64) -> Verdict {
        let Some(highest) = self.highest else {
            // Nothing accepted yet: every counter, including 0, is fresh.
            return Verdict::Fresh;
        };
        if counter > highest {
            return Verdict::Fresh;
        }
        // counter <= highest, so the subtraction cannot underflow.
        if highest - counter >= self.window || counter < self.floor {
            return Verdict::TooOld;
        }
        if counter == highest {
            return Verdict::Replayed;
        }
        match &self.ring {
            Some(ring) if ring.is_marked(counter) => Verdict::Replayed,
            Some(_) => Verdict::Fresh,
            // Without a ring nothing in the window but `highest` was accepted.
            None => Verdict::Fresh,
        }
    }

    /// Marks `counter` seen; call only after [`check`](Self::check) returned [`Verdict::Fresh`]
    /// and the packet authenticated. Same result as [`check_and_update`](Self::check_and_update):
    /// it re-checks, so a counter committed twice is reported [`Verdict::Replayed`] the second
    /// time and the window only changes when the result is [`Verdict::Fresh`].
    #[inline]
    pub fn update(&mut self, counter: u64) -> Verdict {
        let verdict = self.check(counter);
        if verdict != Verdict::Fresh {
            return verdict;
        }
        let Some(highest) = self.highest else {
            // The first counter: remembered as `highest` alone, no ring needed yet.
            self.highest = Some(counter);
            return verdict;
        };
        if counter > highest && counter - highest >= self.window {
            // Everything remembered so far is now out of the window: only the new highest
            // remains, which needs no ring, and the floor is below the window too.
            self.ring = None;
            self.floor = 0;
            self.highest = Some(counter);
            return verdict;
        }
        // `counter` is within the window of `highest`, above or below it: a ring is needed.
        let ring = match self.ring.as_mut() {
            Some(ring) => {
                if counter > highest {
                    ring.advance(highest, counter);
                }
                ring
            }
            None => self.ring.insert(Ring::remembering(self.window, highest)),
        };
        ring.mark(counter);
        if counter > highest {
            self.highest = Some(counter);
        }
        verdict
    }
}

impl Ring {
    /// A ring for window `window`, in which only `highest` is marked.
    fn remembering(window: u64, highest: u64) -> Self {
        // window <= 2^20, so the block count fits in a usize on every supported target.
        let count = usize::try_from(window / BLOCK_BITS + 1).unwrap_or(usize::MAX);
        let mut ring = Self(vec![0; count].into_boxed_slice());
        ring.mark(highest);
        ring
    }

    /// Sets `counter`'s bit.
    fn mark(&mut self, counter: u64) {
        if let Some(block) = self.slot(counter).and_then(|slot| self.0.get_mut(slot)) {
            *block |= 1 << (counter & BIT_MASK);
        }
    }

    /// Whether `counter`'s bit is set. Only meaningful for counters inside the window.
    /// Fails closed (reports "seen") in the unreachable case of an empty ring.
    fn is_marked(&self, counter: u64) -> bool {
        self.slot(counter)
            .and_then(|slot| self.0.get(slot))
            .is_none_or(|block| block & (1 << (counter & BIT_MASK)) != 0)
    }

    /// Ring slot holding `counter`'s block: `(counter >> 6) % N`.
    ///
    /// Always `Some(slot)` with `slot < N`: the ring is never empty (see the type's invariant)
    /// and a remainder modulo a `usize` length converts back to `usize` losslessly.
    fn slot(&self, counter: u64) -> Option<usize> {
        let len = u64::try_from(self.0.len()).ok()?;
        let slot = (counter >> BLOCK_SHIFT).checked_rem(len)?;
        usize::try_from(slot).ok()
    }

    /// Moves the window forward from `highest` to the larger `counter`, zeroing the slots of
    /// every block number in `(highest >> 6, counter >> 6]` so that none of them keeps bits of
    /// the counters that used to live in the same slot one ring length earlier.
    fn advance(&mut self, highest: u64, counter: u64) {
        // counter > highest, so the new block number is >= the old one: no underflow.
        let passed = (counter >> BLOCK_SHIFT) - (highest >> BLOCK_SHIFT);
        if passed == 0 {
            return;
        }
        let len = self.0.len();
        let (Ok(passed), Some(mut slot)) = (usize::try_from(passed), self.slot(highest)) else {
            // More blocks passed than fit in a usize: certainly at least a whole ring.
            self.0.fill(0);
            return;
        };
        if passed >= len {
            // Every live block is expired: forget everything. Bounded by the block count.
            self.0.fill(0);
            return;
        }
        // passed < len: clear the `passed` slots following the old highest block, wrapping
        // around the ring. `slot` stays < len, so every `get_mut` succeeds.
        for _ in 0..passed {
            slot = if slot + 1 >= len { 0 } else { slot + 1 };
            if let Some(block) = self.0.get_mut(slot) {
                *block = 0;
            }
        }
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("window_size", &self.window)
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

/// Outcome of checking a packet counter against a [`ReplayWindow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never accepted before and not too old: accept the packet.
    Fresh,
    /// Already accepted and still inside the window: drop the packet.
    Replayed,
    /// `window_size()` or more below the highest accepted counter, or below the highest
    /// counter at the last [`compact`](ReplayWindow::compact): drop the packet, whether or not
    /// it was seen before.
    TooOld,
}

/// Error returned by [`ReplayWindow::new`] for a size outside
/// [`MIN_SIZE`](ReplayWindow::MIN_SIZE)`..=`[`MAX_SIZE`](ReplayWindow::MAX_SIZE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSizeError {
    /// The rejected size, in packets.
    pub size: u64,
}

impl fmt::Display for WindowSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replay window of {} packets: expected {} to {}",
            self.size,
            ReplayWindow::MIN_SIZE,
            ReplayWindow::MAX_SIZE
        )
    }
}

impl std::error::Error for WindowSizeError {}

#[cfg(test)]
mod tests {
    use super::{ReplayWindow, Verdict, WindowSizeError};
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::collections::BTreeSet;

    /// Builds a window of a size the test knows to be valid.
    fn window(size: u64) -> ReplayWindow {
        match ReplayWindow::new(size) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        }
    }

    /// Accepts every counter in order, asserting each one is fresh.
    fn accept_all(w: &mut ReplayWindow, counters: impl IntoIterator<Item = u64>) {
        for c in counters {
            assert_eq!(w.check_and_update(c), Verdict::Fresh, "counter {c}");
        }
    }

    /// The obviously-correct reference: every accepted counter plus the highest one, and the
    /// highest counter at the last compaction.
    struct Model {
        window: u64,
        accepted: BTreeSet<u64>,
        highest: Option<u64>,
        compacted_at: Option<u64>,
    }

    impl Model {
        fn new(window: u64) -> Self {
            Self {
                window,
                accepted: BTreeSet::new(),
                highest: None,
                compacted_at: None,
            }
        }

        fn check(&self, c: u64) -> Verdict {
            if let Some(h) = self.highest {
                if c <= h && h - c >= self.window {
                    return Verdict::TooOld;
                }
            }
            // A compacted window refuses everything at or below the highest counter it had
            // then: that one as a replay, the others as forgotten.
            match self.compacted_at {
                Some(f) if c < f => return Verdict::TooOld,
                Some(f) if c == f => return Verdict::Replayed,
                _ => {}
            }
            if self.accepted.contains(&c) {
                Verdict::Replayed
            } else {
                Verdict::Fresh
            }
        }

        fn compact(&mut self) {
            if self.highest.is_some() {
                self.compacted_at = self.highest;
            }
        }

        fn update(&mut self, c: u64) -> Verdict {
            let v = self.check(c);
            if v == Verdict::Fresh {
                self.accepted.insert(c);
                self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            }
            v
        }
    }

    /// Feeds `counters` to a window and to the model, comparing every verdict. `modes` picks,
    /// per step, `check_and_update` (0), `check` then `update` (1), `check` alone as if
    /// authentication failed (2), or `compact` then `check_and_update` (3); missing modes
    /// default to 0. Finally compares `check` for every counter from just over a window below
    /// the highest to just above it.
    ///
    /// Whatever the modes, also checks the two safety properties of compaction against a
    /// reference that is never compacted and is fed the same counters: the window never
    /// accepts a counter it accepted before, and accepts nothing the reference refuses.
    fn run_against_model(size: u64, counters: &[u64], modes: &[u8]) -> Result<(), TestCaseError> {
        let mut w = window(size);
        let mut m = Model::new(w.window_size());
        let mut uncompacted = Model::new(w.window_size());
        let modes = modes.iter().copied().chain(std::iter::repeat(0));
        for (step, (&c, mode)) in counters.iter().zip(modes).enumerate() {
            if mode == 3 {
                w.compact();
                m.compact();
                prop_assert!(
                    !w.holds_bitmap(),
                    "step {} compacted but holds its bitmap",
                    step
                );
            }
            let expected = m.check(c);
            let was_accepted = m.accepted.contains(&c);
            // The reference commits what authenticated (every mode but 2), by its own verdict.
            let reference = if mode == 2 {
                uncompacted.check(c)
            } else {
                uncompacted.update(c)
            };
            match mode {
                0 | 3 => {
                    let got = w.check_and_update(c);
                    prop_assert_eq!(got, expected, "step {} check_and_update({})", step, c);
                    m.update(c);
                }
                1 => {
                    let got = w.check(c);
                    prop_assert_eq!(got, expected, "step {} check({})", step, c);
                    if got == Verdict::Fresh {
                        prop_assert_eq!(w.update(c), Verdict::Fresh, "step {} update({})", step, c);
                        m.update(c);
                        // Committing the same counter again must now be refused.
                        prop_assert_eq!(w.update(c), Verdict::Replayed, "step {} re-update", step);
                    }
                }
                _ => {
                    let got = w.check(c);
                    prop_assert_eq!(got, expected, "step {} check-only({})", step, c);
                }
            }
            if expected == Verdict::Fresh {
                prop_assert!(!was_accepted, "step {} counter {} accepted twice", step, c);
                prop_assert_eq!(reference, Verdict::Fresh, "step {} accepts more", step);
            }
            prop_assert_eq!(w.highest(), m.highest, "step {} highest", step);
        }
        if let Some(h) = m.highest {
            let lo = h.saturating_sub(w.window_size() + 130);
            let hi = h.saturating_add(130);
            for c in lo..=hi {
                prop_assert_eq!(
                    w.check(c),
                    m.check(c),
                    "final sweep: counter {} (h={})",
                    c,
                    h
                );
            }
        }
        Ok(())
    }

    fn sizes() -> impl Strategy<Value = u64> {
        prop_oneof![Just(2048u64), Just(2049), Just(8192)]
    }

    fn modes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(0u8..3, 0..4000)
    }

    /// Modes with a compaction now and then (mode 3, about one step in 200).
    fn modes_with_compaction() -> impl Strategy<Value = Vec<u8>> {
        let mode = prop_oneof![199 => 0u8..3, 1 => Just(3u8)];
        prop::collection::vec(mode, 0..4000)
    }

    /// Counters drawn from a small range, so most are duplicates or fall out of the window.
    fn small_range() -> impl Strategy<Value = Vec<u64>> {
        (1u64..12_000).prop_flat_map(|range| prop::collection::vec(0..range, 1..2000))
    }

    /// An increasing run (offsets from 0) whose elements are displaced: mostly by less than a
    /// window, sometimes by more. Either a permutation by swaps, or additive jitter (which also
    /// produces duplicates).
    fn reordered_offsets() -> impl Strategy<Value = Vec<u64>> {
        let displacement = prop_oneof![8 => 0u64..2000, 1 => 2000u64..25_000];
        let swapped = (
            1u64..6,
            1usize..5000,
            prop::collection::vec((any::<Index>(), displacement), 0..2000),
        )
            .prop_map(|(stride, n, swaps)| {
                let mut v: Vec<u64> = (0..n as u64).map(|i| i * stride).collect();
                for (at, by) in swaps {
                    let a = at.index(n);
                    let b = a.saturating_add(usize::try_from(by / stride).unwrap_or(usize::MAX));
                    if b < n {
                        v.swap(a, b);
                    }
                }
                v
            });
        let jitter = prop_oneof![8 => -2000i64..2000, 1 => -25_000i64..25_000];
        let jittered =
            (1u64..6, prop::collection::vec(jitter, 1..4000)).prop_map(|(stride, jitters)| {
                (0u64..)
                    .zip(jitters)
                    .map(|(i, j)| (30_000 + i * stride).saturating_add_signed(j))
                    .collect()
            });
        prop_oneof![swapped, jittered]
    }

    /// A reordered run, with counters repeated immediately, re-sent from earlier in the run,
    /// and the tail of the run replayed at the end.
    fn duplicated() -> impl Strategy<Value = Vec<u64>> {
        (
            reordered_offsets(),
            prop::collection::vec((0u8..4, any::<Index>()), 4000),
            0usize..3000,
        )
            .prop_map(|(run, dups, tail)| {
                let mut out: Vec<u64> = Vec::with_capacity(run.len() * 2 + tail);
                for (i, (&c, (kind, earlier))) in run.iter().zip(dups).enumerate() {
                    out.push(c);
                    match kind {
                        1 => out.push(c),
                        2 => out.extend(run.get(earlier.index(i + 1)).copied()),
                        _ => {}
                    }
                }
                let replay_from = run.len().saturating_sub(tail);
                out.extend(run.iter().skip(replay_from).copied());
                out
            })
    }

    #[derive(Clone, Copy, Debug)]
    enum Step {
        Forward(u64),
        Back(u64),
    }

    /// Starting points: near zero or near `u64::MAX`.
    fn start() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..1000, (0u64..30_000).prop_map(|off| u64::MAX - off)]
    }

    /// Walks with jumps around window and ring lengths, far beyond several windows, and back.
    fn big_jumps() -> impl Strategy<Value = Vec<u64>> {
        let edges = prop::sample::select(vec![
            63u64, 64, 65, 2047, 2048, 2049, 2111, 2112, 2113, 2175, 2176, 2177, 8191, 8192, 8193,
            8255, 8256, 8257,
        ]);
        let step = prop_oneof![
            6 => (0u64..70).prop_map(Step::Forward),
            3 => edges.clone().prop_map(Step::Forward),
            2 => (3 * 8256u64..1 << 20).prop_map(Step::Forward),
            1 => (1u64 << 20..1 << 62).prop_map(Step::Forward),
            2 => (0u64..9000).prop_map(Step::Back),
            2 => edges.prop_map(Step::Back),
        ];
        (start(), prop::collection::vec(step, 1..1000)).prop_map(|(start, steps)| {
            let mut c = start;
            let mut out = vec![c];
            for s in steps {
                c = match s {
                    Step::Forward(d) => c.saturating_add(d),
                    Step::Back(d) => c.saturating_sub(d),
                };
                out.push(c);
            }
            out
        })
    }

    /// Sequences ending at or near `u64::MAX`: random values just below it, and reordered runs
    /// based at `u64::MAX - offset` (saturating, so `u64::MAX` itself repeats).
    fn near_max() -> impl Strategy<Value = Vec<u64>> {
        let random = prop::collection::vec(0u64..20_000, 1..2000)
            .prop_map(|offs| offs.into_iter().map(|o| u64::MAX - o).collect::<Vec<_>>());
        let based = (0u64..30_000, reordered_offsets()).prop_map(|(off, run)| {
            let base = u64::MAX - off;
            run.into_iter().map(|o| base.saturating_add(o)).collect()
        });
        prop_oneof![random, based]
    }

    proptest! {
        #[test]
        fn matches_model_on_small_range_with_duplicates(
            size in sizes(), counters in small_range(), modes in modes()
        ) {
            run_against_model(size, &counters, &modes)?;
        }

        #[test]
        fn matches_model_on_reordered_runs(
            size in sizes(), start in start(), offsets in reordered_offsets(), modes in modes()
        ) {
            let counters: Vec<u64> = offsets.iter().map(|&o| start.saturating_add(o)).collect();
            run_against_model(size, &counters, &modes)?;
        }

        #[test]
        fn matches_model_on_duplicated_runs(
            size in sizes(), counters in duplicated(), modes in modes()
        ) {
            run_against_model(size, &counters, &modes)?;
        }

        #[test]
        fn matches_model_on_big_jumps(size in sizes(), counters in big_jumps(), modes in modes()) {
            run_against_model(size, &counters, &modes)?;
        }

        #[test]
        fn matches_model_near_u64_max(size in sizes(), counters in near_max(), modes in modes()) {
            run_against_model(size, &counters, &modes)?;
        }

        #[test]
        fn compacted_window_matches_model_and_never_accepts_a_replay(
            size in sizes(),
            counters in prop_oneof![small_range(), duplicated(), big_jumps(), near_max()],
            modes in modes_with_compaction(),
        ) {
            run_against_model(size, &counters, &modes)?;
        }
    }

    #[test]
    fn first_counter_zero_is_fresh() {
        let mut w = window(2048);
        assert_eq!(w.highest(), None);
        assert_eq!(w.check_and_update(0), Verdict::Fresh);
        assert_eq!(w.highest(), Some(0));
        assert_eq!(w.check_and_update(0), Verdict::Replayed);
    }

    #[test]
    fn duplicate_counter_is_replayed() {
        let mut w = window(2048);
        accept_all(&mut w, [10, 12, 11]);
        assert_eq!(w.check_and_update(12), Verdict::Replayed);
        assert_eq!(w.check_and_update(11), Verdict::Replayed);
        assert_eq!(w.check(10), Verdict::Replayed);
        assert_eq!(w.update(10), Verdict::Replayed);
        assert_eq!(w.check_and_update(9), Verdict::Fresh);
        assert_eq!(w.highest(), Some(12));
    }

    #[test]
    fn counter_exactly_one_window_behind_is_too_old() {
        for size in [2048, 2049, 8192] {
            let mut w = window(size);
            let ws = w.window_size();
            let h = 100_000 + 37;
            accept_all(&mut w, [h]);
            // Never seen, but out of the window.
            assert_eq!(w.check(h - ws), Verdict::TooOld, "size {size}");
            assert_eq!(w.check_and_update(h - ws), Verdict::TooOld, "size {size}");
            assert_eq!(
                w.check_and_update(h - ws - 1),
                Verdict::TooOld,
                "size {size}"
            );
        }
    }

    #[test]
    fn counter_one_less_than_a_window_behind_is_fresh() {
        for size in [2048, 2049, 8192] {
            let ws = window(size).window_size();
            // Try every alignment of the highest counter within a block.
            for h in 50_000..50_000 + 64 {
                let mut w = window(size);
                accept_all(&mut w, [h]);
                assert_eq!(
                    w.check_and_update(h - (ws - 1)),
                    Verdict::Fresh,
                    "size {size} h {h}"
                );
                assert_eq!(
                    w.check(h - (ws - 1)),
                    Verdict::Replayed,
                    "size {size} h {h}"
                );
                assert_eq!(w.check(h - ws), Verdict::TooOld, "size {size} h {h}");
            }
        }
    }

    #[test]
    fn window_size_is_rounded_up_to_whole_blocks() {
        assert_eq!(window(2048).window_size(), 2048);
        assert_eq!(window(2049).window_size(), 2112);
        assert_eq!(window(2111).window_size(), 2112);
        assert_eq!(window(8192).window_size(), 8192);
        assert_eq!(window(1 << 20).window_size(), 1 << 20);
        // The rounded size is exactly what is enforced.
        let mut w = window(2049);
        accept_all(&mut w, [10_000]);
        assert_eq!(w.check(10_000 - 2111), Verdict::Fresh);
        assert_eq!(w.check(10_000 - 2112), Verdict::TooOld);
    }

    #[test]
    fn whole_window_stays_remembered_at_every_alignment() {
        // Fill all W counters behind the highest, for each alignment of the highest counter;
        // with one block fewer some of them would be forgotten (reported Fresh).
        for offset in 0..64 {
            let mut w = window(2048);
            let ws = w.window_size();
            let h = 10 * 2048 + offset;
            accept_all(&mut w, (h - (ws - 1))..=h);
            for c in (h - (ws - 1))..=h {
                assert_eq!(w.check(c), Verdict::Replayed, "offset {offset} counter {c}");
            }
        }
    }

    #[test]
    fn jump_of_exactly_one_ring_length_leaves_no_stale_bits() {
        let mut w = window(2048);
        let ring = (w.window_size() / 64 + 1) * 64;
        accept_all(&mut w, [10, 11]);
        // One ring length and one counter later: same slot as 10 and 11, block number exactly
        // one ring ahead.
        accept_all(&mut w, [11 + ring]);
        // 10 + ring is in the window and shares bit and slot with the old counter 10.
        assert_eq!(w.check(10 + ring), Verdict::Fresh);
        assert_eq!(w.check_and_update(10 + ring), Verdict::Fresh);
        assert_eq!(w.check(11 + ring), Verdict::Replayed);
        assert_eq!(w.check(10), Verdict::TooOld);
    }

    #[test]
    fn advancing_by_any_number_of_blocks_forgets_exactly_the_expired_counters() {
        let ws = window(2049).window_size();
        let blocks = ws / 64 + 1;
        for jump_blocks in 1..=blocks + 2 {
            for delta in [jump_blocks * 64 - 1, jump_blocks * 64, jump_blocks * 64 + 1] {
                let mut probe = window(2049);
                let first = 5 * ws + 17;
                // Every other counter in a full window is accepted.
                accept_all(&mut probe, (first..first + ws).step_by(2));
                let old_high = first + ws - 2;
                let new_high = old_high + delta;
                accept_all(&mut probe, [new_high]);
                for c in new_high - (ws - 1)..new_high {
                    let seen = c <= old_high && c >= first && (c - first).is_multiple_of(2);
                    let expected = if seen {
                        Verdict::Replayed
                    } else {
                        Verdict::Fresh
                    };
                    assert_eq!(probe.check(c), expected, "delta {delta} counter {c}");
                }
            }
        }
    }

    #[test]
    fn u64_max_is_accepted_then_replayed() {
        let mut w = window(2048);
        let ws = w.window_size();
        assert_eq!(w.check_and_update(u64::MAX), Verdict::Fresh);
        assert_eq!(w.highest(), Some(u64::MAX));
        assert_eq!(w.check_and_update(u64::MAX), Verdict::Replayed);
        assert_eq!(w.check_and_update(u64::MAX - (ws - 1)), Verdict::Fresh);
        assert_eq!(w.check_and_update(u64::MAX - ws), Verdict::TooOld);
        assert_eq!(w.check_and_update(u64::MAX - 1), Verdict::Fresh);
        assert_eq!(w.check_and_update(u64::MAX - 1), Verdict::Replayed);
    }

    #[test]
    fn jump_from_zero_to_u64_max_forgets_the_past() {
        let mut w = window(2048);
        accept_all(&mut w, [0, 1, 2]);
        assert_eq!(w.check_and_update(u64::MAX), Verdict::Fresh);
        assert_eq!(w.check(0), Verdict::TooOld);
        // u64::MAX - 64 * k shares a slot with low counters for some k; none may look seen.
        for c in u64::MAX - 2047..u64::MAX {
            assert_eq!(w.check(c), Verdict::Fresh, "counter {c}");
        }
    }

    #[test]
    fn new_rejects_sizes_outside_the_allowed_range() {
        for size in [0, 1, 2047, (1 << 20) + 1, u64::MAX] {
            assert_eq!(
                ReplayWindow::new(size).err(),
                Some(WindowSizeError { size })
            );
        }
        for size in [2048, 2049, 1 << 20] {
            assert!(ReplayWindow::new(size).is_ok(), "size {size}");
        }
    }

    #[test]
    fn window_size_error_names_the_size_and_the_range() {
        let err = WindowSizeError { size: 2047 };
        assert_eq!(
            err.to_string(),
            "replay window of 2047 packets: expected 2048 to 1048576"
        );
        let _: &dyn std::error::Error = &err;
    }

    #[test]
    fn check_does_not_mutate() {
        let mut w = window(2048);
        assert_eq!(w.check(7), Verdict::Fresh);
        assert_eq!(w.check(7), Verdict::Fresh);
        assert_eq!(w.highest(), None);
        accept_all(&mut w, [100, 98]);
        let ring = w.ring.clone();
        for c in [99, 101, 5000, u64::MAX, 0, 100] {
            let first = w.check(c);
            assert_eq!(w.check(c), first, "counter {c}");
        }
        assert_eq!(w.ring, ring);
        assert_eq!(w.highest(), Some(100));
        assert_eq!(w.check_and_update(99), Verdict::Fresh);
        assert_eq!(w.check_and_update(5000), Verdict::Fresh);
    }

    #[test]
    fn refused_packets_leave_the_window_unchanged() {
        let mut w = window(2048);
        accept_all(&mut w, [5000, 4000]);
        let ring = w.ring.clone();
        assert_eq!(w.check_and_update(4000), Verdict::Replayed);
        assert_eq!(w.update(100), Verdict::TooOld);
        assert_eq!(w.ring, ring);
        assert_eq!(w.highest(), Some(5000));
    }

    #[test]
    fn highest_is_the_maximum_not_the_latest() {
        let mut w = window(2048);
        accept_all(&mut w, [500, 300, 499]);
        assert_eq!(w.highest(), Some(500));
        assert_eq!(w.check_and_update(501), Verdict::Fresh);
        assert_eq!(w.highest(), Some(501));
    }

    #[test]
    fn bitmap_is_allocated_only_once_a_second_counter_is_within_the_window() {
        let mut w = window(8192);
        let ws = w.window_size();
        assert!(!w.holds_bitmap(), "new window");
        accept_all(&mut w, [1_000]);
        assert!(!w.holds_bitmap(), "one counter");
        // Counters a whole window or more apart (as control keepalives are) need no bitmap.
        accept_all(&mut w, [1_000 + ws, 1_000 + 3 * ws + 17]);
        assert!(!w.holds_bitmap(), "counters a window apart");
        let h = 1_000 + 3 * ws + 17;
        assert_eq!(w.check(h), Verdict::Replayed);
        assert_eq!(w.check(h - 1), Verdict::Fresh);
        assert_eq!(w.check(h - (ws - 1)), Verdict::Fresh);
        assert_eq!(w.check(h - ws), Verdict::TooOld);
        // A reordered counter needs one; the highest is still remembered in it.
        accept_all(&mut w, [h - 5]);
        assert!(w.holds_bitmap(), "reordered counter");
        assert_eq!(w.check(h), Verdict::Replayed);
        assert_eq!(w.check(h - 5), Verdict::Replayed);
        assert_eq!(w.check(h - 4), Verdict::Fresh);
        // A jump of a whole window expires everything it held: the bitmap goes.
        accept_all(&mut w, [h + ws]);
        assert!(!w.holds_bitmap(), "jump of a window");
        assert_eq!(w.check(h), Verdict::TooOld);
        assert_eq!(w.check(h + 1), Verdict::Fresh);
        // In-order traffic needs one from its second packet.
        accept_all(&mut w, [h + ws + 1]);
        assert!(w.holds_bitmap(), "in-order counter");
        assert_eq!(w.check(h + ws), Verdict::Replayed);
    }

    #[test]
    fn compaction_refuses_every_counter_at_or_below_the_highest() {
        let mut w = window(2048);
        // Every third counter of a stretch shorter than the window, the highest last.
        accept_all(&mut w, (10_000..11_000).step_by(3));
        let h = 10_999;
        assert_eq!(w.highest(), Some(h));
        assert_eq!(w.check(10_001), Verdict::Fresh, "a gap before compaction");
        w.compact();
        assert!(!w.holds_bitmap());
        assert_eq!(w.highest(), Some(h));
        assert_eq!(w.check_and_update(h), Verdict::Replayed);
        for c in h - 2047..h {
            // Seen or not, nothing below the highest gets through any more.
            assert_eq!(w.check_and_update(c), Verdict::TooOld, "counter {c}");
        }
        // Above it, the window works as before, including reordering.
        accept_all(&mut w, [h + 10, h + 3, h + 1]);
        assert!(w.holds_bitmap());
        for c in [h, h + 1, h + 3, h + 10] {
            assert_eq!(w.check(c), Verdict::Replayed, "counter {c}");
        }
        for c in [h + 2, h + 4, h + 9, h + 11] {
            assert_eq!(w.check(c), Verdict::Fresh, "counter {c}");
        }
        assert_eq!(w.check(h - 1), Verdict::TooOld);
    }

    #[test]
    fn compacting_an_empty_window_changes_nothing() {
        let mut w = window(2048);
        w.compact();
        assert_eq!(w.highest(), None);
        accept_all(&mut w, [5, 3, 0]);
        assert_eq!(w.check(4), Verdict::Fresh);
        assert_eq!(w.check(3), Verdict::Replayed);
    }

    #[test]
    fn a_jump_of_a_window_after_compaction_leaves_an_ordinary_window() {
        let mut w = window(2048);
        accept_all(&mut w, [70_000, 69_990]);
        w.compact();
        let h = 70_000 + w.window_size();
        accept_all(&mut w, [h]);
        let mut plain = window(2048);
        accept_all(&mut plain, [h]);
        for c in h - 2100..h + 10 {
            assert_eq!(w.check(c), plain.check(c), "counter {c}");
        }
        // Reordering below the new highest is accepted again.
        assert_eq!(w.check_and_update(h - 1), Verdict::Fresh);
    }

    #[test]
    fn compaction_at_u64_max_refuses_it_and_everything_below() {
        let mut w = window(2048);
        accept_all(&mut w, [u64::MAX - 1, u64::MAX]);
        w.compact();
        assert_eq!(w.check_and_update(u64::MAX), Verdict::Replayed);
        assert_eq!(w.check_and_update(u64::MAX - 2), Verdict::TooOld);
    }

    #[test]
    fn debug_output_is_compact() {
        let w = window(2048);
        assert_eq!(
            format!("{w:?}"),
            "ReplayWindow { window_size: 2048, highest: None, .. }"
        );
    }
}
