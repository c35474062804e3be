//! The controller's side of a hand-off (SPEC §12): it asks every worker to stop reading and
//! describe its share, tells them how it ended, hands the new process's workers what they
//! adopt, and closes the handed-over listeners nothing claimed.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};

use crate::handoff::share::{Adoption, HandOffEnd, WorkerShare};
use crate::listener::{CloseMode, OpenedListener};

use super::{ControlMsg, Controller, wake};

impl Controller {
    /// Old side: every worker stops reading its listener and upstream sockets and gives its
    /// share, in worker order. If any cannot (or does not answer within `timeout`), every
    /// worker reads again and the reason comes back.
    pub(crate) fn hand_off_freeze(&self, timeout: Duration) -> Result<Vec<WorkerShare>, String> {
        let mut replies = Vec::with_capacity(self.links.len());
        for link in self.links.iter() {
            let (tx, rx) = bounded(1);
            if link.tx.send(ControlMsg::HandOffFreeze(tx)).is_err() {
                self.hand_off_end(HandOffEnd::Failed);
                return Err("a worker has ended".into());
            }
            wake(link);
            replies.push(rx);
        }
        let result = collect(&replies, timeout);
        if result.is_err() {
            self.hand_off_end(HandOffEnd::Failed);
        }
        result
    }

    /// Old side: the successor took over (workers forget their UDP sessions and only finish
    /// TCP), or the hand-off failed (they read again).
    pub(crate) fn hand_off_end(&self, end: HandOffEnd) {
        self.broadcast(|| ControlMsg::HandOffEnd(end));
    }

    /// New side: each worker adopts its share (in worker order) before it reads anything;
    /// returns the sessions adopted, or the first refusal.
    pub(crate) fn adopt(&self, shares: Vec<Adoption>, timeout: Duration) -> Result<usize, String> {
        let mut replies = Vec::with_capacity(shares.len());
        for (link, share) in self.links.iter().zip(shares) {
            let (tx, rx) = bounded(1);
            if link
                .tx
                .send(ControlMsg::Adopt(Box::new(share), tx))
                .is_err()
            {
                return Err("a worker has ended".into());
            }
            wake(link);
            replies.push(rx);
        }
        Ok(collect(&replies, timeout)?.into_iter().sum())
    }

    /// New side: the predecessor has let go; every worker reads what it adopted.
    pub(crate) fn hand_off_go(&self) {
        self.broadcast(|| ControlMsg::HandOffGo);
    }

    /// Closes (draining their sessions) the handed-over listeners that neither the config nor
    /// a reconciler claimed: what the previous process served and this one does not. Returns
    /// how many.
    pub fn release_unclaimed(&self) -> usize {
        let unclaimed: Vec<OpenedListener> = self.registry.lock().unclaimed();
        for listener in &unclaimed {
            log::info!(
                "hand-off: listener {} on {} was not claimed by this process's config or \
                 objects: closed once its sessions end",
                listener.id.0,
                listener.addr
            );
            self.close_listener(listener, CloseMode::Drain);
        }
        unclaimed.len()
    }

    /// Whether handed-over listeners are still waiting to be claimed.
    pub fn has_unclaimed(&self) -> bool {
        !self.registry.lock().unclaimed().is_empty()
    }
}

/// Every worker's answer, in order, by `timeout` from now.
fn collect<T>(
    replies: &[Receiver<Result<T, String>>],
    timeout: Duration,
) -> Result<Vec<T>, String> {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::with_capacity(replies.len());
    for (worker, rx) in replies.iter().enumerate() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(share)) => all.push(share),
            Ok(Err(e)) => return Err(e),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("worker {worker} did not answer within {timeout:?}"));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("worker {worker} has ended"));
            }
        }
    }
    Ok(all)
}
