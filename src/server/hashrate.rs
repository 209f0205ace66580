//! The proxy's total hashrate over the last hour, for the status page's chart: a fixed-size ring
//! of samples taken every 10 s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::registry::{ConnectionManager, Phase};

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour at [`INTERVAL`].
pub const CAPACITY: usize = 360;

/// The total hashrate at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub t: u64,
    /// Hashes per second, summed over the authorized workers' `hashrate_5m`.
    pub hashrate: f64,
}

/// The last [`CAPACITY`] samples, oldest first.
#[derive(Debug)]
pub struct History {
    /// Written by the sampler every 10 s and read by the API: a plain lock is never contended
    /// for long, and memory stays fixed because the ring never grows past its capacity.
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for History {
    fn default() -> Self {
        Self { samples: Mutex::new(VecDeque::with_capacity(CAPACITY)) }
    }
}

impl History {
    /// Appends a sample, dropping the oldest once the ring is full.
    pub fn push(&self, sample: Sample) {
        let mut samples = self.lock();
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// A copy of the samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        // A holder that panicked cannot leave the ring inconsistent: push is two calls on a deque.
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sum of every authorized session's hashrate over the last five minutes, computed as
/// `/api/v1/connections` computes each worker's `hashrate_5m`.
pub fn total(registry: &ConnectionManager) -> f64 {
    let now = tokio::time::Instant::now();
    registry
        .snapshot()
        .iter()
        .filter(|h| h.phase() == Phase::Authorized)
        .map(|h| h.info().stats.hashrate(now.duration_since(h.connected_at)))
        .sum()
}

/// Pushes the total hashrate into `history` every [`INTERVAL`], starting at once, until `cancel`
/// fires.
pub async fn sample(registry: Arc<ConnectionManager>, history: Arc<History>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        history.push(Sample { t: unix_now(), hashrate: total(&registry) });
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_in_order() {
        let history = History::default();
        for t in 0..(CAPACITY as u64 + 25) {
            history.push(Sample { t, hashrate: t as f64 });
        }
        let samples = history.samples();
        assert_eq!(samples.len(), CAPACITY);
        assert_eq!(samples.first().unwrap().t, 25);
        assert_eq!(samples.last().unwrap().t, CAPACITY as u64 + 24);
        assert!(samples.windows(2).all(|w| w[0].t + 1 == w[1].t), "oldest first, none skipped");
    }

    #[test]
    fn ring_below_capacity() {
        let history = History::default();
        assert!(history.samples().is_empty());
        history.push(Sample { t: 7, hashrate: 1.5 });
        assert_eq!(history.samples(), vec![Sample { t: 7, hashrate: 1.5 }]);
    }

    #[tokio::test(start_paused = true)]
    async fn sampler_sums_authorized_sessions_every_interval() {
        let registry = Arc::new(ConnectionManager::new(10, 0));
        let peer = "127.0.0.1:1".parse().unwrap();
        let worker = registry.register(peer).unwrap();
        let idle = registry.register(peer).unwrap();
        worker.handle.set_phase(Phase::Authorized, registry.now_ms());
        // Difficulty 1 of work: 2^32 hashes. Only the authorized session counts.
        worker.handle.info().stats.record_valid(Duration::ZERO, 1.0, 1.0);
        idle.handle.info().stats.record_valid(Duration::ZERO, 1000.0, 1000.0);

        let history = Arc::new(History::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sample(registry.clone(), history.clone(), cancel.clone()));
        tokio::time::sleep(INTERVAL * 3 + Duration::from_secs(1)).await;
        let samples = history.samples();
        // At 0, 10, 20 and 30 s.
        assert_eq!(samples.len(), 4, "{samples:?}");
        // The session is 30 s old: its one share of work is spread over 30 s.
        assert_eq!(samples[3].hashrate, 4_294_967_296.0 / 30.0);
        assert!(samples.windows(2).all(|w| w[0].t <= w[1].t));

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("the sampler stops").unwrap();
        assert_eq!(history.samples().len(), 4);
    }
}
