//! The per-forwarder metrics of SPEC §8, read from the reconciler's table at scrape time:
//! `udp_director_forwarders{protocol}` (listeners open), and per forwarder
//! `udp_director_forwarder_bytes_total{forwarder,direction}`,
//! `udp_director_forwarder_clients{forwarder}` and
//! `udp_director_forwarder_errors_total{forwarder,type}`. The forwarder label is an object
//! name (a bounded set); series end when the forwarder is gone.

use dataplane::{DropReason, ListenerStats, Transport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{ForwarderTable, add_stats};

/// Data-plane drops that count as forwarder errors, by `type`.
const DATA_PLANE_ERRORS: [DropReason; 9] = [
    DropReason::SessionLimit,
    DropReason::IpLimit,
    DropReason::Draining,
    DropReason::UpstreamSetup,
    DropReason::UpstreamSend,
    DropReason::DownstreamSend,
    DropReason::UpstreamConnect,
    DropReason::Oversize,
    DropReason::Loop,
];

/// Reads a [`ForwarderTable`] at scrape time.
#[derive(Debug)]
pub struct ForwarderCollector(pub ForwarderTable);

type Labels = Vec<(&'static str, String)>;

/// One forwarder at scrape time: its name, traffic (with `sessions` = clients) and errors.
type Row = (String, ListenerStats, Vec<(String, u64)>);

impl Collector for ForwarderCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut open = [0u64; 2];
        let mut rows: Vec<Row> = Vec::new();
        {
            let table = self.0.lock();
            for (name, view) in table.iter() {
                let mut stats = view.closed.clone();
                let mut clients = 0;
                for (transport, counters, closed_at) in &view.live {
                    let s = counters.snapshot();
                    clients += s.sessions;
                    add_stats(&mut stats, &s);
                    if closed_at.is_none() {
                        open[usize::from(*transport == Transport::Tcp)] += 1;
                    }
                }
                stats.sessions = clients;
                let mut errors: Vec<(String, u64)> = DATA_PLANE_ERRORS
                    .iter()
                    .map(|r| (r.as_str().to_string(), stats.dropped(*r)))
                    .collect();
                for (kind, n) in &view.errors {
                    errors.push(((*kind).to_string(), *n));
                }
                rows.push((name.clone(), stats, errors));
            }
        }
        let e = &mut encoder;
        let mut family = e.encode_descriptor(
            "udp_director_forwarders",
            "Forwarder listeners open, by protocol",
            None,
            MetricType::Gauge,
        )?;
        for transport in Transport::ALL {
            let labels: Labels = vec![("protocol", transport.as_str().to_string())];
            ConstGauge::new(open[usize::from(transport == Transport::Tcp)] as i64)
                .encode(family.encode_family(&labels)?)?;
        }
        let mut family = e.encode_descriptor(
            "udp_director_forwarder_bytes",
            "Bytes through a forwarder (UDP payloads and TCP stream bytes), by direction",
            None,
            MetricType::Counter,
        )?;
        for (name, stats, _) in &rows {
            for (direction, value) in [
                ("upstream", stats.bytes_upstream),
                ("downstream", stats.bytes_downstream),
            ] {
                let labels: Labels = vec![
                    ("forwarder", name.clone()),
                    ("direction", direction.to_string()),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "udp_director_forwarder_clients",
            "Live sessions (UDP clients and TCP connections) of a forwarder",
            None,
            MetricType::Gauge,
        )?;
        for (name, stats, _) in &rows {
            let labels: Labels = vec![("forwarder", name.clone())];
            ConstGauge::new(stats.sessions as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = e.encode_descriptor(
            "udp_director_forwarder_errors",
            "Forwarder errors by type: listen (port not opened), resolve (target not found), \
             and the data plane's drops and refusals",
            None,
            MetricType::Counter,
        )?;
        for (name, _, errors) in &rows {
            for (kind, value) in errors {
                let labels: Labels = vec![("forwarder", name.clone()), ("type", kind.clone())];
                ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
