//! Liveness that means it: `/healthz` and `udp_director_thread_up` follow every thread's
//! heartbeat, a stuck worker turns the pod unhealthy, and a panicking one ends the process.
//! The faults come from `UDP_DIRECTOR_FAULT`, which only debug builds understand.

mod common;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::*;

fn thread_up(body: &str, thread: &str) -> Option<String> {
    let series = format!("udp_director_thread_up{{thread=\"{thread}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().to_string())
}

#[test]
fn every_thread_beats_while_all_is_well() {
    let proxy = Proxy::start(&base_config("watchdogSeconds: 1\n"), "[]\n");
    assert_eq!(proxy.http("GET", "/healthz"), (200, "ok\n".into()));
    let (_, metrics) = proxy.http("GET", "/metrics");
    for thread in ["dp-worker-0", "dp-worker-1", "control", "query"] {
        assert_eq!(
            thread_up(&metrics, thread).as_deref(),
            Some("1"),
            "{thread}:\n{metrics}"
        );
    }
    // Idle workers still beat: under a one-second watchdog, nothing is reported silent.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let (status, body) = proxy.http("GET", "/healthz");
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "fault injection is compiled out of release builds"
)]
fn a_stalled_worker_turns_healthz_503_naming_it() {
    let config = base_config("watchdogSeconds: 1\n");
    let proxy = Proxy::launch(
        &config,
        "[]\n",
        &[("UDP_DIRECTOR_FAULT", OsStr::new("worker-stall:0"))],
    );
    proxy.eventually("healthz names the stalled worker", |p| {
        let (status, body) = p.http("GET", "/healthz");
        status == 503 && body.contains("dp-worker-0")
    });
    let (_, body) = proxy.http("GET", "/healthz");
    assert!(body.contains("no heartbeat"), "{body}");
    assert!(!body.contains("dp-worker-1"), "{body}");
    let (_, metrics) = proxy.http("GET", "/metrics");
    assert_eq!(thread_up(&metrics, "dp-worker-0").as_deref(), Some("0"));
    assert_eq!(thread_up(&metrics, "dp-worker-1").as_deref(), Some("1"));
    assert_eq!(thread_up(&metrics, "control").as_deref(), Some("1"));

    // The watchdog reloads live: an hour of patience sees nothing wrong yet.
    std::fs::write(
        proxy.dir.join("config.yaml"),
        config.replace("watchdogSeconds: 1", "watchdogSeconds: 3600"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child's pid.
    let sent = unsafe { libc::kill(proxy.child.id() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0);
    proxy.eventually("healthz 200 under the longer watchdog", |p| {
        p.http("GET", "/healthz").0 == 200
    });
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "fault injection is compiled out of release builds"
)]
fn a_panicking_worker_ends_the_process_naming_it() {
    let mut proxy = Proxy::launch(
        &base_config(""),
        "[]\n",
        &[("UDP_DIRECTOR_FAULT", OsStr::new("worker-panic:0"))],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", proxy.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status:?}");
    let log = proxy.log();
    assert!(
        log.contains("thread dp-worker-0 panicked"),
        "{status:?}:\n{log}"
    );
}
