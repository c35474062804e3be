//! The process's own resource metrics, read from `/proc/self` at scrape time under the names
//! Prometheus' client libraries use (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), so the dashboard and the alerts (descriptors near the limit, a
//! proxy that keeps restarting) see what the kernel sees. Nothing is read per query or per
//! datagram.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc/self/stat` says, in units.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

/// Parses `/proc/self/stat`: fields after the parenthesised command name (which may hold
/// spaces), utime and stime in clock ticks, vsize in bytes, rss in pages.
fn parse_stat(text: &str, ticks_per_second: f64, page_bytes: u64) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: utime is field 14, stime 15, vsize 23,
    // rss 24.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_bytes),
    })
}

/// Collects the process metrics at scrape time.
#[derive(Debug)]
pub struct ProcessCollector {
    /// When the process started, in seconds since the Unix epoch.
    started: f64,
}

impl ProcessCollector {
    /// A collector for this process, started now (it is made as the process starts).
    pub fn new() -> Self {
        Self {
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // SAFETY: `sysconf` reads a system constant; no memory is passed.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t, ticks.max(1) as f64, page.max(1) as u64));
        if let Some(stat) = stat {
            let family = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(stat.cpu_seconds).encode(family)?;
            let family = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(stat.resident_bytes).unwrap_or(i64::MAX))
                .encode(family)?;
            let family = encoder.encode_descriptor(
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(stat.virtual_bytes).unwrap_or(i64::MAX))
                .encode(family)?;
        }
        if let Some(open) = dataplane::io::fd_budget::open_descriptors() {
            let family = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(open as i64).encode(family)?;
        }
        let family = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds (a change is a restart)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.started).encode(family)?;
        let family = encoder.encode_descriptor(
            "process_max_fds",
            "The soft limit on open file descriptors",
            None,
            MetricType::Gauge,
        )?;
        let max = dataplane::io::fd_budget::soft_nofile_limit();
        ConstGauge::new(i64::try_from(max).unwrap_or(i64::MAX)).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_past_a_command_name_with_spaces() {
        let line = "4242 (udp (dir) ector) S 1 4242 4242 0 -1 4194560 2105 0 0 0 250 50 0 0 20 0 \
                    7 0 123456 367001600 4096 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 \
                    17 1 0 0 0 0 0";
        let stat = parse_stat(line, 100.0, 4096).unwrap();
        assert_eq!(
            stat,
            Stat {
                cpu_seconds: 3.0,
                virtual_bytes: 367_001_600,
                resident_bytes: 4096 * 4096,
            }
        );
        assert!(parse_stat("garbage", 100.0, 4096).is_none());
    }

    #[test]
    fn this_process_is_read() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let stat = parse_stat(&text, 100.0, 4096).unwrap();
        assert!(stat.resident_bytes > 0 && stat.virtual_bytes >= stat.resident_bytes);
    }
}
