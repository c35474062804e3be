//! What `handoff` prints: per round a few human lines and one JSON line, then a summary over
//! the rounds with the goals, met or not.

use hdrhistogram::Histogram;

use super::{GAP_GOAL, HandOffArgs, Round};

/// The load the goals are stated for (SPEC §12).
const GOAL_SESSIONS: usize = 10_000;
const GOAL_RATE: f64 = 1000.0;

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A percentile of a histogram of nanoseconds, in µs (0 when empty).
fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

impl Round {
    pub(super) fn print(&self, args: &HandOffArgs) {
        let f = &self.figures;
        let label = format!("{}#{}", args.label, self.n);
        println!(
            "{label}: {} sessions over {} forwarders ({} established in {:.2} s), {} datagrams/s, \
             B started after {} s of load, {} s more; load average {}, {} rustc running",
            args.sessions,
            args.backends,
            f.established,
            self.setup_seconds,
            args.rate,
            args.before,
            args.after,
            self.load_average,
            self.rustc_processes
        );
        println!(
            "  replies: longest gap across the hand-off {:.1} ms (from {:+.1} ms after B started); \
             before it {:.1} ms; the sender's longest pause after B started {:.1} ms",
            ms(f.gap_ns),
            f.gap_from_ns as f64 / 1e6,
            ms(f.gap_before_ns),
            ms(f.send_pause_ns)
        );
        println!(
            "  datagrams: {} sent, {} answered, {} lost (after B started: {} sent, {} lost); \
             {} duplicates, {} misdelivered, {} send errors, {} socket errors",
            f.sent,
            f.received,
            f.lost,
            f.sent_after,
            f.lost_after,
            f.duplicates,
            self.misdelivered,
            self.send_errors,
            self.socket_errors
        );
        println!(
            "  sessions: {} lost ({} silent after the hand-off, {} answered from another upstream \
             port); the check after: {} of {} answered at the first try, {} with retries",
            f.lost_sessions(),
            f.silent_sessions,
            f.moved_sessions,
            self.checked_first,
            args.sessions,
            self.checked
        );
        println!(
            "  round trip: before p50 {:.0} µs p99 {:.0} max {:.0}; after p50 {:.0} µs p99 {:.0} max {:.0}",
            us(&f.rtt_before, 0.5),
            us(&f.rtt_before, 0.99),
            us(&f.rtt_before, 1.0),
            us(&f.rtt_after, 0.5),
            us(&f.rtt_after, 0.99),
            us(&f.rtt_after, 1.0)
        );
        println!(
            "  A: {}; {}",
            self.a_said
                .map_or("no \"handed over\" line in its log".into(), |h| format!(
                    "handed over {} UDP sessions and {} sockets, the gap was {:.1} ms (its log)",
                    h.sessions,
                    h.sockets,
                    h.gap.as_secs_f64() * 1e3
                )),
            match (self.a_exit_ms, self.a_status) {
                (Some(t), Some(s)) => format!("exited {t:.0} ms after B started ({s})"),
                _ => "did NOT exit".into(),
            }
        );
        let m = &self.b_metrics;
        println!(
            "  B: listening {:.0} ms after it started; {}; metrics: handoff sessions {}, \
             descriptors {}, took_over {}, UDP sessions it opened itself {}, active {}",
            self.b_listening_ms,
            m.gap_seconds
                .map_or("no gap in its metrics".into(), |g| format!(
                    "A told it the gap was {:.1} ms",
                    g * 1e3
                )),
            opt(m.handoff_sessions),
            opt(m.handoff_descriptors),
            opt(m.took_over),
            opt(m.created),
            opt(m.active)
        );
        for p in self.problems.iter().take(10) {
            println!("  proxy: {p}");
        }
        if self.problems.len() > 10 {
            println!("  proxy: … {} more", self.problems.len() - 10);
        }
        if let Some(dir) = &self.kept {
            println!("  configs and logs kept in {}", dir.display());
        }
        let [sessions_met, datagrams_met, gap_met] = self.goals();
        // In parts: one `json!` this long exceeds the macro recursion limit.
        let mut line = serde_json::json!({
            "label": args.label, "round": self.n, "sessions": args.sessions,
            "backends": args.backends, "rate": args.rate, "before_seconds": args.before,
            "after_seconds": args.after, "proxy_workers": args.proxy_workers,
            "established": f.established, "setup_seconds": self.setup_seconds,
            "sent": f.sent, "received": f.received, "lost": f.lost,
            "sent_after": f.sent_after, "lost_after": f.lost_after,
            "duplicates": f.duplicates, "misdelivered": self.misdelivered,
            "send_errors": self.send_errors, "socket_errors": self.socket_errors,
            "lost_sessions": f.lost_sessions(), "silent_sessions": f.silent_sessions,
            "moved_sessions": f.moved_sessions,
            "checked_first_try": self.checked_first, "checked": self.checked,
        });
        let parts = [
            serde_json::json!({
                "gap_ms": ms(f.gap_ns), "gap_from_ms": f.gap_from_ns as f64 / 1e6,
                "gap_before_ms": ms(f.gap_before_ns), "send_pause_ms": ms(f.send_pause_ns),
                "rtt_before_p50_us": us(&f.rtt_before, 0.5),
                "rtt_before_p99_us": us(&f.rtt_before, 0.99),
                "rtt_before_max_us": us(&f.rtt_before, 1.0),
                "rtt_after_p50_us": us(&f.rtt_after, 0.5),
                "rtt_after_p99_us": us(&f.rtt_after, 0.99),
                "rtt_after_max_us": us(&f.rtt_after, 1.0),
                "goal_no_session_lost": sessions_met, "goal_no_datagram_lost": datagrams_met,
                "goal_gap_under_50ms": gap_met,
            }),
            serde_json::json!({
                "a_handed_over_sessions": self.a_said.map(|h| h.sessions),
                "a_handed_over_sockets": self.a_said.map(|h| h.sockets),
                "a_gap_ms": self.a_said.map(|h| h.gap.as_secs_f64() * 1e3),
                "a_exit_ms": self.a_exit_ms, "a_exit_code": self.a_status.and_then(|s| s.code()),
                "b_listening_ms": self.b_listening_ms,
                "b_took_over_sessions": m.handoff_sessions.map(|n| n as u64),
                "b_told_gap_ms": m.gap_seconds.map(|g| g * 1e3),
                "b_handoff_sessions_total": m.handoff_sessions,
                "b_handoff_descriptors_total": m.handoff_descriptors,
                "b_handoff_took_over": m.took_over, "b_sessions_created": m.created,
                "b_sessions_active": m.active,
                "load_average": self.load_average, "rustc_processes": self.rustc_processes,
                "kept": self.kept.as_ref().map(|d| d.display().to_string()),
            }),
        ];
        if let Some(all) = line.as_object_mut() {
            for part in parts {
                if let serde_json::Value::Object(fields) = part {
                    all.extend(fields);
                }
            }
        }
        println!("{line}");
    }
}

