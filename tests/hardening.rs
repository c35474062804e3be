//! What a careless operator or a hostile client does to a running proxy: half-written inventory
//! files, stalled admin connections, one address hogging the query port, a second instance on
//! the same ports, remote callers of the sessions API, IPv4 clients on a dual-stack socket.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;

const ANY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;

/// A session through the proxy to `echo`, checked with one round trip.
fn session(proxy: &Proxy) -> std::net::UdpSocket {
    session_for(proxy, ANY)
}

fn session_for(proxy: &Proxy, query: &str) -> std::net::UdpSocket {
    let c = client();
    c.send_to(proxy.token(query).as_bytes(), proxy.data_addr())
        .unwrap();
    c.send_to(b"hello", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"hello");
    c
}

/// Files the inventory refused so far for `reason`.
fn refusals(proxy: &Proxy, reason: &str) -> f64 {
    proxy.metric(&format!(
        r#"udp_director_inventory_file_refusals_total{{reason="{reason}"}}"#
    ))
}

/// Waits until the inventory has looked at the file and refused it for `reason` once more
/// than `before`: the refusal was seen, not only nothing changed.
fn refused_once_more(proxy: &Proxy, reason: &str, before: f64) {
    proxy.eventually(&format!("the file refused as {reason}"), |p| {
        refusals(p, reason) > before
    });
}

fn still_forwards(proxy: &Proxy, c: &std::net::UdpSocket, what: &str) {
    c.send_to(what.as_bytes(), proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(c), what.as_bytes(), "after {what}");
    assert_eq!(proxy.sessions().len(), 1, "after {what}");
    assert_eq!(proxy.http("GET", "/readyz").0, 200, "after {what}");
}

#[test]
fn inventory_edits_that_are_not_whole_keep_every_session() {
    let echo = Echo::plain();
    let good = gameserver("gs-a", "Ready", echo.addr, "")
        + &gameserver("gs-b", "Ready", echo.addr, ", map: b");
    let proxy = Proxy::start(
        &base_config("").replace(
            "pollIntervalMillis: 50}",
            "pollIntervalMillis: 50, maxBytes: 4096}",
        ),
        &good,
    );
    // The session goes to the file's last object, the one a cut-off write loses.
    let c = session_for(
        &proxy,
        r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"b"}}"#,
    );
    let path = proxy.dir.join("inventory.yaml");
    for reason in [
        "empty",
        "parse_error",
        "invalid_object",
        "too_large",
        "unsettled",
    ] {
        assert_eq!(
            refusals(&proxy, reason),
            0.0,
            "{reason} shows from the start"
        );
    }
    let rejected = |p: &Proxy, kind: &str| {
        p.metric(&format!(
            r#"udp_director_inventory_rejected_objects_total{{kind="{kind}"}}"#
        ))
    };

    // Emptied in place (`: > inventory.yaml`).
    std::fs::write(&path, "").unwrap();
    refused_once_more(&proxy, "empty", 0.0);
    still_forwards(&proxy, &c, "emptied");

    // Cut off in the middle of the second object: in a flow mapping (invalid YAML), and at a
    // line boundary (valid YAML whose last object has no kind or name).
    std::fs::write(&path, &good[..good.len() - 40]).unwrap();
    refused_once_more(&proxy, "parse_error", 0.0);
    still_forwards(&proxy, &c, "half-written");
    let second = good.rfind("- apiVersion").unwrap();
    let cut = &good[..good[second..].find('\n').unwrap() + second + 1];
    assert!(cut.ends_with("- apiVersion: agones.dev/v1\n"), "{cut}");
    std::fs::write(&path, cut).unwrap();
    refused_once_more(&proxy, "invalid_object", 0.0);
    // No kind: counted, under `other`.
    assert_eq!(rejected(&proxy, "other"), 1.0);
    still_forwards(&proxy, &c, "cut at a line");

    // Names and labels past Kubernetes' limits: a name over 253 characters (it would become
    // a label of every metric and log line about the server; this file's maxBytes keeps it
    // short of the 10,000 a careless script writes) and a label key with a space.
    let long = good.replace("name: gs-b,", &format!("name: {},", "g".repeat(1_000)));
    let bad_label = good.replace("map: b", "\"bad key\": b");
    let before = refusals(&proxy, "invalid_object");
    std::fs::write(&path, &long).unwrap();
    refused_once_more(&proxy, "invalid_object", before);
    std::fs::write(&path, &bad_label).unwrap();
    refused_once_more(&proxy, "invalid_object", before + 1.0);
    // Counted by the mapping's kind (its resource, as the mapping names no kind).
    assert_eq!(rejected(&proxy, "gameservers"), 2.0);
    still_forwards(&proxy, &c, "over the name limits");
    let (_, metrics) = proxy.http("GET", "/metrics");
    assert!(
        metrics.lines().all(|l| l.len() < 512),
        "a long name reached a metric line"
    );

    // Grown past inventory.maxBytes.
    let huge: String = (0..60)
        .map(|i| gameserver(&format!("gs-{i}"), "Ready", echo.addr, ""))
        .collect();
    assert!(huge.len() > 4096);
    std::fs::write(&path, &huge).unwrap();
    refused_once_more(&proxy, "too_large", 0.0);
    still_forwards(&proxy, &c, "over maxBytes");
    assert_eq!(
        proxy.metric(r#"udp_director_inventory_objects{resource_type="gameserver"}"#),
        2.0,
        "the last good inventory stays"
    );

    // Written slowly, a piece at a time, faster than the file is polled: each version the
    // inventory sees changes again before it is still, so it is passed over as unsettled
    // (under load one may settle and be refused as not whole); never applied half-done. The
    // file ends with a third server, applied once the writing stops.
    let grown = good.clone() + &gameserver("gs-c", "Ready", echo.addr, "");
    let not_applied = |p: &Proxy| -> f64 {
        ["unsettled", "empty", "parse_error", "invalid_object"]
            .iter()
            .map(|reason| refusals(p, reason))
            .sum()
    };
    let before = not_applied(&proxy);
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in grown.as_bytes().chunks(grown.len() / 4 + 1) {
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(proxy.sessions().len(), 1);
    }
    drop(file);
    proxy.eventually("the whole file applied", |p| {
        p.metric(r#"udp_director_inventory_objects{resource_type="gameserver"}"#) == 3.0
    });
    assert!(
        not_applied(&proxy) > before,
        "no half-written version was seen and passed over"
    );
    still_forwards(&proxy, &c, "slow write");

    // Only an explicit empty list empties the inventory, and then the session ends.
    std::fs::write(&path, "[]\n").unwrap();
    proxy.eventually("session ended", |p| p.sessions().is_empty());
    assert_eq!(proxy.query(ANY)["code"], "no_match");
}

/// A client socket bound to `from` (any 127.0.0.0/8 address works on loopback).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Opens `n` connections from `from` that send half a request line and stop.
fn stall(from: &str, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect_from(from, to);
            s.write_all(b"GET /metr").unwrap();
            s
        })
        .collect()
}

