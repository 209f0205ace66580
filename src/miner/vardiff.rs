//! Per-miner variable difficulty ("vardiff"): a sans-IO state machine that moves a miner's share
//! difficulty towards a target share rate. The session feeds it accepted shares, each with the
//! difficulty it was judged at, and timer ticks, and sends `mining.set_difficulty` when it answers
//! with a new difficulty.
//!
//! # Algorithm
//! Shares and their work (the sum of the difficulties they were judged at) are counted in a window
//! that starts at [`Vardiff::new`], at [`Vardiff::suggest`] and at every retarget. A share counts at
//! its own job's difficulty, whatever the current one: firmware keeps hashing the work it has for a
//! while after a change, and that work is as real as any. Let `E` be the shares expected in
//! `retarget_secs` at the target rate. A retarget is due when the window
//! - is `retarget_secs` old and holds a share;
//! - holds at least 8 shares and the work of `max(4 × E, 8)` shares at the current difficulty,
//!   however young: a miner at least 4 times too fast (one started far too low) steps up at once
//!   instead of flooding the proxy for a whole window;
//! - is empty and `max(retarget_secs, 3 shares' time at the target rate)` old. Waiting for 3
//!   expected shares keeps a miner that is on target but unlucky (`e^-3`, 5 %) from being lowered
//!   when `E` is small.
//!
//! A retarget measures the miner's work rate: work per minute, which does not depend on the
//! difficulty and so can pool shares and windows of different difficulties. The closed window
//! counts in full and each earlier one half as much as the next (`HISTORY_DECAY`), about two
//! windows' worth of shares in all: the estimate's relative error falls from `1/√E` to about
//! `1/√(2E)`, and with it the changes that are only noise, while a miner that changes speed is
//! followed within a few windows. An empty window forgets the history, since the miner may have
//! stopped, and counts as one share at the moment of the check: an upper bound on its rate, so
//! the difficulty is divided by 3 to 4.
//!
//! The new difficulty is `work rate / target rate`, limited to a step of 4 either way and clamped
//! into `[min_difficulty, max_difficulty]`. A step within 15 % of 1 is skipped, so that noise does
//! not resend the difficulty every window. The window restarts at every retarget, changed or not.
//! `E` of 10 or more (the defaults give 10) keeps the difficulty steady.

use std::time::Duration;

use tokio::time::Instant;

/// Largest factor by which one retarget moves the difficulty, up or down.
const MAX_STEP: f64 = 4.0;
/// A window with this many times the shares expected in `retarget_secs` retargets early.
const EARLY_FACTOR: f64 = 4.0;
/// The fewest shares an early retarget is measured on.
const EARLY_MIN_SHARES: u64 = 8;
/// Shares expected at the target rate before an empty window counts as evidence.
const EMPTY_EXPECTED: f64 = 3.0;
/// Relative change below which a retarget keeps the old difficulty.
const HYSTERESIS: f64 = 0.15;
/// Weight of the history against the window just closed, applied again at every retarget.
const HISTORY_DECAY: f64 = 0.5;
/// Bounds on every window length, so that `Instant` arithmetic cannot overflow and `tick` cannot
/// spin whatever the configuration.
const MIN_WINDOW: Duration = Duration::from_millis(100);
const MAX_WINDOW: Duration = Duration::from_secs(86_400);

/// Bounds and aim of vardiff, from config. All difficulties are f64 and may be far below 1 (e.g. 1e-6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VardiffConfig {
    /// Difficulty of a new miner, clamped into the bounds.
    pub start_difficulty: f64,
    /// Lowest difficulty vardiff or a suggestion may set.
    pub min_difficulty: f64,
    /// Highest difficulty vardiff or a suggestion may set.
    pub max_difficulty: f64,
    /// Share rate that vardiff aims at, per minute.
    pub target_shares_per_minute: f64,
    /// Seconds between retargets (a retarget can also happen earlier when many shares arrive, see the
    /// [module docs](self)).
    pub retarget_secs: f64,
}

/// The vardiff state of one miner; see the [module docs](self) for the algorithm.
#[derive(Debug, Clone)]
pub struct Vardiff {
    config: VardiffConfig,
    difficulty: f64,
    window_start: Instant,
    shares: u64,
    /// The difficulties of the window's shares, summed.
    work: f64,
    /// Window length after which a window with shares retargets.
    retarget: Duration,
    /// Window length after which an empty window retargets.
    empty_wait: Duration,
    /// Shares after which a window retargets early.
    early_shares: u64,
    /// Work (shares × difficulty) of the windows before this one, each weighted by `HISTORY_DECAY`
    /// per retarget since it closed.
    history_work: f64,
    /// Seconds of those windows, weighted alike.
    history_secs: f64,
}

