//! What a `handoff` round's replies say, worked out once the round is over: the datagrams of
//! the load answered and lost, the round trips before and after B started, the longest
//! silence in the merged reply timeline across the hand-off (and before it, for comparison),
//! and the sessions that did not come through: silent after the hand-off, or answered from
//! another upstream port (opened again: a new player to the game server).

use hdrhistogram::Histogram;

use super::traffic::{CHECK, LOAD, Reply, SETUP};

/// The moments of a round, in nanoseconds since its origin.
#[derive(Clone, Copy, Debug)]
pub(super) struct Moments {
    pub(super) load_start: u64,
    /// When B was started: the hand-off window opens here.
    pub(super) handoff: u64,
    pub(super) load_end: u64,
    /// A datagram of the load not answered by `load_end + grace` is lost.
    pub(super) grace: u64,
}

/// The figures of one round's traffic.
#[derive(Debug)]
pub(super) struct Figures {
    /// Sessions whose setup datagram came back.
    pub(super) established: usize,
    pub(super) sent: usize,
    pub(super) received: usize,
    pub(super) lost: usize,
    pub(super) sent_after: usize,
    pub(super) lost_after: usize,
    /// Replies to a datagram already answered.
    pub(super) duplicates: usize,
    /// Established sessions with no reply to any datagram sent after B started (load or
    /// check, retries included).
    pub(super) silent_sessions: usize,
    /// Established sessions answered after the hand-off from another upstream port than at
    /// setup.
    pub(super) moved_sessions: usize,
    /// The longest time with no reply at all between the last reply before B started and
    /// the load's end, and when it began (ns since B started; negative: before).
    pub(super) gap_ns: u64,
    pub(super) gap_from_ns: i64,
    /// The same over the load before B started.
    pub(super) gap_before_ns: u64,
    /// The sender's longest pause over the hand-off window (a gap in replies that the sender
    /// made is not the proxy's).
    pub(super) send_pause_ns: u64,
    /// Round trips of datagrams sent before B started, and from then on (ns).
    pub(super) rtt_before: Histogram<u64>,
    pub(super) rtt_after: Histogram<u64>,
}

impl Figures {
    /// `sent`: the load's send times by sequence; `replies`: every receiver's.
    pub(super) fn of(
        sessions: usize,
        sent: &[u64],
        replies: &[Reply],
        m: Moments,
    ) -> anyhow::Result<Self> {
        let mut setup_port: Vec<Option<u16>> = vec![None; sessions];
        let mut answered_at: Vec<Option<u64>> = vec![None; sent.len()];
        let mut duplicates = 0;
        let mut heard_after = vec![false; sessions];
        let mut moved = vec![false; sessions];
        // Setup replies first: a session's port is the one its first reply showed.
        let mut ordered: Vec<&Reply> = replies.iter().collect();
        ordered.sort_by_key(|r| r.at);
        for r in &ordered {
            let s = r.session as usize;
            if s >= sessions {
                continue;
            }
            match r.kind {
                SETUP => {
                    setup_port[s].get_or_insert(r.port);
                }
                LOAD => {
                    let Some(slot) = answered_at.get_mut(r.seq as usize) else {
                        continue;
                    };
                    if slot.is_some() {
                        duplicates += 1;
                        continue;
                    }
                    *slot = Some(r.at);
                }
                _ => {}
            }
        }
        for r in &ordered {
            let s = r.session as usize;
            if s >= sessions {
                continue;
            }
            let after = match r.kind {
                LOAD => sent.get(r.seq as usize).is_some_and(|&t| t >= m.handoff),
                CHECK => true,
                _ => false,
            };
            if after {
                heard_after[s] = true;
                if setup_port[s].is_some_and(|p| p != r.port) {
                    moved[s] = true;
                }
            }
        }
        let established = setup_port.iter().filter(|p| p.is_some()).count();
        let silent_sessions = (0..sessions)
            .filter(|&s| setup_port[s].is_some() && !heard_after[s])
            .count();
        let moved_sessions = moved.iter().filter(|m| **m).count();

        let deadline = m.load_end + m.grace;
        let in_time = |a: &Option<u64>| a.is_some_and(|t| t <= deadline);
        let received = answered_at.iter().filter(|a| in_time(a)).count();
        let after: Vec<usize> = (0..sent.len()).filter(|&k| sent[k] >= m.handoff).collect();
        let lost_after = after.iter().filter(|&&k| !in_time(&answered_at[k])).count();

        let mut rtt_before = Histogram::<u64>::new(3)?;
        let mut rtt_after = Histogram::<u64>::new(3)?;
        for (k, a) in answered_at.iter().enumerate() {
            if let Some(at) = a {
                let rtt = at.saturating_sub(sent[k]).max(1);
                if sent[k] < m.handoff {
                    rtt_before.record(rtt)?;
                } else {
                    rtt_after.record(rtt)?;
                }
            }
        }
        let mut times: Vec<u64> = answered_at.iter().flatten().copied().collect();
        times.sort_unstable();
        let (gap_ns, gap_start) = longest_gap(&times, m.handoff, m.load_end);
        let (gap_before_ns, _) = longest_gap(&times, m.load_start, m.handoff);
        let (send_pause_ns, _) = longest_gap(sent, m.handoff, m.load_end);
        Ok(Self {
            established,
            sent: sent.len(),
            received,
            lost: sent.len() - received,
            sent_after: after.len(),
            lost_after,
            duplicates,
            silent_sessions,
            moved_sessions,
            gap_ns,
            gap_from_ns: gap_start as i64 - m.handoff as i64,
            gap_before_ns,
            send_pause_ns,
            rtt_before,
            rtt_after,
        })
    }

