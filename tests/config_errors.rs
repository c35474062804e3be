//! Strict configuration through the binary: `check-config` and refusing to start.

mod common;

use common::{base_config, run_binary, scratch_dir};

#[test]
fn shipped_examples_pass_check_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let (code, out, err) = run_binary(&["check-config", &format!("{dir}/local.yaml")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"));
}

#[test]
fn bad_configs_name_the_key() {
    let dir = scratch_dir();
    let cases = [
        ("queryPort: 9000\nsessionTimeout: 5\n", "sessionTimeout"),
        ("tokenTtlSeconds: 0\n", "tokenTtlSeconds"),
        ("controlPacketMagicBytes: XYZ\n", "controlPacketMagicBytes"),
        ("loadBalancing: {type: bestEffort}\n", "loadBalancing.type"),
        (
            "dataPorts: [{name: g, port: 1}, {name: g, port: 2}]\n",
            "dataPorts[1].name",
        ),
        ("workers: 10000\n", "workers"),
        ("cpuAffinity: [99999, 100000]\n", "cpuAffinity"),
        ("queryPort: 9400\nadminPort: 9400\n", "adminPort"),
        (
            "resourceQueryMapping:\n  gs: {group: a, version: v1, resource: gs, addressPath: \"a..b\", portName: p}\n",
            "resourceQueryMapping.gs.addressPath",
        ),
        ("queryPort: lots\n", "queryPort"),
    ];
    for (yaml, key) in cases {
        let path = dir.join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let path = path.to_str().unwrap();
        let (code, _, err) = run_binary(&["check-config", path]);
        assert_eq!(code, 1, "{yaml}");
        assert!(err.contains(key), "{yaml}: {err}");
        // Said once: the message is not repeated by its own error chain.
        let reason = err.trim().rsplit(": ").next().unwrap();
        assert_eq!(err.matches(reason).count(), 1, "said twice: {err}");
        // Running refuses the same config with the same message.
        let (code, _, err) = run_binary(&["--config", path]);
        assert_eq!(code, 1);
        assert!(err.contains(key), "{err}");
    }
    let (code, _, err) = run_binary(&["check-config", "/nonexistent/config.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // An unknown key lists the known ones once.
    let path = dir.join("unknown.yaml");
    std::fs::write(&path, "sesionTimeoutSeconds: 3\n").unwrap();
    let (code, _, err) = run_binary(&["check-config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.matches("sessionTimeoutSeconds").count(), 1, "{err}");
    // No config at all is not an error outside a cluster (the built-in example runs):
    // tests/embedded_default.rs covers it.
}

#[test]
fn a_port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = scratch_dir();
    let config = base_config("").replace(
        "queryPort: 0",
        &format!("queryPort: {}", taken.local_addr().unwrap().port()),
    );
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    let (code, _, err) = run_binary(&["--config", dir.join("c.yaml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("query port"), "{err}");
}

#[test]
fn workers_that_would_exhaust_file_descriptors_are_refused() {
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir();
    let path = dir.join("many-workers.yaml");
    std::fs::write(
        &path,
        "workers: 400\ninventory: {kind: file, path: x.yaml}\nresourceQueryMapping: {}\n",
    )
    .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_udp-director"));
    command
        .arg("check-config")
        .arg(&path)
        .env("RUST_LOG", "off");
    // SAFETY: setrlimit in the child between fork and exec touches no shared state.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 512,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = command.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("workers") && err.contains("open-file limit (512)"),
        "{err}"
    );
}