/// True when the server has already closed `s` (EOF or reset), without waiting.
fn closed_now(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let closed = closed_within(s, Duration::ZERO);
    s.set_nonblocking(false).unwrap();
    closed
}

/// True when the server has closed `s` (EOF or reset) within `within` (zero: do not wait).
fn closed_within(s: &TcpStream, within: Duration) -> bool {
    if !within.is_zero() {
        s.set_read_timeout(Some(within)).unwrap();
    }
    let mut buf = [0u8; 512];
    match (&*s).read(&mut buf) {
        Ok(0) => true,
        // hyper answers a header-read timeout with 408 before it closes.
        Ok(n) => String::from_utf8_lossy(&buf[..n]).contains("408"),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// `GET path` over a connection from `from`: the status, 0 when closed without an answer.
fn get_from(from: &str, to: SocketAddr, path: &str) -> u16 {
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn stalled_admin_connections_are_capped_and_closed() {
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config(""),
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    // One address: past its share (32) the server closes within a second (it waits that long
    // for a probe's request line, which these never finish).
    let hog = stall("127.0.0.1", proxy.admin, 40);
    std::thread::sleep(Duration::from_millis(1300));
    let refused = hog.iter().filter(|s| closed_now(s)).count();
    assert_eq!(refused, 8, "the per-address cap is 32");
    assert_eq!(get_from("127.0.0.2", proxy.admin, "/healthz"), 200);
    // Many addresses: past the total (256) the server closes within a second, and the query
    // port still answers.
    let crowd: Vec<TcpStream> = (10..19)
        .flat_map(|i| stall(&format!("127.0.0.{i}"), proxy.admin, 32))
        .collect();
    // With every slot taken, the probes are still answered (the kubelet must not kill a
    // healthy proxy), and nothing else is.
    assert_eq!(get_from("127.0.0.30", proxy.admin, "/healthz"), 200);
    assert_eq!(get_from("127.0.0.30", proxy.admin, "/readyz"), 200);
    assert_eq!(get_from("127.0.0.30", proxy.admin, "/metrics"), 503);
    std::thread::sleep(Duration::from_millis(1300));
    let refused = crowd.iter().filter(|s| closed_now(s)).count();
    assert_eq!(refused, 32 + 9 * 32 - 256, "the total cap is 256");
    assert!(proxy.query(ANY).get("token").is_some());
    // Every stalled connection is closed once the header-read timeout (5 s) passes, and the
    // admin port serves again.
    let started = Instant::now();
    for s in hog.iter().chain(&crowd) {
        assert!(closed_within(s, Duration::from_secs(8)), "still open");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
}

#[test]
fn one_address_cannot_lock_others_out_of_the_query_port() {
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config("maxQueryConnections: 40\nmaxQueryConnectionsPerIp: 4\n"),
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    // One address holds its four connections idle; a fifth is refused with an error line.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| connect_from("127.0.0.1", proxy.query))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = connect_from("127.0.0.1", proxy.query);
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = fifth.read_to_string(&mut answer);
    assert!(answer.contains("\"code\":\"overloaded\""), "{answer}");
    // Another address is served all the while.
    let mut other = connect_from("127.0.0.3", proxy.query);
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    writeln!(other, "{ANY}").unwrap();
    other.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"token\""), "{answer}");
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="overloaded"}"#),
        1.0,
        "refusals are counted"
    );
    drop(idle);
}

