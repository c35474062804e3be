//! Prometheus metrics (prometheus-client). Control's own metrics are ordinary counters and
//! histograms; the data plane's per-worker counters and the inventory sizes are read at scrape
//! time by a collector, so the data path never touches the registry. The registry is counted
//! into by the query side, the reloader and the status writers, and served by the admin
//! server: it sits below all of them ([`process`]: the process's own resources).

pub mod process;

use std::sync::Arc;
use std::time::Duration;

use dataplane::{Controller, DropReason, SessionKind, TokenRejectReason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::inventory::{Rejections, Snapshot};
use crate::protocol::ErrorCode;

type ResultLabel = [(&'static str, &'static str); 1];

/// Control's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    queries: Family<ResultLabel, Counter>,
    query_duration: Histogram,
    /// Tokens minted.
    pub tokens_issued: Counter,
    reloads: Family<ResultLabel, Counter>,
    allocations: Family<ResultLabel, Counter>,
    allocation_duration: Histogram,
    status: crate::reconcile::status::Counts,
    registry: parking_lot::Mutex<Registry>,
}

impl Metrics {
    /// Registers every metric; the collector reads `controller` and `inventory` at scrape time,
    /// and the inventory source counts what it refuses on `rejections`.
    pub fn new(
        controller: Controller,
        inventory: watch::Receiver<Arc<Snapshot>>,
        rejections: &Rejections,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        let queries = Family::<ResultLabel, Counter>::default();
        // 25 µs … ~0.4 s.
        let query_duration = Histogram::new(exponential_buckets(0.000_025, 2.0, 15));
        let tokens_issued = Counter::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        // Every result shows from the start, at zero.
        for result in ["applied", "refused", "invalid"] {
            let _ = reloads.get_or_create(&[("result", result)]);
        }
        registry.register(
            "udp_director_config_reloads",
            "Config reloads (SIGHUP or a change of the file), by result: applied, refused (a \
             change that needs a restart) or invalid",
            reloads.clone(),
        );
        rejections.register(&mut registry);
        let allocations = Family::<ResultLabel, Counter>::default();
        for result in crate::query::allocate::RESULTS {
            let _ = allocations.get_or_create(&[("result", result)]);
        }
        registry.register(
            "udp_director_allocations",
            "Agones allocations the query port made (GameServerAllocations created), by result: \
             allocated, no_capacity (UnAllocated), contention (Contention until the timeout) or \
             error (refused, not answered, unreadable)",
            allocations.clone(),
        );
        // 1 ms … ~8 s: an allocation is an API call (or several, with retries).
        let allocation_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "udp_director_allocation_duration_seconds",
            "Time from a query's allocation request to its outcome, retries included",
            allocation_duration.clone(),
        );
        let status = crate::reconcile::status::Counts::default();
        registry.register(
            "udp_director_events",
            "Kubernetes Events the reconcilers recorded on objects, by reason and result \
             (published, or failed: the API server refused or did not answer)",
            status.events.clone(),
        );
        registry.register(
            "udp_director_status_writes",
            "Writes of Kubernetes status (a Forwarder's or Route's entry of this node, a Gateway \
             API object's whole status) and of managed Service ports, by kind and result \
             (written, or failed: the API server refused or did not answer)",
            status.writes.clone(),
        );
        registry.register(
            "udp_director_object_problems",
            "1 for each problem this instance sees with a Forwarder, Route or Gateway API \
             object now, by kind, namespace, name and reason (PortConflict, TargetUnresolvable, \
             EntryPointMissing, PortUnavailable); the series goes when the problem does",
            status.problems.clone(),
        );
        registry.register(
            "udp_director_queries",
            "Queries answered, by result (ok or an error code)",
            queries.clone(),
        );
        registry.register(
            "udp_director_query_duration_seconds",
            "Time to answer a query, from parsed request to token",
            query_duration.clone(),
        );
        registry.register(
            "udp_director_tokens_issued",
            "Tokens minted",
            tokens_issued.clone(),
        );
        registry.register_collector(Box::new(DataPlaneCollector {
            controller,
            inventory,
        }));
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        Arc::new(Self {
            queries,
            query_duration,
            tokens_issued,
            reloads,
            allocations,
            allocation_duration,
            status,
            registry: parking_lot::Mutex::new(registry),
        })
    }

    /// Counts a config reload by its result (`applied`, `refused`, `invalid`).
    pub fn count_reload(&self, result: &'static str) {
        self.reloads.get_or_create(&[("result", result)]).inc();
    }

    /// Where the status writers count the Events they record and the writes they make.
    pub fn status_counts(&self) -> crate::reconcile::status::Counts {
        self.status.clone()
    }

    /// Adds a collector read at scrape time (the forwarders').
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry.lock().register_collector(collector);
    }

    /// Counts one answered query.
    pub fn observe_query(&self, error: Option<ErrorCode>, took: Duration) {
        self.count_query(error);
        self.query_duration.observe(took.as_secs_f64());
    }

    /// Counts one allocation's outcome (`result` one of [`crate::query::allocate::RESULTS`])
    /// and how long it took.
    pub fn observe_allocation(&self, result: &'static str, took: Duration) {
        self.allocations.get_or_create(&[("result", result)]).inc();
        self.allocation_duration.observe(took.as_secs_f64());
    }

    /// Counts a query answered without selection (refused at the door, unparseable), which
    /// says nothing about how long selection takes and stays out of the duration histogram.
    pub fn count_query(&self, error: Option<ErrorCode>) {
        let result = error.map_or("ok", ErrorCode::as_str);
        self.queries.get_or_create(&[("result", result)]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock()) {
            log::error!("metrics encoding failed: {e}");
        }
        out
    }
}

