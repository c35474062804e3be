//! `udp-director` with no config: outside a cluster it runs the built-in example with its file
//! inventory (README quick start); inside one it asks for a config.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

/// Kills the proxy however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use common::*;

#[test]
fn no_config_outside_a_cluster_runs_the_built_in_example() {
    let dir = scratch_dir();
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_udp-director"))
            .current_dir(&dir)
            .env_remove("CONFIG_PATH")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        // The example's fixed ports (9000, 9090, 7777) may be taken by a proxy a developer runs.
        assert!(err.contains("in use"), "{err}");
        skip_test(&format!("the example's ports are in use here: {err}"));
        return;
    }
    assert!(
        line.starts_with(
            "listening query=127.0.0.1:9000 admin=127.0.0.1:9090 data=default/udp=127.0.0.1:7777"
        ),
        "{line}"
    );
    // The example inventory's tutorial fleet answers queries, once the file is loaded.
    let ask = || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9000").unwrap();
        std::io::Write::write_all(
            &mut s,
            b"{\"resourceType\":\"gameserver\",\"namespace\":\"starx\"}\n",
        )
        .unwrap();
        let mut text = String::new();
        BufReader::new(s).read_line(&mut text).unwrap();
        text
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut answer = ask();
    while answer.contains("inventory_unavailable") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        answer = ask();
    }
    assert!(answer.contains("\"token\""), "{answer}");
}

#[test]
fn no_config_in_a_cluster_asks_for_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_udp-director"))
        .env_remove("CONFIG_PATH")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no config: pass --config FILE"), "{err}");
}
