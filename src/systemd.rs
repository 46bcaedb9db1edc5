//! systemd integration for `Type=notify` units (`config/systemd/`):
//! `READY=1` once a command serves, `WATCHDOG=1` pings while its runtime
//! runs, `STOPPING=1` on the way out.
//!
//! Every call is a no-op outside systemd (no `$NOTIFY_SOCKET`), so the
//! commands call these unconditionally. The watchdog pings come from a
//! task on the command's tokio runtime: if that runtime stalls (a stuck
//! worker, a deadlock), the pings stop and systemd restarts the unit,
//! which is what `WatchdogSec=` is for.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd this command serves, with a one-line status for
/// `systemctl status`.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd this command is shutting down (so a slow drain is not
/// mistaken for a hang).
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// The interval between watchdog pings: half of `WatchdogSec=`, as
/// sd_watchdog_enabled(3) advises. `None` when the unit has no watchdog
/// (systemd sets `$WATCHDOG_USEC` and `$WATCHDOG_PID`; without the
/// latter, or when it names another process, there is no watchdog).
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from the current tokio runtime for as long as the
/// runtime lives, if the unit asked for a watchdog.
pub fn spawn_watchdog() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tracing::info!(every = ?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    });
}
