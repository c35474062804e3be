//! What `/healthz` and `udp_director_thread_up` say: every data-plane worker and the control
//! thread beat a heartbeat ([`dataplane::liveness`]); a thread that exited, panicked or has not
//! beaten for `watchdogSeconds` makes `/healthz` answer 503 naming it, so the kubelet restarts
//! the pod instead of probing a process that answers while its data plane is dead.
//!
//! Readiness (draining, inventory) is `/readyz`'s business, not this one's: a draining proxy
//! stays healthy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::liveness::Liveness;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::watch;

use crate::config::Config;

/// Threads that stopped: each one's name and why (`no heartbeat for 3.2 s`, `exited`). Its
/// text is `/healthz`'s 503 body: `unhealthy: dp-worker-0 (exited)`.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("unhealthy: {}", .0.iter().map(|(name, why)| format!("{name} ({why})")).collect::<Vec<_>>().join(", "))]
pub struct Unhealthy(pub Vec<(String, String)>);

/// The liveness verdict now: `Ok` when every thread is alive, else the stopped ones.
pub fn verdict(liveness: &Liveness, watchdog: Duration) -> Result<(), Unhealthy> {
    let down: Vec<(String, String)> = liveness
        .check(Instant::now(), watchdog)
        .into_iter()
        .filter_map(|t| t.down.map(|why| (t.name.to_string(), why.to_string())))
        .collect();
    if down.is_empty() {
        return Ok(());
    }
    let unhealthy = Unhealthy(down);
    log::warn!("/healthz: {unhealthy}");
    Err(unhealthy)
}

/// `udp_director_thread_up{thread}`, read at scrape time under the running config's watchdog.
#[derive(Debug)]
pub struct ThreadCollector {
    liveness: Arc<Liveness>,
    config: watch::Receiver<Arc<Config>>,
}

impl ThreadCollector {
    /// A collector of `liveness`'s threads; the watchdog follows `config` (it reloads live).
    pub fn new(liveness: Arc<Liveness>, config: watch::Receiver<Arc<Config>>) -> Self {
        Self { liveness, config }
    }
}

impl Collector for ThreadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let watchdog = self.config.borrow().watchdog;
        let mut family = encoder.encode_descriptor(
            "udp_director_thread_up",
            "1 while the thread beats its heartbeat; 0 once it exited, panicked or went silent \
             for longer than watchdogSeconds",
            None,
            MetricType::Gauge,
        )?;
        for thread in self.liveness.check(Instant::now(), watchdog) {
            ConstGauge::new(i64::from(thread.down.is_none()))
                .encode(family.encode_family(&vec![("thread", thread.name.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_the_stopped_threads() {
        let liveness = Liveness::new();
        let worker = liveness.register("dp-worker-0");
        let control = liveness.register("control");
        assert_eq!(verdict(&liveness, Duration::from_secs(10)), Ok(()));
        drop(worker);
        let body = verdict(&liveness, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert_eq!(body, "unhealthy: dp-worker-0 (exited)");
        drop(control);
        let body = verdict(&liveness, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            body.contains("dp-worker-0 (exited), control (exited)"),
            "{body}"
        );
    }

    #[test]
    fn thread_up_per_thread() {
        let liveness = Liveness::new();
        let _worker = liveness.register("dp-worker-0");
        let control = liveness.register("control");
        drop(control);
        let config = Config::from_yaml(
            "inventory: {kind: file, path: inv.yaml}\nresourceQueryMapping: {}\n",
        )
        .unwrap();
        let (_tx, rx) = watch::channel(Arc::new(config));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ThreadCollector::new(liveness, rx)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("udp_director_thread_up{thread=\"dp-worker-0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("udp_director_thread_up{thread=\"control\"} 0\n"),
            "{text}"
        );
    }
}
