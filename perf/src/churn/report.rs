//! What `churn` prints: one line per measure, then the JSON line.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::proxy::Ready;
use super::window::Window;
use super::{CHANGE_TIMEOUT, ChurnArgs};

/// Everything the run measured.
#[derive(Debug)]
pub(super) struct Report<'a> {
    pub(super) args: &'a ChurnArgs,
    pub(super) namespace: &'a str,
    pub(super) populate_seconds: f64,
    pub(super) created: usize,
    pub(super) ready: Ready,
    pub(super) settle_seconds: Option<f64>,
    pub(super) idle_control_cores: f64,
    pub(super) window: Window,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
}

impl Report<'_> {
    pub(super) fn print(&self) {
        let (a, w) = (self.args, &self.window);
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                f64::NAN
            } else {
                h.value_at_quantile(q) as f64 / 1e6
            }
        };
        let max_ms = |h: &Histogram<u64>| {
            if h.is_empty() {
                f64::NAN
            } else {
                h.max() as f64 / 1e6
            }
        };
        let mut took: Vec<f64> = w
            .changes
            .iter()
            .filter_map(|c| c.seconds.map(|s| s * 1e3))
            .collect();
        took.sort_by(f64::total_cmp);
        let median = if took.is_empty() {
            f64::NAN
        } else if took.len() % 2 == 1 {
            took[took.len() / 2]
        } else {
            (took[took.len() / 2 - 1] + took[took.len() / 2]) / 2.0
        };
        let (min, max) = (
            took.first().copied().unwrap_or(f64::NAN),
            took.last().copied().unwrap_or(f64::NAN),
        );
        let timed_out = w.changes.len() - took.len();
        let patched = w.patches.sent - w.patches.failed;
        let settled = self.settle_seconds.map_or_else(
            || "did not settle".to_owned(),
            |s| format!("settled in {s:.1} s"),
        );
        println!(
            "churn: {} GameServers ({} fleets), {} Forwarders, {} Routes in namespace {} \
             ({} API writes in {:.0} s, not measured)",
            a.gameservers,
            a.fleets,
            a.forwarders,
            a.routes,
            self.namespace,
            self.created,
            self.populate_seconds
        );
        println!(
            "proxy: ready in {:.1} s; {} of {} forwarders and {} of {} routes ready after {:.1} s; \
             control {settled}, then idles at {:.3} of a core",
            self.ready.ready_seconds,
            self.ready.forwarders_ready,
            a.forwarders,
            self.ready.routes_ready,
            a.routes,
            self.ready.open_seconds,
            self.idle_control_cores
        );
        println!(
            "window {:.0} s: {} GameServer status patches ({:.1}/s of {:.0} asked, {} failed; \
             API p50 {:.1} ms, p99 {:.1} ms)",
            w.seconds,
            w.patches.sent,
            patched as f64 / w.seconds,
            a.patch_rate,
            w.patches.failed,
            ms(&w.patches.latency, 0.5),
            ms(&w.patches.latency, 0.99),
        );
        println!(
            "control thread: {:.3} of a core (busiest second {:.3}; waiting for a CPU {:.3}); \
             the whole proxy {:.3}, API server {:.3}, etcd {:.3}, this harness {:.3}; machine \
             {:.2} cores busy",
            w.cores.control,
            w.control_peak,
            w.cores.control_wait,
            w.cores.proxy,
            w.cores.apiserver,
            w.cores.etcd,
            w.cores.harness,
            w.cores.machine
        );
        println!(
            "queries: {} at {:.0}/s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, \
             {} error answers; from the schedule (queued behind slow answers): p50 {:.3} ms, \
             p99 {:.3} ms, max {:.3} ms",
            w.queries.latency.len(),
            a.query_rate,
            ms(&w.queries.latency, 0.5),
            ms(&w.queries.latency, 0.99),
            ms(&w.queries.latency, 0.999),
            max_ms(&w.queries.latency),
            w.queries.errors,
            ms(&w.queries.scheduled, 0.5),
            ms(&w.queries.scheduled, 0.99),
            max_ms(&w.queries.scheduled),
        );
        let side = &w.queries.proxy_side;
        println!(
            "queries in the proxy (udp_director_query_duration_seconds, parse to token): {} \
             answers, p99 at most {:.3} ms, {} over 0.8 ms; the rest of the latency above is \
             the loopback and both sides' scheduling",
            side.answers, side.p99_at_most_ms, side.over_800us
        );
        println!(
            "forwarder changes, API write returned → first echo through the new listener: {} \
             ({}): min {min:.1} ms, median {median:.1} ms, max {max:.1} ms, {timed_out} not \
             within {CHANGE_TIMEOUT:?}",
            w.changes.len(),
            w.changes
                .iter()
                .map(|c| format!(
                    "{} {}: {}",
                    c.kind,
                    c.name,
                    c.seconds
                        .map_or_else(|| "timed out".to_owned(), |s| format!("{:.1} ms", s * 1e3))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "proxy memory: RSS {:.1} MiB, peak {:.1} MiB",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        );
        if let Some(e) = &w.patches.first_error {
            println!("a failed patch says: {e}");
        }
        if let Some(e) = &w.queries.first_error {
            println!("an error answer says: {e}");
        }
        let changes: Vec<Value> = w
            .changes
            .iter()
            .map(|c| {
                json!({"kind": c.kind, "name": c.name, "port": c.port,
                "ms": c.seconds.map(|s| s * 1e3)})
            })
            .collect();
        // Two objects, merged: one `json!` this long passes the macro recursion limit.
        let mut summary = json!({
                "summary": "churn",
                "gameservers": a.gameservers,
                "fleets": a.fleets,
                "forwarders": a.forwarders,
                "routes": a.routes,
                "populate_seconds": self.populate_seconds,
                "api_writes": self.created,
                "ready_seconds": self.ready.ready_seconds,
                "open_seconds": self.ready.open_seconds,
                "forwarders_ready": self.ready.forwarders_ready,
                "routes_ready": self.ready.routes_ready,
                "settle_seconds": self.settle_seconds,
                "idle_control_cores": self.idle_control_cores,
                "window_seconds": w.seconds,
                "patch_rate_asked": a.patch_rate,
                "patches_sent": w.patches.sent,
                "patches_failed": w.patches.failed,
                "patches_per_second": patched as f64 / w.seconds,
                "patch_api_p50_ms": ms(&w.patches.latency, 0.5),
                "patch_api_p99_ms": ms(&w.patches.latency, 0.99),
        });
        let window = json!({
                "control_cores": w.cores.control,
                "control_cores_busiest_second": w.control_peak,
                "control_wait_cores": w.cores.control_wait,
                "proxy_cores": w.cores.proxy,
                "harness_cores": w.cores.harness,
                "apiserver_cores": w.cores.apiserver,
                "etcd_cores": w.cores.etcd,
                "machine_cores_busy": w.cores.machine,
                "queries": w.queries.latency.len(),
                "query_rate": a.query_rate,
                "query_p50_ms": ms(&w.queries.latency, 0.5),
                "query_p99_ms": ms(&w.queries.latency, 0.99),
                "query_proxy_answers": w.queries.proxy_side.answers,
                "query_proxy_p99_at_most_ms": w.queries.proxy_side.p99_at_most_ms,
                "query_proxy_over_800us": w.queries.proxy_side.over_800us,
                "query_p999_ms": ms(&w.queries.latency, 0.999),
                "query_max_ms": max_ms(&w.queries.latency),
                "query_errors": w.queries.errors,
                "query_scheduled_p50_ms": ms(&w.queries.scheduled, 0.5),
                "query_scheduled_p99_ms": ms(&w.queries.scheduled, 0.99),
                "query_scheduled_max_ms": max_ms(&w.queries.scheduled),
                "forwarder_change_min_ms": min,
                "forwarder_change_median_ms": median,
                "forwarder_change_max_ms": max,
                "forwarder_changes_timed_out": timed_out,
                "forwarder_changes": changes,
                "rss_kib": self.rss_kib,
                "rss_peak_kib": self.hwm_kib,
        });
        if let (Some(summary), Value::Object(window)) = (summary.as_object_mut(), window) {
            summary.extend(window);
        }
        println!("{summary}");
    }
}