    /// Sessions lost: silent after the hand-off, or opened again.
    pub(super) fn lost_sessions(&self) -> usize {
        self.silent_sessions + self.moved_sessions
    }
}

/// The longest interval with no event in `times` (sorted) over `[from, to]`: from the last
/// event before `from` (or `from`) to the last one before `to`, then to `to` (the silence
/// after the load's end is not a gap). Returns its length and where it began; the first of
/// equal ones.
pub(super) fn longest_gap(times: &[u64], from: u64, to: u64) -> (u64, u64) {
    let first = times.partition_point(|&t| t < from);
    let last = times.partition_point(|&t| t <= to).max(first);
    let mut points = Vec::with_capacity(last - first + 2);
    points.push(first.checked_sub(1).map_or(from, |i| times[i]));
    points.extend_from_slice(&times[first..last]);
    points.push(to);
    let mut best = (0, from);
    for w in points.windows(2) {
        let gap = w[1].saturating_sub(w[0]);
        if gap > best.0 {
            best = (gap, w[0]);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_spans_the_window_edges() {
        // Replies every 10 until 100, then nothing until 180, then every 10.
        let times: Vec<u64> = (0..=10)
            .map(|i| i * 10)
            .chain((0..5).map(|i| 180 + i * 10))
            .collect();
        assert_eq!(longest_gap(&times, 95, 230), (80, 100));
        // The window opens in the silence: it still counts from the last reply before.
        assert_eq!(longest_gap(&times, 150, 230), (80, 100));
        // Nothing until the window's end: the silence runs to the end.
        assert_eq!(longest_gap(&times, 0, 400), (180, 220));
        assert_eq!(longest_gap(&[], 10, 50), (40, 10));
        // The first of equal gaps.
        assert_eq!(longest_gap(&times, 0, 90), (10, 0));
    }

    fn reply(kind: u8, session: u32, seq: u64, port: u16, at: u64) -> Reply {
        Reply {
            kind,
            session,
            seq,
            port,
            at,
        }
    }

    #[test]
    fn sessions_silent_or_moved_after_the_hand_off_are_lost() {
        let m = Moments {
            load_start: 100,
            handoff: 200,
            load_end: 300,
            grace: 50,
        };
        // Load: seq k to session k % 3, sent at 100 + 40k: 100 140 180 | 220 260.
        let sent = [100, 140, 180, 220, 260];
        let replies = [
            reply(SETUP, 0, 0, 5000, 10),
            reply(SETUP, 1, 0, 5001, 11),
            reply(SETUP, 2, 0, 5002, 12),
            reply(LOAD, 0, 0, 5000, 101),
            reply(LOAD, 1, 1, 5001, 141),
            reply(LOAD, 1, 1, 5001, 142),
            // seq 2 (session 2) never answered; seq 3 (session 0) late, after the grace.
            reply(LOAD, 0, 3, 5000, 400),
            reply(LOAD, 1, 4, 5009, 262),
            reply(CHECK, 0, 0, 5000, 500),
        ];
        let f = Figures::of(3, &sent, &replies, m).unwrap();
        assert_eq!(f.established, 3);
        assert_eq!((f.sent, f.received, f.lost), (5, 3, 2));
        assert_eq!((f.sent_after, f.lost_after), (2, 1));
        assert_eq!(f.duplicates, 1);
        // Session 2: nothing after; session 1: answered from another port.
        assert_eq!((f.silent_sessions, f.moved_sessions), (1, 1));
        assert_eq!(f.lost_sessions(), 2);
        // Replies at 101 141 262 400: across [200, 300] the silence is 141 → 262 (the late
        // one at 400 is after the window).
        assert_eq!(f.gap_ns, 121);
        assert_eq!(f.gap_from_ns, -59);
        assert_eq!(f.rtt_before.len(), 2);
        assert_eq!(f.rtt_after.len(), 2);
    }
}