impl Vardiff {
    /// Starts at `start_difficulty`, clamped into the bounds, with a window opening at `now`.
    pub fn new(config: VardiffConfig, now: Instant) -> Self {
        let retarget = window(config.retarget_secs);
        let target = config.target_shares_per_minute;
        let empty_wait = retarget.max(window(EMPTY_EXPECTED * 60.0 / target));
        let expected = target * retarget.as_secs_f64() / 60.0;
        // A float-to-int `as` saturates, and a NaN becomes 0, which the max repairs.
        let early_shares = ((EARLY_FACTOR * expected).ceil() as u64).max(EARLY_MIN_SHARES);
        let mut vardiff = Self {
            config,
            difficulty: 0.0,
            window_start: now,
            shares: 0,
            work: 0.0,
            retarget,
            empty_wait,
            early_shares,
            history_work: 0.0,
            history_secs: 0.0,
        };
        vardiff.difficulty = vardiff.clamp(config.start_difficulty);
        vardiff
    }

    /// The current difficulty.
    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    /// mining.suggest_difficulty from the miner: clamps into `[min, max]`, becomes the current difficulty, restarts the
    /// measuring window and forgets the history. Returns the clamped value. A non-finite or non-positive suggestion
    /// is ignored and the current difficulty returned.
    pub fn suggest(&mut self, difficulty: f64, now: Instant) -> f64 {
        if difficulty.is_finite() && difficulty > 0.0 {
            self.difficulty = self.clamp(difficulty);
            self.restart(now);
            self.forget();
        }
        self.difficulty
    }