/// The rounds together: the worst of each figure, and the goals.
pub(super) fn summarize(args: &HandOffArgs, rounds: &[Round]) {
    let worst_gap = rounds.iter().map(|r| r.figures.gap_ns).max().unwrap_or(0);
    let lost_sessions: usize = rounds.iter().map(|r| r.figures.lost_sessions()).sum();
    let established: usize = rounds.iter().map(|r| r.figures.established).sum();
    let lost: usize = rounds.iter().map(|r| r.figures.lost).sum();
    let sent: usize = rounds.iter().map(|r| r.figures.sent).sum();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let all = |goal: usize| rounds.iter().all(|r| r.goals()[goal]);
    println!(
        "\nsummary: {} round(s) of {} sessions at {} datagrams/s: {lost_sessions} of \
         {established} sessions lost, {lost} of {sent} datagrams lost, longest gap {:.1} ms",
        rounds.len(),
        args.sessions,
        args.rate,
        ms(worst_gap)
    );
    if args.sessions != GOAL_SESSIONS || args.rate != GOAL_RATE {
        println!(
            "note: the goals are stated for {GOAL_SESSIONS} sessions at {GOAL_RATE} datagrams/s"
        );
    }
    println!("goal: no session lost: {}", met(all(0)));
    println!("goal: no datagram lost: {}", met(all(1)));
    // Workers freeze and resume one by one, so replies through one may go on while another's
    // wait: the merged timeline's gap is a lower bound of what a player on the slowest saw,
    // and the longest a datagram waited is its upper side.
    let worst_wait = rounds
        .iter()
        .map(|r| r.figures.rtt_after.max())
        .max()
        .unwrap_or(0);
    println!(
        "goal: longest gap in replies under {} ms: {} (worst {:.1} ms; the longest a datagram \
         waited across the hand-off: {:.1} ms)",
        GAP_GOAL.as_millis(),
        met(all(2)),
        ms(worst_gap),
        ms(worst_wait)
    );
    if rounds.iter().any(|r| r.rustc_processes > 0) {
        println!(
            "note: compilers were running during a round: the machine was busy and the \
             figures may be disturbed"
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "summary": args.label, "rounds": rounds.len(), "sessions": args.sessions,
            "rate": args.rate, "established": established, "lost_sessions": lost_sessions,
            "sent": sent, "lost": lost, "worst_gap_ms": ms(worst_gap),
            "worst_wait_ms": ms(worst_wait),
            "goal_no_session_lost": all(0), "goal_no_datagram_lost": all(1),
            "goal_gap_under_50ms": all(2),
        })
    );
}
