//! A worker's side of a hand-off (SPEC §12). Old side: it stops reading every listener and
//! upstream socket (TCP sessions keep flowing) and defers what would change its listeners or
//! UDP sessions, describes them, and then either lets go of them (the successor has them) or
//! reads again and applies what it deferred (it failed). New side: before reading anything, it
//! adopts the listeners under their old ids, the upstream sockets under their old numbers, the
//! sessions on them and the grants, and reads only once the predecessor has let go.

use std::io;
use std::time::Instant;

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::ctl::ControlMsg;
use crate::handoff::share::{Adoption, HandOffEnd, WorkerShare};

use super::Worker;

impl Worker {
    /// Stops reading and describes this worker's share; on an error reads again and says why.
    pub(super) fn hand_off_freeze(&mut self, now: Instant) -> Result<WorkerShare, String> {
        // Replies queued for clients leave first.
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
                self.hand_off_end(HandOffEnd::Failed, now);
                return Err(format!("worker {}: {e}", self.out.id()));
            }
        };
        let (grants, default) = if self.out.id() == 0 {
            (
                self.admission.export_grants(now),
                self.admission
                    .default_backend()
                    .map(crate::handoff::wire_backend),
            )
        } else {
            (Vec::new(), None)
        };
        Ok(WorkerShare {
            listeners,
            pools,
            sessions: self.sessions.export_udp(now),
            grants,
            default,
        })
    }

    /// Whether `msg` must wait while a hand-off holds the sockets: it would change a listener
    /// or a UDP session after they were described.
    pub(super) fn defers(&self, msg: &ControlMsg) -> bool {
        self.frozen
            && !self.handed_over
            && matches!(
                msg,
                ControlMsg::OpenListener { .. }
                    | ControlMsg::UpdateListener { .. }
                    | ControlMsg::CloseListener { .. }
                    | ControlMsg::RemoveBackend(_)
                    | ControlMsg::KillSessions(..)
            )
    }

    /// The hand-off is over: let go of the listeners, upstream sockets and UDP sessions the
    /// successor took, or read again.
    pub(super) fn hand_off_end(&mut self, end: HandOffEnd, now: Instant) {
        if !self.frozen || self.handed_over {
            return;
        }
        let registry = self.poll.registry();
        let deferred = std::mem::take(&mut self.deferred);
        match end {
            HandOffEnd::Taken => {
                let n = self
                    .sessions
                    .forget_udp(&mut self.listeners, registry, &self.out);
                // This process's copies of the sockets go: were the successor to die, a
                // process after it binds afresh rather than beside sockets nobody reads.
                self.listeners.drop_all(registry);
                self.sessions.drop_pool(registry, &self.out);
                log::info!(
                    "worker {}: {n} UDP sessions handed over; TCP sessions finish here",
                    self.out.id()
                );
                self.handed_over = true;
                // What control asked meanwhile concerned what the successor now owns; a
                // listener close still releases its port.
                for msg in deferred {
                    if let ControlMsg::CloseListener { closing, .. } = msg {
                        closing.join(0);
                        closing.release();
                    }
                }
            }
            HandOffEnd::Failed => {
                self.listeners.resume(registry);
                self.sessions.resume_pool(registry);
                self.frozen = false;
                for msg in deferred {
                    self.apply_control(msg, now);
                }
            }
        }
    }

    /// Takes over the previous process's listeners, upstream sockets, UDP sessions and
    /// grants; reads none of it until [`Self::hand_off_go`].
    pub(super) fn adopt(&mut self, adoption: Adoption, now: Instant) -> Result<usize, String> {
        self.frozen = true;
        let registry = self.poll.registry();
        let Adoption {
            listeners,
            pools,
            sessions,
            grants,
            default,
        } = adoption;
        for l in listeners {
            self.listeners
                .open(registry, l.id, l.socket, l.kind, l.idle_timeout, l.counters);
        }
        self.admission.adopt_grants(&grants);
        if default.is_some() {
            self.admission.set_default(default);
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

    /// The predecessor has let go: read everything adopted, from what waited meanwhile on,
    /// and apply what control asked meanwhile (the data ports' claims, a listener that was
    /// closing there).
    pub(super) fn hand_off_go(&mut self, now: Instant) {
        if !self.frozen {
            return;
        }
        let registry = self.poll.registry();
        // Registered at adoption, their readiness was collected and passed over since:
        // re-arming reports what is waiting now.
        self.listeners.resume(registry);
        self.sessions.resume_pool(registry);
        self.frozen = false;
        for msg in std::mem::take(&mut self.deferred) {
            self.apply_control(msg, now);
        }
    }
}

/// Reads `source` again from what waits in it now, whether it was deregistered (frozen, then
/// the hand-off failed; a freeze that failed part-way left some registered) or registered with
/// its readiness passed over (adopted, then the predecessor let go): a re-registration reports
/// a socket that is readable already.
pub(super) fn read_again<S: Source + ?Sized>(
    registry: &Registry,
    source: &mut S,
    token: Token,
) -> io::Result<()> {
    match registry.reregister(source, token, Interest::READABLE) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            registry.register(source, token, Interest::READABLE)
        }
        armed => armed,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mio::{Events, Poll};

    use super::*;

    /// Whether `poll` reports `token` within a short wait.
    fn reported(poll: &mut Poll, token: Token) -> bool {
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_millis(200)))
            .unwrap();
        events.iter().any(|e| e.token() == token)
    }

    #[test]
    fn read_again_reports_what_waits_whether_registered_or_not() {
        let mut poll = Poll::new().unwrap();
        let mut socket = mio::net::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(b"waiting", socket.local_addr().unwrap())
            .unwrap();
        let token = Token(7);
        // Registered, and its readiness collected and passed over (adopted, not read).
        poll.registry()
            .register(&mut socket, token, Interest::READABLE)
            .unwrap();
        assert!(reported(&mut poll, token));
        assert!(!reported(&mut poll, token), "edge triggered: reported once");
        read_again(poll.registry(), &mut socket, token).unwrap();
        assert!(reported(&mut poll, token), "re-armed: the waiting datagram");
        // Deregistered (frozen), then the hand-off failed.
        poll.registry().deregister(&mut socket).unwrap();
        assert!(!reported(&mut poll, token));
        read_again(poll.registry(), &mut socket, token).unwrap();
        assert!(
            reported(&mut poll, token),
            "registered again: the waiting datagram"
        );
    }
}
