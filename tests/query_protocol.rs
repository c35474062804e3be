//! The query port's framing and limits, against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn proxy(extra: &str) -> (Proxy, Echo) {
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config(extra),
        &gameserver("gs", "Ready", echo.addr, ""),
    );
    (proxy, echo)
}

const Q: &str = r#"{"resourceType":"gameserver"}"#;

#[test]
fn many_requests_per_connection_in_order() {
    let (proxy, _echo) = proxy("");
    let answers = proxy
        .query_raw(format!("{Q}\n\n{{broken\n{Q}\r\n  \n{{\"resourceType\":\"x\"}}\n").as_bytes());
    assert_eq!(answers.len(), 4, "blank lines are skipped: {answers:?}");
    assert!(answers[0]["token"].is_string());
    assert_eq!(answers[1]["code"], "bad_request");
    assert!(answers[2]["token"].is_string());
    assert_eq!(answers[3]["code"], "unknown_resource_type");
    assert_ne!(answers[0]["token"], answers[2]["token"]);
}

#[test]
fn request_at_eof_without_newline_is_answered() {
    let (proxy, _echo) = proxy("");
    let answers = proxy.query_raw(Q.as_bytes());
    assert_eq!(answers.len(), 1);
    assert!(answers[0]["token"].is_string());
}

#[test]
fn oversized_request_gets_an_error_and_a_close() {
    let (proxy, _echo) = proxy("");
    let mut huge = vec![b'{'; 70 * 1024];
    huge.push(b'\n');
    let mut s = TcpStream::connect(proxy.query).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The proxy may close before reading everything; a write error is fine.
    let _ = s.write_all(&huge);
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["code"], "bad_request");
    assert!(first["error"].as_str().unwrap().contains("larger"));
    // The proxy still serves others.
    assert!(proxy.query(Q)["token"].is_string());
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let (proxy, _echo) = proxy("queryIdleTimeoutSeconds: 1\n");
    let mut slow = TcpStream::connect(proxy.query).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    // A byte every 200 ms never completes a request within 1 s.
    for b in br#"{"resourceType""# {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let mut text = String::new();
    let _ = slow.read_to_string(&mut text);
    assert!(
        text.contains("bad_request") && text.contains("within"),
        "{text:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    // An idle connection is closed with the same error.
    let mut idle = TcpStream::connect(proxy.query).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = String::new();
    idle.read_to_string(&mut text).unwrap();
    assert!(text.contains("bad_request"), "{text:?}");
    assert!(proxy.query(Q)["token"].is_string());
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let (proxy, _echo) = proxy("maxQueryConnections: 3\n");
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(proxy.query).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..5 {
        assert_eq!(proxy.query(Q)["code"], "overloaded");
    }
    drop(held);
    proxy.eventually("served again", |p| p.query(Q)["token"].is_string());
}

#[test]
fn binary_query_helper_prints_a_token() {
    let (proxy, _echo) = proxy("");
    let addr = proxy.query.to_string();
    let (code, out, err) = run_binary(&[
        "query",
        "--addr",
        &addr,
        "--resource-type",
        "gameserver",
        "--namespace",
        "starx",
        "-l",
        "agones.dev/fleet=f1",
        "--status-path",
        "status.state",
        "--status-value",
        "Ready",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().len(), 36, "{out}");
    let (code, _, err) = run_binary(&["query", "--addr", &addr, "--resource-type", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_resource_type"), "{err}");
}

#[test]
fn an_allocating_query_is_refused_with_a_clear_code_where_it_cannot_allocate() {
    // The file inventory has no API server to allocate through; a mapping without allocation
    // settings cannot allocate; a request id must be printable and short.
    let config = base_config("").replace(
        "portName: default}",
        "portName: default, allocation: {timeoutMs: 500}}",
    );
    let echo = Echo::plain();
    let p = Proxy::start(&config, &gameserver("gs", "Ready", echo.addr, ""));
    let ask = |q: &str| p.query(q);
    let a = ask(r#"{"resourceType":"gameserver","namespace":"starx","allocate":true}"#);
    assert_eq!(a["code"], "allocation_failed", "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("inventory.kind: kubernetes"),
        "{a}"
    );
    let a = ask(r#"{"resourceType":"gameserver","allocate":true}"#);
    assert_eq!(a["code"], "bad_request", "{a}");
    assert!(a["error"].as_str().unwrap().contains("namespace"), "{a}");
    let a = ask(
        r#"{"resourceType":"gameserver","namespace":"starx","allocate":true,"statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#,
    );
    assert_eq!(a["code"], "bad_request", "{a}");
    let long = "x".repeat(129);
    for id in ["", "has space", long.as_str()] {
        let a = ask(&format!(
            r#"{{"resourceType":"gameserver","namespace":"starx","requestId":"{id}"}}"#
        ));
        assert_eq!(a["code"], "bad_request", "{id:?}: {a}");
        assert!(a["error"].as_str().unwrap().contains("requestId"), "{a}");
    }
    // Without "allocate", the same mapping still selects as always.
    let a = ask(r#"{"resourceType":"gameserver","namespace":"starx","requestId":"r-1"}"#);
    assert!(a["token"].is_string(), "{a}");
    assert_eq!(
        p.metric(r#"udp_director_queries_total{result="allocation_failed"}"#),
        1.0
    );
    // A mapping without allocation settings cannot allocate.
    let plain = Proxy::start(&base_config(""), &gameserver("gs", "Ready", echo.addr, ""));
    let a = plain.query(r#"{"resourceType":"gameserver","namespace":"starx","allocate":true}"#);
    assert_eq!(a["code"], "bad_request", "{a}");
    assert!(a["error"].as_str().unwrap().contains("allocation"), "{a}");
}