#[test]
fn client_input_is_quoted_short_in_errors() {
    let proxy = Proxy::start(&base_config(""), "[]\n");
    let long = "x".repeat(60_000);
    for request in [
        format!(r#"{{"resourceType":"{long}"}}"#),
        format!(r#"{{"resourceType":"gameserver","{long}":1}}"#),
        format!(r#"{{"type":"{long}","resourceType":"gameserver"}}"#),
        format!(r#"{{"resourceType":"gameserver","namespace":"{long}"}}"#),
        format!(
            r#"{{"resourceType":"gameserver","statusQuery":{{"jsonPath":"a..{long}","expectedValue":"x"}}}}"#
        ),
    ] {
        let answer = proxy.query(&request);
        let text = answer.to_string();
        assert!(answer.get("error").is_some(), "{}", &text[..200]);
        assert!(text.len() < 1024, "{} bytes echoed", text.len());
    }
    let (status, body) = proxy.http("DELETE", &format!("/sessions/{}", "y".repeat(8000)));
    assert_eq!(status, 400);
    assert!(body.len() < 1024, "{} bytes echoed", body.len());
}

#[test]
fn a_second_instance_on_the_same_data_port_exits_naming_it() {
    let echo = Echo::plain();
    let first = Proxy::start(
        &base_config(""),
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    let port = first.data_addr().port();
    let dir = scratch_dir();
    let config = base_config("").replace("dataPort: 0", &format!("dataPort: {port}"));
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    std::fs::write(dir.join("inventory.yaml"), "[]\n").unwrap();
    let (code, _, err) = run_binary(&["--config", dir.join("c.yaml").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("already in use"),
        "{err}"
    );
    // The first keeps all of its clients.
    for _ in 0..8 {
        let c = session(&first);
        drop(c);
    }
}

#[test]
fn ipv4_clients_on_a_dual_stack_socket_are_known_by_their_ipv4_address() {
    if std::net::UdpSocket::bind("[::]:0").is_err() {
        skip_test("no IPv6 on this machine");
        return;
    }
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config("").replace("bindAddress: 127.0.0.1", "bindAddress: \"::\""),
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    let data = SocketAddr::new("127.0.0.1".parse().unwrap(), proxy.data_addr().port());
    let query = SocketAddr::new("127.0.0.1".parse().unwrap(), proxy.query.port());
    let mut s = TcpStream::connect(query).unwrap();
    writeln!(s, "{ANY}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let token: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let c = client();
    c.send_to(token["token"].as_str().unwrap().as_bytes(), data)
        .unwrap();
    c.send_to(b"v4", data).unwrap();
    assert_eq!(expect_datagram(&c), b"v4");
    let admin = SocketAddr::new("127.0.0.1".parse().unwrap(), proxy.admin.port());
    let (status, body) = http_request(admin, "GET", "/sessions", "");
    assert_eq!(status, 200, "{body}");
    let me = c.local_addr().unwrap().to_string();
    assert!(body.contains(&format!("\"client\":\"{me}\"")), "{body}");
    let (status, body) = http_request(admin, "DELETE", "/sessions/127.0.0.1", "");
    assert_eq!(
        (status, body.contains("\"killed\":1")),
        (200, true),
        "{body}"
    );
}

#[test]
fn the_sessions_api_answers_loopback_only_by_default() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            skip_test(&format!("cannot make a network namespace: {e}"));
            return;
        }
    };
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config("").replace("bindAddress: 127.0.0.1", "bindAddress: 0.0.0.0"),
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    let admin = SocketAddr::new(ns.host_ip, proxy.admin.port());
    let from_ns = |method: &'static str, path: &'static str| {
        ns.run(move || http_request(admin, method, path, ""))
    };
    // Probes and Prometheus reach health and metrics from anywhere.
    assert_eq!(from_ns("GET", "/healthz").0, 200);
    assert_eq!(from_ns("GET", "/readyz").0, 200);
    assert_eq!(from_ns("GET", "/metrics").0, 200);
    // Player addresses and kills are for loopback callers.
    let _c = session(&proxy);
    let (status, body) = from_ns("GET", "/sessions");
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
    assert!(body.contains("sessionsApi.auth"), "{body}");
    assert_eq!(from_ns("DELETE", "/sessions/127.0.0.1").0, 403);
    assert_eq!(proxy.sessions().len(), 1, "nothing was killed");
    assert_eq!(proxy.http("GET", "/sessions").0, 200);
}

#[test]
fn logs_name_backends_and_refusals_are_throttled() {
    let (a, b) = (Echo::plain(), Echo::plain());
    let both =
        gameserver("gs-a", "Ready", a.addr, "") + &gameserver("gs-b", "Ready", b.addr, ", map: b");
    let config = base_config(
        "maxQueryConnectionsPerIp: 1\ndefaultEndpoint: {resourceType: gameserver, namespace: starx, labelSelector: {map: b}}\n",
    );
    let dir_env = std::ffi::OsString::from("info");
    let proxy = Proxy::launch(&config, &both, &[("RUST_LOG", dir_env.as_os_str())]);
    proxy.eventually("ready", |p| p.http("GET", "/readyz").0 == 200);
    let _c = session_for(
        &proxy,
        r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"b"}}"#,
    );
    proxy.write_inventory(&gameserver("gs-a", "Ready", a.addr, ""));
    proxy.eventually("gs-b's session ended", |p| p.sessions().is_empty());
    let log = proxy.log();
    let named = format!("GameServer starx/gs-b at {}", b.addr);
    assert!(
        log.contains(&format!("default backend now {named}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{named} left the inventory")),
        "{log}"
    );
    assert!(!log.contains("BackendId"), "{log}");

    // Twenty refusals inside a second: counted each, logged at most twice.
    let _held = connect_from("127.0.0.1", proxy.query);
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..20 {
        let mut s = connect_from("127.0.0.1", proxy.query);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.contains("overloaded"), "{answer}");
    }
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="overloaded"}"#),
        20.0
    );
    let lines = proxy.log().matches("query server: refusing").count();
    assert!((1..=2).contains(&lines), "{lines} refusal lines");
}

