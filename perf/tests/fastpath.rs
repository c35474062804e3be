//! Smoke test of `perf fastpath`: as root, a short run reports every contender at each load,
//! with the kernel carrying the fast path's datagrams, and leaves no namespace behind;
//! elsewhere it refuses with a clear error. Correctness only; the numbers are not asserted.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn fastpath_reports_routing_user_space_and_the_fast_path_or_refuses_without_root() {
    let bin = Path::new(env!("CARGO_BIN_EXE_udp-director-perf"));
    let proxy = bin.with_file_name("udp-director");
    assert!(
        proxy.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        proxy.display()
    );
    // Networks of their own, so a run beside (or another test's) is not disturbed.
    let prefix = format!("10.{}", 100 + std::process::id() % 100);
    let out = Command::new(bin)
        .args([
            "fastpath",
            "--shapes",
            "4x4,1x1",
            "--rounds",
            "1",
            "--seconds",
            "0.3",
            "--warmup",
            "0.3",
            "--prefix",
            &prefix,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!out.status.success(), "{stdout}");
        assert!(stderr.contains("must run as root"), "{stderr}");
        eprintln!("perf fastpath needs root: only its refusal was checked");
        return;
    }
    assert!(out.status.success(), "{stdout}{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for clients in [4, 1] {
        let summary = |label: &str| {
            lines
                .iter()
                .find(|l| l["summary"] == label && l["clients"] == clients)
                .unwrap_or_else(|| panic!("no summary for {label} at {clients} clients: {stdout}"))
        };
        for label in ["routing", "user space", "fast path"] {
            let s = summary(label);
            assert!(s["round_trips_per_second"].as_f64().unwrap() > 0.0, "{s}");
            assert!(
                s["machine_cpu_us_per_round_trip"].as_f64().unwrap() > 0.0,
                "{s}"
            );
        }
        assert_eq!(summary("user space")["kernel_percent"], 0.0);
        let fast = summary("fast path");
        assert!(fast["kernel_percent"].as_f64().unwrap() > 90.0, "{fast}");
    }
    assert!(
        stdout.contains("goal at 4x4: fast path's added CPU"),
        "{stdout}"
    );
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let pid = stdout
        .split("udfp-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .expect("the topology line names the namespaces");
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&format!("udfp-{pid}-")),
        "the run's namespaces are gone"
    );
}
