//! A worker's side of a hand-off (SPEC §12). Old side: it stops reading every listener and
//! upstream socket (TCP sessions keep flowing), describes them and its UDP sessions, and then
//! either forgets its UDP sessions (the successor has them) or reads again (it failed). New
//! side: before reading anything, it adopts the listeners under their old ids, the upstream
//! sockets under their old numbers, and the sessions on them.

use std::time::Instant;

use crate::handoff::share::{Adoption, HandOffEnd, WorkerShare};

use super::Worker;

impl Worker {
    /// Stops reading and describes this worker's share; on an error reads again and says why.
    pub(super) fn hand_off_freeze(&mut self, now: Instant) -> Result<WorkerShare, String> {
        // Replies queued for clients leave first; grants in the channel are looked at.
        self.udp.send_replies(&self.listeners, &self.out);
        let registry = self.poll.registry();
        self.frozen = true;
        let share = (|| {
            let listeners = self.listeners.freeze(registry)?;
            let pools = self.sessions.freeze_pool(registry)?;
            Ok::<_, std::io::Error>((listeners, pools))
        })();
        let (listeners, pools) = match share {
            Ok(share) => share,
            Err(e) => {
                self.hand_off_end(HandOffEnd::Failed);
                return Err(format!("worker {}: {e}", self.out.id()));
            }
        };
        let grants = if self.out.id() == 0 {
            self.admission.export_grants(now)
        } else {
            Vec::new()
        };
        Ok(WorkerShare {
            listeners,
            pools,
            sessions: self.sessions.export_udp(now),
            grants,
        })
    }

    /// The hand-off is over: forget the UDP sessions the successor took, or read again.
    pub(super) fn hand_off_end(&mut self, end: HandOffEnd) {
        if !self.frozen {
            return;
        }
        let registry = self.poll.registry();
        match end {
            HandOffEnd::Taken => {
                let n = self
                    .sessions
                    .forget_udp(&mut self.listeners, registry, &self.out);
                log::info!(
                    "worker {}: {n} UDP sessions handed over; TCP sessions finish here",
                    self.out.id()
                );
                // Stays frozen: its listener and upstream sockets are the successor's.
                self.handed_over = true;
            }
            HandOffEnd::Failed => {
                self.listeners.thaw(registry);
                self.sessions.thaw_pool(registry);
                self.frozen = false;
            }
        }
    }

    /// Takes over the previous process's listeners, upstream sockets and UDP sessions.
    pub(super) fn adopt(&mut self, adoption: Adoption, now: Instant) -> Result<usize, String> {
        let registry = self.poll.registry();
        let Adoption {
            listeners,
            pools,
            sessions,
        } = adoption;
        for l in listeners {
            self.listeners
                .open(registry, l.id, l.socket, l.kind, l.idle_timeout, l.counters);
        }
        self.sessions
            .adopt(
                sessions,
                pools,
                &mut self.listeners,
                registry,
                &self.out,
                now,
            )
            .map_err(|e| format!("worker {}: {e}", self.out.id()))
    }
}
