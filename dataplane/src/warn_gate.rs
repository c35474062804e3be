//! Rate limit for the warnings a client can trigger (bad control packets, sessions that cannot
//! be opened): a flood of them must not become a flood of log lines. Every event is still
//! counted in the metrics; the log gets at most one line per interval per worker, which says
//! how many were left out since the last.

use std::time::{Duration, Instant};

/// One warning per this interval, per worker.
pub(crate) const WARN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
/// At most one warning per interval; counts what it holds back.
pub struct WarnGate {
    next: Option<Instant>,
    suppressed: u64,
}

impl Default for WarnGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WarnGate {
    /// A gate that admits the first warning.
    pub const fn new() -> Self {
        Self {
            next: None,
            suppressed: 0,
        }
    }

    /// Whether a warning may be logged at `now`; if so, a note of how many were suppressed
    /// before it (empty when none).
    pub fn admit(&mut self, now: Instant) -> Option<String> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + WARN_INTERVAL);
        let note = match std::mem::take(&mut self.suppressed) {
            0 => String::new(),
            n => format!(" ({n} similar warnings suppressed in the last interval)"),
        };
        Some(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_with_a_count_of_the_rest() {
        let mut gate = WarnGate::new();
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0).as_deref(), Some(""));
        for i in 1..=5 {
            assert_eq!(gate.admit(t0 + Duration::from_millis(i * 100)), None);
        }
        let later = t0 + WARN_INTERVAL;
        assert_eq!(
            gate.admit(later).as_deref(),
            Some(" (5 similar warnings suppressed in the last interval)")
        );
        assert_eq!(gate.admit(later), None);
        assert_eq!(
            gate.admit(later + WARN_INTERVAL).as_deref(),
            Some(" (1 similar warnings suppressed in the last interval)")
        );
    }
}
