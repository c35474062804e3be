//! `udp-director` with no config: outside a cluster it runs the built-in example with its file
//! inventory, and the README's quick start, read from the README, holds against it; inside a
//! cluster it asks for a config.

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
    walk_through_the_readme_quick_start();
}

/// The README's quick start as a newcomer runs it against this proxy: its commands are read
/// from the README itself (the echo server's address, the `query` subcommand's arguments, the
/// raw-protocol line and the answer it shows, the token-first datagram and what it prints, the
/// live move with a second token and what it prints, the admin calls), so a command or a shown
/// output that no longer holds fails here. The echo servers are the README's own `perf echo`
/// commands, run from the perf binary the workspace build puts beside this one.
fn walk_through_the_readme_quick_start() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Quick start")
        .expect("a Quick start section");
    let end = start
        + readme[start..]
            .find("\n## ")
            .unwrap_or(readme.len() - start);
    let section = &readme[start..end];
    // Shell lines, with `\` continuations joined.
    let lines: Vec<String> = section
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .map(str::to_string)
        .collect();
    let find = |prefix: &str| -> &str {
        lines
            .iter()
            .find(|l| l.starts_with(prefix) || l.contains(prefix))
            .unwrap_or_else(|| panic!("the quick start no longer has `{prefix}`:\n{section}"))
    };

    // The echo servers, as the README starts them: its `perf echo` commands, run from the
    // perf binary (`cargo test --workspace`, the README's test command, builds it).
    let perf = std::path::Path::new(env!("CARGO_BIN_EXE_udp-director"))
        .with_file_name("udp-director-perf");
    if !perf.exists() {
        skip_test(&format!(
            "{} is not built (the workspace test command builds it; or cargo build -p perf)",
            perf.display()
        ));
        return;
    }
    let echoes: Vec<Killed> = lines
        .iter()
        .filter_map(|l| l.split_once("-p perf -- echo ").map(|(_, args)| args))
        .map(|args| {
            let args: Vec<&str> = args.split('#').next().unwrap().split_whitespace().collect();
            Killed(
                Command::new(&perf)
                    .arg("echo")
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("perf echo starts"),
            )
        })
        .collect();
    assert_eq!(
        echoes.len(),
        2,
        "two echo servers in the quick start:\n{section}"
    );

    // A token from the `query` subcommand, with the README's arguments.
    let query_line = find("TOKEN=$(cargo run -q --release -- query ");
    let args: Vec<&str> = query_line
        .split("-- query ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("TOKEN=$(… -- query ARGS)")
        .split_whitespace()
        .collect();
    let args: Vec<&str> = std::iter::once("query").chain(args).collect();
    let (code, token, err) = run_binary(&args);
    assert_eq!(code, 0, "udp-director {args:?}: {err}");
    let token = token.trim().to_string();
    assert!(
        !token.is_empty() && !token.contains(' '),
        "a bare token: {token:?}"
    );

    // The raw protocol: the README's request line, and the answer it shows.
    let raw_line = find("| nc -q1 127.0.0.1 9000");
    let request = raw_line.split('\'').nth(1).expect("echo '{…}' | nc");
    let shown_at = lines.iter().position(|l| l == raw_line).unwrap() + 1;
    let shown: serde_json::Value =
        serde_json::from_str(lines[shown_at].trim_start_matches("# ")).expect("the shown answer");
    let mut s = std::net::TcpStream::connect("127.0.0.1:9000").unwrap();
    std::io::Write::write_all(&mut s, format!("{request}\n").as_bytes()).unwrap();
    let mut text = String::new();
    BufReader::new(s).read_line(&mut text).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(answer["token"].is_string(), "{answer}");
    assert_eq!(
        answer["ttlSeconds"], shown["ttlSeconds"],
        "{answer} vs the README's {shown}"
    );
    assert_eq!(
        answer["ports"], shown["ports"],
        "{answer} vs the README's {shown}"
    );

    // Token first, then traffic from the same socket: it prints what was sent.
    let udp_line = find("{ echo \"$TOKEN\";");
    let printed = udp_line
        .split("# prints: ")
        .nth(1)
        .expect("what the datagram prints")
        .trim();
    assert!(udp_line.contains("echo \"$TOKEN\"") && udp_line.contains(&format!("echo {printed}")));
    let client_port = udp_line
        .split(" -p ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("nc -p CLIENT_PORT");
    let client = std::net::UdpSocket::bind(format!("127.0.0.1:{client_port}")).unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    client
        .send_to(format!("{token}\n").as_bytes(), "127.0.0.1:7777")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    client
        .send_to(format!("{printed}\n").as_bytes(), "127.0.0.1:7777")
        .unwrap();
    let mut buf = [0u8; 1500];
    let n = client
        .recv(&mut buf)
        .expect("the echo's reply through the proxy");
    assert_eq!(&buf[..n], format!("{printed}\n").as_bytes());

    // The live move: a second token from the README's query, the control packet and a datagram
    // from the same client port; the session now goes to that server.
    let move_query = find("NEW_TOKEN=$(cargo run -q --release -- query ");
    let args: Vec<&str> = move_query
        .split("-- query ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("NEW_TOKEN=$(… -- query ARGS)")
        .split_whitespace()
        .collect();
    let args: Vec<&str> = std::iter::once("query").chain(args).collect();
    let (code, new_token, err) = run_binary(&args);
    assert_eq!(code, 0, "udp-director {args:?}: {err}");
    let move_line = find("RESET%s' \"$NEW_TOKEN\"");
    assert!(
        move_line.contains(&format!("-p {client_port} 127.0.0.1 7777")),
        "{move_line}"
    );
    let moved = move_line
        .split("# prints: ")
        .nth(1)
        .expect("what the move prints")
        .trim();
    let mut control = b"\xFF\xFF\xFF\xFFRESET".to_vec();
    control.extend_from_slice(new_token.trim().as_bytes());
    client.send_to(&control, "127.0.0.1:7777").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    client
        .send_to(format!("{moved}\n").as_bytes(), "127.0.0.1:7777")
        .unwrap();
    let n = client.recv(&mut buf).expect("the reply after the move");
    assert_eq!(&buf[..n], format!("{moved}\n").as_bytes());

    // The admin calls: the session is listed, and the metrics count it.
    assert!(find("curl -s 127.0.0.1:9090/sessions").contains("/sessions"));
    let sessions: serde_json::Value = serde_json::from_str(&admin_get("/sessions")).unwrap();
    let ours = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client"] == format!("127.0.0.1:{client_port}"))
        .unwrap_or_else(|| panic!("our session on /sessions: {sessions}"));
    assert_eq!(
        ours["target"], "127.0.0.1:7002",
        "moved to de_inferno: {ours}"
    );
    drop(echoes);
    assert!(find("curl -s 127.0.0.1:9090/metrics").contains("/metrics"));
    let metrics = admin_get("/metrics");
    assert!(
        metrics.contains("udp_director_tokens_issued_total"),
        "Prometheus text on /metrics"
    );
}

/// `GET path` on the example's admin port: the body.
fn admin_get(path: &str) -> String {
    let mut s = std::net::TcpStream::connect("127.0.0.1:9090").unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
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

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
