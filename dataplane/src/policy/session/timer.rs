//! A hashed timing wheel for idle expiry (sans-io).
//!
//! Sessions are scheduled at their deadline's tick. Traffic does not touch the wheel: when a slot
//! comes round, the table checks each entry's real deadline and reschedules the ones that saw
//! traffic meanwhile. A busy session therefore costs one reschedule per timeout period, and an
//! idle check costs only the entries that are due. Deadlines further away than one revolution sit
//! in their slot and are rescheduled each revolution.

use std::time::{Duration, Instant};

use super::SessionId;

/// Resolution of idle expiry.
pub(crate) const TICK: Duration = Duration::from_millis(100);
const SLOTS: usize = 1024;

pub(crate) struct IdleWheel {
    epoch: Instant,
    /// The next tick to process; ticks before it are done.
    next_tick: u64,
    slots: Vec<Vec<SessionId>>,
    /// A spare vector handed out by `take_due`, so expiry does not allocate in steady state.
    spare: Vec<SessionId>,
}

impl IdleWheel {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            next_tick: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            spare: Vec::new(),
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u64
    }

    /// Schedules `id` to be looked at once `deadline` has passed.
    pub(crate) fn schedule(&mut self, id: SessionId, deadline: Instant) {
        // Round up so an entry is never looked at before its deadline; never schedule into a tick
        // already processed.
        let tick = (self.tick_of(deadline) + 1).max(self.next_tick);
        self.slots[(tick % SLOTS as u64) as usize].push(id);
    }

    /// Takes every entry in the slots whose ticks have passed at `now`. Entries not yet due (one
    /// or more revolutions away) come along too; the caller reschedules them.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<SessionId> {
        let mut due = std::mem::take(&mut self.spare);
        let now_tick = self.tick_of(now);
        // After a long sleep, one revolution visits every slot; further ticks would only revisit.
        let last = now_tick.min(self.next_tick + SLOTS as u64 - 1);
        while self.next_tick <= last {
            due.append(&mut self.slots[(self.next_tick % SLOTS as u64) as usize]);
            self.next_tick += 1;
        }
        self.next_tick = self.next_tick.max(now_tick + 1);
        due
    }

    /// Gives back the vector returned by `take_due`, emptied.
    pub(crate) fn recycle(&mut self, mut spare: Vec<SessionId>) {
        spare.clear();
        self.spare = spare;
    }

    /// Time until the next tick boundary, when `take_due` may find something.
    pub(crate) fn until_next_tick(&self, now: Instant) -> Duration {
        let next = self.epoch + Duration::from_nanos(TICK.as_nanos() as u64 * self.next_tick);
        next.saturating_duration_since(now)
    }
}
