//! Route metrics, read from the reconciler's views at scrape time:
//! `udp_director_route_sessions_total{route,service}` (sessions opened to each backend
//! Service), `udp_director_route_rehomed_total{route}` (sessions moved because their endpoint
//! left) and `udp_director_route_ready_endpoints{route}`. `no_route` drops are in
//! `udp_director_packets_dropped_total{reason}` and
//! `udp_director_tcp_connections_refused_total{reason}`. Label values are object names.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::RouteViews;

/// Reads [`RouteViews`] at scrape time: the `Route` objects' and the Gateway API routes'.
#[derive(Debug)]
pub struct RouteCollector(pub Vec<RouteViews>);

type Labels = Vec<(&'static str, String)>;

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut views = std::collections::BTreeMap::new();
        for v in &self.0 {
            views.extend(v.lock().clone());
        }
        let e = &mut encoder;
        let mut family = e.encode_descriptor(
            "udp_director_route_sessions",
            "Sessions a route opened, by backend Service",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, name), v) in &views {
            for (service, c) in &v.sessions {
                let labels: Labels = vec![
                    ("route", format!("{namespace}/{name}")),
                    ("service", service.clone()),
                ];
                ConstCounter::new(c.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "udp_director_route_rehomed",
            "Route sessions moved to another endpoint because theirs left",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, name), v) in &views {
            let labels: Labels = vec![("route", format!("{namespace}/{name}"))];
            let n: u64 = v.rehomed.iter().map(|c| c.get()).sum();
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = e.encode_descriptor(
            "udp_director_route_ready_endpoints",
            "Ready endpoints over a route's backends",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, name), v) in &views {
            let labels: Labels = vec![("route", format!("{namespace}/{name}"))];
            ConstGauge::new(i64::from(v.ready_endpoints)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
