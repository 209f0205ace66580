//! systemd `Type=notify` support: readiness once the ports are bound, the stop notice when the
//! drain starts, and watchdog pings.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every function does nothing. The environment is left
//! as it is: `sd_notify`'s `*_and_unset_env` variants are `unsafe` once threads exist, and this
//! process starts no children that could inherit the variables.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Tells systemd the listeners are bound; `status` is what `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the drain has started, so the unit shows as deactivating while sessions finish
/// rather than as a running service that stopped answering.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining sessions")]);
}

/// Starts pinging the watchdog when the unit sets `WatchdogSec=`; `None` when it does not or when
/// there is no `NOTIFY_SOCKET` to ping. The task ends when `cancel` fires.
pub fn spawn_watchdog(cancel: CancellationToken) -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    // `watchdog_enabled` also checks `WATCHDOG_PID`, when set, against our own pid.
    let period = ping_period(sd_notify::watchdog_enabled())?;
    tracing::debug!(?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        // After a stall, one ping is enough; a burst of catch-up pings tells systemd nothing.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match sd_notify::notify(&[NotifyState::Watchdog]) {
                Ok(()) => failing = false,
                // Warn once per outage, not on every tick.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "systemd watchdog ping failed");
                }
                Err(e) => tracing::debug!(error = %e, "systemd watchdog ping failed"),
            }
        }
    }))
}

/// Half the watchdog timeout, as sd_watchdog_enabled(3) advises, so one late ping is not fatal.
/// A zero timeout means no watchdog (and `tokio::time::interval` rejects a zero period).
fn ping_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| t / 2)
}

/// `sd_notify::notify` is a no-op without `NOTIFY_SOCKET`, so an error here means systemd asked
/// for notifications and did not get them: worth a warning.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_period_is_half_the_timeout() {
        let cases = [
            (None, None),
            (Some(Duration::ZERO), None),
            (Some(Duration::from_secs(30)), Some(Duration::from_secs(15))),
            (Some(Duration::from_micros(200_000)), Some(Duration::from_millis(100))),
        ];
        for (timeout, want) in cases {
            assert_eq!(ping_period(timeout), want, "{timeout:?}");
        }
    }
}