    /// Record one share accepted at `difficulty`: the difficulty it was judged at, the current one
    /// or an earlier one. Returns Some(new) when a retarget is due and changes the difficulty.
    pub fn on_share(&mut self, difficulty: f64, now: Instant) -> Option<f64> {
        self.shares = self.shares.saturating_add(1);
        if difficulty.is_finite() && difficulty > 0.0 {
            self.work += difficulty;
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        // Half a share of slack, for the rounding in the sum.
        let early_work = (self.early_shares as f64 - 0.5) * self.difficulty;
        let early = self.shares >= EARLY_MIN_SHARES && self.work >= early_work;
        if elapsed >= self.retarget || early {
            self.retarget(now, elapsed)
        } else {
            None
        }
    }

    /// Periodic check for miners that submit too little (called from a timer); returns Some(new) if the difficulty
    /// changed. A call before [`next_check`](Self::next_check) does nothing.
    pub fn tick(&mut self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= self.due_after() {
            self.retarget(now, elapsed)
        } else {
            None
        }
    }

    /// When `tick` should next be called. It moves with every call to `on_share`, `suggest` and `tick`, and is
    /// always later than the `now` of a `tick` that was due.
    pub fn next_check(&self) -> Instant {
        self.window_start + self.due_after()
    }

    fn due_after(&self) -> Duration {
        if self.shares == 0 {
            self.empty_wait
        } else {
            self.retarget
        }
    }

    /// Measures the window, restarts it, and returns the new difficulty if it changed.
    fn retarget(&mut self, now: Instant, elapsed: Duration) -> Option<f64> {
        let (mut work, mut secs) = (self.work, elapsed.as_secs_f64());
        if self.shares == 0 {
            // A silent miner may have stopped, so its past says nothing. The empty window counts as one share now:
            // an upper bound on its rate, and a finite step.
            self.forget();
            work = self.difficulty;
        } else {
            work += self.history_work;
            secs += self.history_secs;
            self.history_work = work * HISTORY_DECAY;
            self.history_secs = secs * HISTORY_DECAY;
        }
        self.restart(now);
        // The difficulty that meets the target at the measured work rate; a burst of shares at one instant with no
        // history gives +inf, which the step limit turns into MAX_STEP.
        let ideal = work / (secs / 60.0) / self.config.target_shares_per_minute;
        let factor = (ideal / self.difficulty).clamp(1.0 / MAX_STEP, MAX_STEP);
        if factor.is_nan() || (1.0 / (1.0 + HYSTERESIS)..=1.0 + HYSTERESIS).contains(&factor) {
            return None;
        }
        let new = self.clamp(self.difficulty * factor);
        if new == self.difficulty {
            return None;
        }
        self.difficulty = new;
        Some(new)
    }

    fn forget(&mut self) {
        self.history_work = 0.0;
        self.history_secs = 0.0;
    }

    fn restart(&mut self, now: Instant) {
        self.window_start = now;
        self.shares = 0;
        self.work = 0.0;
    }

    /// Clamps into the bounds, without `f64::clamp`, which panics on a NaN or inverted bound.
    fn clamp(&self, difficulty: f64) -> f64 {
        difficulty.max(self.config.min_difficulty).min(self.config.max_difficulty)
    }
}

/// A window of `secs` seconds, kept between `MIN_WINDOW` and `MAX_WINDOW`; NaN gives the longest.
fn window(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(MAX_WINDOW).clamp(MIN_WINDOW, MAX_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^32: the expected hashes per share at difficulty 1.
    const HASHES_PER_DIFF1: f64 = 4_294_967_296.0;

    fn config(start: f64) -> VardiffConfig {
        VardiffConfig {
            start_difficulty: start,
            min_difficulty: 1e-8,
            max_difficulty: 1e6,
            target_shares_per_minute: 20.0,
            retarget_secs: 30.0,
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A miner of fixed hashrate whose shares arrive as a Poisson process at the current difficulty.
    struct Miner {
        hashrate: f64,
        /// xorshift64 state, never 0.
        rng: u64,
        /// The difficulty it hashes at whatever it is told, as firmware that never takes the new
        /// difficulty would; `None` follows the vardiff.
        stuck: Option<f64>,
    }

    impl Miner {
        fn new(hashrate: f64, seed: u64) -> Self {
            Self { hashrate, rng: seed, stuck: None }
        }

        /// Uniform in (0, 1].
        fn uniform(&mut self) -> f64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            ((self.rng >> 11) as f64 + 1.0) / (1u64 << 53) as f64
        }

        /// Time to the next share at `difficulty`, or `None` for a miner that never finds one.
        fn next_share(&mut self, difficulty: f64) -> Option<Duration> {
            let rate = self.hashrate / (difficulty * HASHES_PER_DIFF1);
            let wait = -self.uniform().ln() / rate;
            Duration::try_from_secs_f64(wait).ok().filter(|&d| d < MAX_WINDOW)
        }

        /// Runs the miner and the timer from `from` to `until`; returns the shares submitted. Asserts the
        /// invariants on the way: the difficulty stays in bounds and `next_check` lies ahead after a due tick.
        fn run(&mut self, vardiff: &mut Vardiff, from: Instant, until: Instant) -> u64 {
            let (min, max) = (vardiff.config.min_difficulty, vardiff.config.max_difficulty);
            let mut now = from;
            let mut arrival = self.next_share(self.stuck.unwrap_or(vardiff.difficulty())).map(|d| now + d);
            let mut shares = 0;
            loop {
                let check = vardiff.next_check();
                let changed = match arrival {
                    Some(at) if at <= check && at <= until => {
                        now = at;
                        shares += 1;
                        vardiff.on_share(self.stuck.unwrap_or(vardiff.difficulty()), now);
                        // Redraw after every share; after a change the new rate applies (memoryless).
                        true
                    }
                    _ if check <= until => {
                        assert!(check >= now, "next_check went back in time");
                        now = check;
                        let changed = vardiff.tick(now).is_some();
                        assert!(vardiff.next_check() > now, "a due tick left next_check at or before now");
                        changed
                    }
                    _ => return shares,
                };
                let d = vardiff.difficulty();
                assert!((min..=max).contains(&d), "difficulty {d} outside [{min}, {max}]");
                if changed {
                    arrival = self.next_share(self.stuck.unwrap_or(d)).map(|w| now + w);
                }
            }
        }
    }

    /// The difficulty at which `hashrate` meets the target share rate.
    fn ideal(hashrate: f64, config: &VardiffConfig) -> f64 {
        hashrate * 60.0 / (config.target_shares_per_minute * HASHES_PER_DIFF1)
    }

    /// The hashrate whose ideal difficulty is 0.05 at the test config's 20 shares a minute.
    const HASHRATE: f64 = 0.05 * 20.0 * HASHES_PER_DIFF1 / 60.0;

    #[test]
    fn converges_from_far_too_low_and_far_too_high() {
        for (start, seed) in [(1e-6, 0x9E37_79B9_7F4A_7C15), (100.0, 0xD1B5_4A32_D192_ED03), (0.05, 42)] {
            let config = config(start);
            let ideal = ideal(HASHRATE, &config);
            let t0 = Instant::now();
            let mut vardiff = Vardiff::new(config, t0);
            let mut miner = Miner::new(HASHRATE, seed);

            let t5 = t0 + secs(300.0);
            miner.run(&mut vardiff, t0, t5);
            let ratio = vardiff.difficulty() / ideal;
            assert!((1.0 / 1.5..=1.5).contains(&ratio), "start {start}: difficulty {ratio} × ideal after 5 min");

            let per_minute = miner.run(&mut vardiff, t5, t5 + secs(600.0)) as f64 / 10.0;
            let target = config.target_shares_per_minute;
            assert!(
                (0.75 * target..=1.25 * target).contains(&per_minute),
                "start {start}: {per_minute} shares/min in minutes 5 to 15"
            );
        }
    }

    #[test]
    fn shares_at_an_older_difficulty_count_at_it() {
        // Firmware that never takes the new difficulty and hashes on at a quarter of the ideal:
        // its shares show its real work rate, so the vardiff settles on the ideal and stays there
        // instead of taking the miner for a silent one and lowering it again and again.
        let config = config(0.05);
        let ideal = ideal(HASHRATE, &config);
        let t0 = Instant::now();
        let mut vardiff = Vardiff::new(config, t0);
        let mut miner = Miner::new(HASHRATE, 0x2545_F491_4F6C_DD1D);
        miner.stuck = Some(ideal / 4.0);
        for minute in 1..=30 {
            miner.run(&mut vardiff, t0 + secs(60.0 * (minute - 1) as f64), t0 + secs(60.0 * minute as f64));
            let ratio = vardiff.difficulty() / ideal;
            assert!(minute < 3 || (1.0 / 1.5..=1.5).contains(&ratio), "difficulty {ratio} × ideal at minute {minute}");
        }
    }

    #[test]
    fn early_retarget_ramps_up_within_one_window() {
        let t0 = Instant::now();
        let mut vardiff = Vardiff::new(config(1e-6), t0);
        // E = 10 shares per 30 s window, so the 40th share within it retargets by the full step.
        for i in 1..40 {
            assert_eq!(vardiff.on_share(vardiff.difficulty(), t0 + secs(0.01 * i as f64)), None);
        }
        assert_eq!(vardiff.on_share(vardiff.difficulty(), t0 + secs(0.4)), Some(4e-6));
        assert_eq!(vardiff.next_check(), t0 + secs(0.4) + secs(30.0));
    }

    #[test]
    fn small_deviation_keeps_the_difficulty_and_history_weighs_half() {
        let t0 = Instant::now();
        let mut vardiff = Vardiff::new(config(2.0), t0);
        // 11 shares in 30 s is 22 a minute: 10 % fast, inside the hysteresis.
        for i in 1..=10 {
            assert_eq!(vardiff.on_share(vardiff.difficulty(), t0 + secs(2.7 * i as f64)), None);
        }
        assert_eq!(vardiff.tick(t0 + secs(29.0)), None, "a tick before next_check does nothing");
        assert_eq!(vardiff.on_share(vardiff.difficulty(), t0 + secs(30.0)), None);
        assert_eq!(vardiff.difficulty(), 2.0);
        assert_eq!(vardiff.next_check(), t0 + secs(60.0), "the window restarts without a change");
        // 15 shares in the next 30 s: work 15 × 2 plus half of the first window's 11 × 2, over 30 + 15 s.
        for i in 1..15 {
            assert_eq!(vardiff.on_share(vardiff.difficulty(), t0 + secs(30.0 + 2.0 * i as f64)), None);
        }
        let expected = (30.0 + 11.0) / (45.0 / 60.0) / 20.0;
        let new = vardiff.on_share(vardiff.difficulty(), t0 + secs(60.0)).expect("a 37 % step");
        assert!((new - expected).abs() < 1e-12, "{new} != {expected}");
    }

    #[test]
    fn follows_a_change_of_hashrate() {
        for (factor, seed) in [(0.1, 0x2545_F491_4F6C_DD1D), (10.0, 0x1234_5678_9ABC_DEF1)] {
            let config = config(0.05);
            let t0 = Instant::now();
            let mut vardiff = Vardiff::new(config, t0);
            let mut miner = Miner::new(HASHRATE, seed);
            let t5 = t0 + secs(300.0);
            miner.run(&mut vardiff, t0, t5);
            miner.hashrate = HASHRATE * factor;
            miner.run(&mut vardiff, t5, t5 + secs(300.0));
            let ratio = vardiff.difficulty() / ideal(miner.hashrate, &config);
            assert!((1.0 / 1.5..=1.5).contains(&ratio), "×{factor}: difficulty {ratio} × ideal 5 min later");
        }
    }

    #[test]
    fn stays_in_bounds_for_huge_and_zero_hashrates() {
        let mut config = config(1.0);
        config.max_difficulty = 1e3;
        // Ideal 1e6, a thousand times the maximum: 20 000 shares a minute at max_difficulty.
        let huge = 1e6 * 20.0 * HASHES_PER_DIFF1 / 60.0;
        for (hashrate, bound) in [(huge, config.max_difficulty), (0.0, config.min_difficulty)] {
            let t0 = Instant::now();
            let mut vardiff = Vardiff::new(config, t0);
            Miner::new(hashrate, 7).run(&mut vardiff, t0, t0 + secs(3600.0));
            assert_eq!(vardiff.difficulty(), bound, "hashrate {hashrate}");
        }
    }

    #[test]
    fn new_clamps_start_difficulty() {
        let t0 = Instant::now();
        for (start, expected) in [(1e-12, 1e-8), (1e9, 1e6), (0.5, 0.5), (f64::NAN, 1e-8)] {
            assert_eq!(Vardiff::new(config(start), t0).difficulty(), expected, "start {start}");
        }
    }

    #[test]
    fn suggest_clamps_and_ignores_invalid_values() {
        // (suggested, resulting difficulty, honoured)
        let cases = [
            (1e-12, 1e-8, true),
            (1e9, 1e6, true),
            (0.25, 0.25, true),
            (f64::NAN, 2.0, false),
            (f64::INFINITY, 2.0, false),
            (f64::NEG_INFINITY, 2.0, false),
            (0.0, 2.0, false),
            (-3.0, 2.0, false),
        ];
        let t0 = Instant::now();
        for (suggested, expected, honoured) in cases {
            let mut vardiff = Vardiff::new(config(2.0), t0);
            vardiff.on_share(vardiff.difficulty(), t0 + secs(1.0));
            let now = t0 + secs(10.0);
            assert_eq!(vardiff.suggest(suggested, now), expected, "suggest {suggested}");
            assert_eq!(vardiff.difficulty(), expected, "suggest {suggested}");
            // An honoured suggestion restarts the window; an ignored one leaves the window opened at t0.
            let next = if honoured { now + secs(30.0) } else { t0 + secs(30.0) };
            assert_eq!(vardiff.next_check(), next, "suggest {suggested}");
        }
    }

    #[test]
    fn silent_miner_is_lowered_to_min_by_tick() {
        let t0 = Instant::now();
        let mut vardiff = Vardiff::new(config(1.0), t0);
        let mut expected = 1.0;
        // 1 → 1e-8 by quarters is 13.3 steps, one per empty 30 s window.
        for step in 1..=14 {
            let due = vardiff.next_check();
            assert_eq!(due, t0 + secs(30.0 * step as f64));
            expected = f64::max(expected / 4.0, 1e-8);
            assert_eq!(vardiff.tick(due), Some(expected), "step {step}");
        }
        assert_eq!(vardiff.difficulty(), 1e-8);
        // At the floor a due tick changes nothing but still moves next_check on.
        let due = vardiff.next_check();
        assert_eq!(vardiff.tick(due), None);
        assert_eq!(vardiff.next_check(), due + secs(30.0));
    }

    #[test]
    fn empty_window_waits_for_three_expected_shares() {
        let mut config = config(1.0);
        // One share expected every 60 s, so an empty window is judged after 180 s, not 30 s.
        config.target_shares_per_minute = 1.0;
        let t0 = Instant::now();
        let mut vardiff = Vardiff::new(config, t0);
        assert_eq!(vardiff.next_check(), t0 + secs(180.0));
        assert_eq!(vardiff.tick(t0 + secs(30.0)), None);
        // Nothing for 3 minutes is at most 1/3 of the target rate.
        assert_eq!(vardiff.tick(t0 + secs(180.0)), Some(1.0 / 3.0));
        // A share moves the check back to retarget_secs.
        vardiff.on_share(vardiff.difficulty(), t0 + secs(190.0));
        assert_eq!(vardiff.next_check(), t0 + secs(210.0));
    }
}