#[test]
fn a_control_packet_flood_on_a_session_stays_within_its_allowance() {
    let echo = Echo::plain();
    let proxy = Proxy::start(&base_config(""), &gameserver("gs", "Ready", echo.addr, ""));
    let c = session(&proxy);
    let rejected = || -> f64 {
        [
            "unknown",
            "invalid",
            "expired",
            "used",
            "wrong_port",
            "wrong_client",
        ]
        .iter()
        .map(|r| {
            proxy.metric(&format!(
                r#"udp_director_tokens_rejected_total{{reason="{r}"}}"#
            ))
        })
        .sum()
    };
    let limited = r#"udp_director_packets_dropped_total{reason="rate_limited",source="client"}"#;
    let started = Instant::now();
    // 2,000 control packets with tokens nobody issued, each a lookup the proxy would make,
    // with a round trip of game traffic after every 20.
    let forged = control_packet("00000000-0000-4000-8000-000000000000");
    for i in 0..2_000 {
        c.send_to(&forged, proxy.data_addr()).unwrap();
        if i % 20 == 19 {
            c.send_to(b"game", proxy.data_addr()).unwrap();
            assert_eq!(
                expect_datagram(&c),
                b"game",
                "the session keeps its traffic"
            );
        }
    }
    proxy.eventually("every control packet is accounted for", |p| {
        rejected() + p.metric(limited) >= 2_000.0
    });
    let seconds = started.elapsed().as_secs_f64().ceil();
    let looked_at = rejected();
    assert!(
        looked_at <= 4.0 + 2.0 * seconds,
        "{looked_at} control packets were looked at in {seconds} s: over the allowance"
    );
    assert!(proxy.metric(limited) >= 2_000.0 - looked_at);
    assert_eq!(proxy.sessions().len(), 1);
}
