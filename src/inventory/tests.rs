//! The inventory's states, counts and hashrates, without sockets.

use super::*;

#[test]
fn decay_converges_to_the_rate() {
    let mut average = 0.0;
    for _ in 0..10_000 {
        average = decay(average, 2.0, 2.0, 600.0);
    }
    assert!((average - 1.0).abs() < 1e-9, "{average}");
    // Nothing for many time constants: back to nothing.
    assert!(decay(average, 0.0, 6000.0, 600.0) < 1e-4);
}

#[test]
fn states_follow_sessions_grace_and_shares() {
    let timing = Timing { stale_after: 900, offline_after: 60, forget_after: 86_400 };
    let mut w = Worker::new(1000);
    w.sessions = 1;
    w.state = WorkerState::Online;
    assert_eq!(w.judged(1899, &timing), WorkerState::Online);
    assert_eq!(w.judged(1900, &timing), WorkerState::Stale, "no share since the authorize");
    w.last_share = 1800;
    assert_eq!(w.judged(1900, &timing), WorkerState::Online);
    w.sessions = 0;
    w.last_seen = 1900;
    assert_eq!(w.judged(1959, &timing), WorkerState::Online, "within the grace");
    assert_eq!(w.judged(1960, &timing), WorkerState::Offline);
    w.state = WorkerState::NeverSeen;
    assert_eq!(w.judged(5000, &timing), WorkerState::NeverSeen);
}

#[test]
fn reconnects_count_over_24_hours() {
    let mut w = Worker::new(0);
    for hour in [0u32, 1, 1, 23, 24] {
        w.roll_reconnects(hour * 3600);
        w.reconnects[0] += 1;
    }
    assert_eq!(w.reconnects_24h(24 * 3600), 4, "the one in hour 0 is past 24 hours");
    assert_eq!(w.reconnects_24h(47 * 3600), 1);
    assert_eq!(w.reconnects_24h(48 * 3600), 0);
}

/// The size a worker costs: 192 bytes, boxed, beside a 24-byte map entry and its name; the
/// budget is about 360 bytes a worker.
#[test]
fn a_worker_is_small() {
    assert!(std::mem::size_of::<Worker>() <= 192, "{}", std::mem::size_of::<Worker>());
}