#[derive(Debug)]
struct DataPlaneCollector {
    controller: Controller,
    inventory: watch::Receiver<Arc<Snapshot>>,
}

type Labels = Vec<(&'static str, &'static str)>;

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(family)
}

fn labelled_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DataPlaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let c = self.controller.counters();
        let e = &mut encoder;
        counter(
            e,
            "udp_director_tokens_redeemed",
            "Tokens redeemed by a first datagram or control packet",
            c.tokens_redeemed,
        )?;
        labelled_counter(
            e,
            "udp_director_tokens_rejected",
            "Tokens not redeemed, by reason",
            TokenRejectReason::ALL
                .iter()
                .map(|r| (vec![("reason", r.as_str())], c.rejected(*r))),
        )?;
        labelled_counter(
            e,
            "udp_director_sessions_created",
            "Sessions opened, by kind (token, default backend, forwarder or route) and protocol",
            SessionKind::ALL.iter().flat_map(|k| {
                let tcp = c.tcp_created(*k);
                [
                    (
                        vec![("kind", k.as_str()), ("protocol", "udp")],
                        // Summed without a lock: a TCP session counted in one and not yet
                        // the other must not underflow.
                        c.created(*k).saturating_sub(tcp),
                    ),
                    (vec![("kind", k.as_str()), ("protocol", "tcp")], tcp),
                ]
            }),
        )?;
        counter(
            e,
            "udp_director_sessions_reset",
            "Sessions moved to another backend by a control packet",
            c.sessions_reset,
        )?;
        counter(
            e,
            "udp_director_sessions_rehomed",
            "Route sessions moved to another endpoint because theirs left",
            c.sessions_rehomed,
        )?;
        counter(
            e,
            "udp_director_sessions_expired",
            "Sessions ended by the idle timeout",
            c.sessions_expired,
        )?;
        counter(
            e,
            "udp_director_sessions_closed",
            "Sessions ended otherwise (admin kill, backend removed, shutdown)",
            c.sessions_closed,
        )?;
        labelled_counter(
            e,
            "udp_director_packets",
            "Datagrams forwarded, by direction (UDP only)",
            [
                (
                    vec![("direction", "upstream"), ("protocol", "udp")],
                    c.packets_upstream,
                ),
                (
                    vec![("direction", "downstream"), ("protocol", "udp")],
                    c.packets_downstream,
                ),
            ],
        )?;
        labelled_counter(
            e,
            "udp_director_bytes",
            "Payload bytes forwarded, by direction and protocol",
            [
                (
                    vec![("direction", "upstream"), ("protocol", "udp")],
                    c.bytes_upstream,
                ),
                (
                    vec![("direction", "downstream"), ("protocol", "udp")],
                    c.bytes_downstream,
                ),
                (
                    vec![("direction", "upstream"), ("protocol", "tcp")],
                    c.tcp_bytes_upstream,
                ),
                (
                    vec![("direction", "downstream"), ("protocol", "tcp")],
                    c.tcp_bytes_downstream,
                ),
            ],
        )?;
        labelled_counter(
            e,
            "udp_director_packets_dropped",
            "Datagrams dropped, by reason and by whose fault (client, backend, internal)",
            DropReason::DATAGRAM.iter().map(|r| {
                (
                    vec![("reason", r.as_str()), ("source", r.source())],
                    c.dropped(*r),
                )
            }),
        )?;
        counter(
            e,
            "udp_director_tcp_connections_accepted",
            "TCP connections accepted on data ports",
            c.tcp_accepted,
        )?;
        labelled_counter(
            e,
            "udp_director_tcp_connections_refused",
            "TCP connections closed without a session, or whose backend connection failed, by \
             reason and by whose fault",
            DropReason::CONNECTION.iter().map(|r| {
                (
                    vec![("reason", r.as_str()), ("source", r.source())],
                    c.refused(*r),
                )
            }),
        )?;
        let mut gauge = encoder.encode_descriptor(
            "udp_director_sessions_active",
            "Sessions live now, by protocol",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(c.sessions_active.saturating_sub(c.tcp_sessions_active) as i64)
            .encode(gauge.encode_family(&vec![("protocol", "udp")])?)?;
        ConstGauge::new(c.tcp_sessions_active as i64)
            .encode(gauge.encode_family(&vec![("protocol", "tcp")])?)?;
        let gauge = encoder.encode_descriptor(
            "udp_director_upstream_sockets",
            "Shared upstream sockets open (each carries at most one UDP session per backend address)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(c.upstream_sockets as i64).encode(gauge)?;
        let fast = self.controller.fast_path();
        let gauge = encoder.encode_descriptor(
            "udp_director_fastpath_enabled",
            "1 while the kernel fast path is attached and forwarding (fastPath.kind tc and the \
             kernel let it load); 0 otherwise, the reason in the log",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(fast.is_some())).encode(gauge)?;
        let fast = fast.unwrap_or_default();
        labelled_counter(
            &mut encoder,
            "udp_director_fastpath_packets",
            "Datagrams the kernel fast path forwarded, by direction (not in \
             udp_director_packets_total, which counts what user space forwarded)",
            [
                (vec![("direction", "upstream")], fast.packets_upstream),
                (vec![("direction", "downstream")], fast.packets_downstream),
            ],
        )?;
        labelled_counter(
            &mut encoder,
            "udp_director_fastpath_bytes",
            "Payload bytes the kernel fast path forwarded, by direction",
            [
                (vec![("direction", "upstream")], fast.bytes_upstream),
                (vec![("direction", "downstream")], fast.bytes_downstream),
            ],
        )?;
        let gauge = encoder.encode_descriptor(
            "udp_director_fastpath_sessions",
            "UDP sessions whose established traffic the kernel fast path forwards now",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(c.fastpath_sessions as i64).encode(gauge)?;
        let handoff = self.controller.handoff_stats();
        labelled_counter(
            &mut encoder,
            "udp_director_handoff",
            "Hand-offs (SPEC §12) by result: handed_over and refused on the old process, \
             took_over on the new one, failed on either",
            dataplane::handoff::stats::HandOffResult::ALL
                .iter()
                .map(|r| (vec![("result", r.as_str())], handoff.results(*r))),
        )?;
        counter(
            &mut encoder,
            "udp_director_handoff_sessions",
            "UDP sessions handed over (old process) or taken over (new process)",
            handoff.sessions(),
        )?;
        counter(
            &mut encoder,
            "udp_director_handoff_descriptors",
            "Sockets handed over (old process) or taken over (new process)",
            handoff.descriptors(),
        )?;
        let gauge = encoder.encode_descriptor(
            "udp_director_handoff_gap_seconds",
            "The last hand-off's gap: from the old process's last read to the new one's first \
             (measured by the old process, which tells the new one)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(handoff.last_gap_seconds()).encode(gauge)?;
        let (held, allowed) = self.controller.descriptors();
        let gauge = encoder.encode_descriptor(
            "udp_director_dataplane_descriptors",
            "Descriptors the data plane holds (sockets of listeners, upstream sockets, TCP \
             connections)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(held as i64).encode(gauge)?;
        let gauge = encoder.encode_descriptor(
            "udp_director_dataplane_descriptors_allowed",
            "Descriptors the data plane may hold: the open-file limit less the control thread's \
             reserve; past it new sessions and listeners are refused",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(allowed).unwrap_or(i64::MAX)).encode(gauge)?;
        let snapshot = Arc::clone(&self.inventory.borrow());
        let mut objects = encoder.encode_descriptor(
            "udp_director_inventory_objects",
            "Objects in the inventory cache, by resource type",
            None,
            MetricType::Gauge,
        )?;
        for (name, list) in &snapshot.by_mapping {
            ConstGauge::new(list.len() as i64)
                .encode(objects.encode_family(&vec![("resource_type", name.as_str())])?)?;
        }
        let mut stale = encoder.encode_descriptor(
            "udp_director_inventory_stale",
            "1 while a watched resource's cache is stale (its watch failed and has not re-listed)",
            None,
            MetricType::Gauge,
        )?;
        for (resource, is_stale) in &snapshot.watches {
            ConstGauge::new(i64::from(*is_stale))
                .encode(stale.encode_family(&vec![("resource", resource.as_str())])?)?;
        }
        Ok(())
    }
}
