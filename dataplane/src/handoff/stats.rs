//! What the hand-offs of this process did, for the metrics (SPEC §12): both sides count.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a hand-off ended, as the `result` label says it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum HandOffResult {
    /// Old side: the successor took everything.
    HandedOver,
    /// New side: this process took over from its predecessor.
    TookOver,
    /// Old side: refused (a restart key differs, a version it cannot write).
    Refused,
    /// Either side: it failed half-way (a peer gone, a malformed stream, a timeout).
    Failed,
}

impl HandOffResult {
    /// Every result, in label order.
    pub const ALL: [Self; 4] = [
        Self::HandedOver,
        Self::TookOver,
        Self::Refused,
        Self::Failed,
    ];

    /// The `result` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HandedOver => "handed_over",
            Self::TookOver => "took_over",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// This process's hand-offs, either side.
#[derive(Debug, Default)]
pub struct HandOffStats {
    results: [AtomicU64; 4],
    sessions: AtomicU64,
    descriptors: AtomicU64,
    gap_micros: AtomicU64,
}

impl HandOffStats {
    /// A hand-off ended with `result`.
    pub fn count(&self, result: HandOffResult) {
        self.results[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A hand-off moved `sessions` UDP sessions and `descriptors` sockets, with `gap` between
    /// the old process's last read and the new one's first.
    pub fn record(&self, sessions: usize, descriptors: usize, gap: std::time::Duration) {
        self.sessions.fetch_add(sessions as u64, Ordering::Relaxed);
        self.descriptors
            .fetch_add(descriptors as u64, Ordering::Relaxed);
        self.gap_micros.store(
            u64::try_from(gap.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Hand-offs that ended with `result`.
    pub fn results(&self, result: HandOffResult) -> u64 {
        self.results[result as usize].load(Ordering::Relaxed)
    }

    /// UDP sessions handed over or taken over, in all.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Sockets handed over or taken over, in all.
    pub fn descriptors(&self) -> u64 {
        self.descriptors.load(Ordering::Relaxed)
    }

    /// The last hand-off's gap, in seconds (0 before any).
    pub fn last_gap_seconds(&self) -> f64 {
        self.gap_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}
