//! The policy table (errno × policy → action) and the retry timeout rule, pure.

use std::time::Duration;

use thinblk_vhost::FaultAction;

/// One error policy (`--werror` / `--rerror`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorPolicy {
    /// Complete the request with an IO error.
    Report,
    /// Complete the request as a success (data lost; logged loudly).
    Ignore,
    /// Park ENOSPC until the volume grows or an operator says `cont`; report the rest.
    Enospc,
    /// Park every failed request until an operator says `cont`.
    Stop,
    /// Park and resubmit every `retry_interval`; report after `retry_timeout`.
    Retry,
}

impl ErrorPolicy {
    /// The QMP-style name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Enospc => "enospc",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Retry => "retry",
        }
    }

    /// Parses a QMP-style name.
    pub fn parse(s: &str) -> Option<ErrorPolicy> {
        [ErrorPolicy::Report, ErrorPolicy::Ignore, ErrorPolicy::Enospc, ErrorPolicy::Stop, ErrorPolicy::Retry]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// Default retry interval (openEuler `retry_interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(1000);
/// Longest accepted retry interval or timeout.
pub const MAX_MS: u64 = 24 * 3600 * 1000;

/// The policies of one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Writes, flushes, discards, write-zeroes.
    pub werror: ErrorPolicy,
    /// Reads.
    pub rerror: ErrorPolicy,
    /// Resubmission period of parked requests under `retry`.
    pub interval: Duration,
    /// Give up (report) after this long since the first failure; zero: never.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { werror: ErrorPolicy::Enospc, rerror: ErrorPolicy::Report, interval: DEFAULT_INTERVAL, timeout: Duration::ZERO }
    }
}

/// Invalid policy settings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Retry parameters given without a retry policy (as openEuler QEMU refuses them).
    #[error("--retry-interval and --retry-timeout are only supported with --werror retry or --rerror retry")]
    RetryParamsWithoutRetry,
    /// Interval out of range.
    #[error("retry interval {0} ms is outside 1..={MAX_MS}")]
    Interval(u64),
    /// Timeout out of range.
    #[error("retry timeout {0} ms is outside 0..={MAX_MS}")]
    Timeout(u64),
}

impl Settings {
    /// Checks and builds settings; `interval_ms` / `timeout_ms` are `None` when not given.
    pub fn new(
        werror: ErrorPolicy,
        rerror: ErrorPolicy,
        interval_ms: Option<u64>,
        timeout_ms: Option<u64>,
    ) -> Result<Settings, SettingsError> {
        let retry = werror == ErrorPolicy::Retry || rerror == ErrorPolicy::Retry;
        if !retry && (interval_ms.is_some() || timeout_ms.is_some()) {
            return Err(SettingsError::RetryParamsWithoutRetry);
        }
        let interval = interval_ms.unwrap_or(DEFAULT_INTERVAL.as_millis() as u64);
        if interval == 0 || interval > MAX_MS {
            return Err(SettingsError::Interval(interval));
        }
        let timeout = timeout_ms.unwrap_or(0);
        if timeout > MAX_MS {
            return Err(SettingsError::Timeout(timeout));
        }
        Ok(Settings { werror, rerror, interval: Duration::from_millis(interval), timeout: Duration::from_millis(timeout) })
    }
}

/// The action for a failure with `errno` under `policy`. For `retry`, `since_first` is the
/// time since the disk's first unrecovered failure: past `timeout` (non-zero) it is reported.
pub fn decide(policy: ErrorPolicy, errno: i32, since_first: Duration, timeout: Duration) -> FaultAction {
    match policy {
        ErrorPolicy::Report => FaultAction::Report,
        ErrorPolicy::Ignore => FaultAction::Ignore,
        ErrorPolicy::Stop => FaultAction::Park,
        ErrorPolicy::Enospc if errno == libc::ENOSPC => FaultAction::Park,
        ErrorPolicy::Enospc => FaultAction::Report,
        ErrorPolicy::Retry if !timeout.is_zero() && since_first > timeout => FaultAction::Report,
        ErrorPolicy::Retry => FaultAction::Park,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_table() {
        use ErrorPolicy as P;
        use FaultAction as A;
        let z = Duration::ZERO;
        let table = [
            (P::Report, libc::ENOSPC, A::Report),
            (P::Report, libc::EIO, A::Report),
            (P::Ignore, libc::ENOSPC, A::Ignore),
            (P::Ignore, libc::EIO, A::Ignore),
            (P::Stop, libc::ENOSPC, A::Park),
            (P::Stop, libc::EIO, A::Park),
            (P::Enospc, libc::ENOSPC, A::Park),
            (P::Enospc, libc::EIO, A::Report),
            (P::Enospc, libc::EROFS, A::Report),
            (P::Retry, libc::ENOSPC, A::Park),
            (P::Retry, libc::EIO, A::Park),
        ];
        for (p, errno, want) in table {
            assert_eq!(decide(p, errno, z, z), want, "{p:?} errno {errno}");
        }
    }

    #[test]
    fn retry_reports_only_strictly_after_the_timeout_and_never_with_zero() {
        let t = Duration::from_millis(5000);
        assert_eq!(decide(ErrorPolicy::Retry, libc::EIO, Duration::from_millis(5000), t), FaultAction::Park);
        assert_eq!(decide(ErrorPolicy::Retry, libc::EIO, Duration::from_millis(5001), t), FaultAction::Report);
        assert_eq!(decide(ErrorPolicy::Retry, libc::EIO, Duration::from_secs(86_400), Duration::ZERO), FaultAction::Park);
    }

    #[test]
    fn settings_validation() {
        use ErrorPolicy::*;
        assert_eq!(Settings::new(Enospc, Report, None, None), Ok(Settings::default()));
        assert_eq!(Settings::new(Enospc, Report, Some(500), None), Err(SettingsError::RetryParamsWithoutRetry));
        assert_eq!(Settings::new(Report, Report, None, Some(0)), Err(SettingsError::RetryParamsWithoutRetry));
        assert_eq!(Settings::new(Retry, Report, Some(0), None), Err(SettingsError::Interval(0)));
        assert_eq!(Settings::new(Report, Retry, None, Some(MAX_MS + 1)), Err(SettingsError::Timeout(MAX_MS + 1)));
        let s = Settings::new(Retry, Retry, Some(250), Some(5000)).unwrap();
        assert_eq!((s.interval, s.timeout), (Duration::from_millis(250), Duration::from_secs(5)));
        assert_eq!(ErrorPolicy::parse("enospc"), Some(Enospc));
        assert_eq!(ErrorPolicy::parse("auto"), None);
    }
}
