//! Sealed tokens through the real binary: replicas sharing a key redeem each other's tokens,
//! each replica once per data port; a rotated-out key, a flipped bit, a truncated token and a
//! token bound to another client are refused and counted; UDP first datagram, control packet
//! and a TCP data port (no newline needed) alike.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "HxwdHhscGRoXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";
const QUERY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;
const READY: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#;
const ALLOCATED: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Allocated"}}"#;

/// A proxy whose `tokenSecret` file holds `keys` (one a line), plus `extra` config.
fn sealed_proxy(dir: &Path, name: &str, keys: &[&str], extra: &str, inventory: &str) -> Proxy {
    let file = dir.join(format!("{name}.keys"));
    std::fs::write(&file, keys.join("\n") + "\n").unwrap();
    let config = base_config(&format!(
        "tokenSecret: {{file: {}}}\n{extra}",
        file.display()
    ));
    Proxy::start(&config, inventory)
}

fn rejected(p: &Proxy, reason: &str) -> f64 {
    p.metric(&format!(
        r#"udp_director_tokens_rejected_total{{reason="{reason}"}}"#
    ))
}

/// Sends `token` then a ping from a fresh client; the reply, if one comes.
fn redeem(token: &[u8], at: SocketAddr) -> Option<Vec<u8>> {
    let c = client();
    c.send_to(token, at).unwrap();
    c.send_to(b"ping", at).unwrap();
    datagram_within(&c, Duration::from_millis(500))
}

#[test]
fn replicas_sharing_a_key_redeem_each_others_tokens_once_each_and_rotation_works() {
    let echo = Echo::tagged(b'A');
    let inventory = gameserver("gs-a", "Ready", echo.addr, "");
    let keys = scratch_dir();
    // a: the old key only; b: rotating (new key first, old one still opens); c: rotated.
    let a = sealed_proxy(&keys, "a", &[K1], "", &inventory);
    let b = sealed_proxy(&keys, "b", &[K2, K1], "", &inventory);
    let c = sealed_proxy(&keys, "c", &[K2], "", &inventory);

    let token = a.token(QUERY);
    assert!(token.starts_with("S2"), "{token}");
    assert!(token.len() > 36 && token.bytes().all(|b| b.is_ascii_graphic()));
    assert!(
        !token.contains(&echo.addr.port().to_string()),
        "the backend is not readable"
    );
    // Redeemed on another replica than the one that issued it, then refused there on replay.
    assert_eq!(
        redeem(token.as_bytes(), b.data_addr()).as_deref(),
        Some(&b"Aping"[..])
    );
    assert_eq!(redeem(token.as_bytes(), b.data_addr()), None, "replay on b");
    b.eventually("the replay counted", |b| rejected(b, "used") == 1.0);
    // Each replica keeps its own ledger: a redeems it once too (the threat model in
    // docs/security.md).
    assert_eq!(
        redeem(token.as_bytes(), a.data_addr()).as_deref(),
        Some(&b"Aping"[..])
    );
    // Sealed with a key that c no longer holds.
    assert_eq!(redeem(token.as_bytes(), c.data_addr()), None);
    c.eventually("a rotated-out key counted", |c| {
        rejected(c, "invalid") == 1.0
    });
    // b seals with the new key, which c holds.
    let from_b = b.token(QUERY);
    assert_eq!(
        redeem(from_b.as_bytes(), c.data_addr()).as_deref(),
        Some(&b"Aping"[..])
    );

    // A flipped bit anywhere, or a truncated token: refused and counted, no session.
    let fresh = a.token(QUERY);
    let mut flipped = fresh.clone().into_bytes();
    let middle = flipped.len() / 2;
    flipped[middle] = if flipped[middle] == b'A' { b'B' } else { b'A' };
    assert_eq!(redeem(&flipped, b.data_addr()), None);
    assert_eq!(
        redeem(&fresh.as_bytes()[..fresh.len() - 3], b.data_addr()),
        None
    );
    b.eventually("tampered tokens counted", |b| rejected(b, "invalid") == 2.0);
    // The untouched token still works after its tampered copies were refused.
    assert_eq!(
        redeem(fresh.as_bytes(), b.data_addr()).as_deref(),
        Some(&b"Aping"[..])
    );
    assert_eq!(
        b.metric(r#"udp_director_sessions_created_total{kind="token",protocol="udp"}"#),
        2.0
    );
}

#[test]
fn a_sealed_token_expires() {
    let echo = Echo::tagged(b'A');
    let keys = scratch_dir();
    let p = sealed_proxy(
        &keys,
        "p",
        &[K1],
        "tokenTtlSeconds: 1\n",
        &gameserver("gs-a", "Ready", echo.addr, ""),
    );
    let token = p.token(QUERY);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(redeem(token.as_bytes(), p.data_addr()), None);
    p.eventually("counted as expired", |p| rejected(p, "expired") == 1.0);
}

#[test]
fn a_control_packet_and_a_tcp_data_port_take_sealed_tokens() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let chat = TcpEcho::tagged(b'C');
    let inventory = format!(
        r#"- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: gs-a, namespace: starx}}
  status: {{state: Ready, address: "127.0.0.1", ports: [{{name: game, port: {}}}, {{name: chat, port: {}}}]}}
- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: gs-b, namespace: starx}}
  status: {{state: Allocated, address: "127.0.0.1", ports: [{{name: game, port: {}}}]}}
"#,
        a.addr.port(),
        chat.addr.port(),
        b.addr.port()
    );
    let keys = scratch_dir();
    let file = keys.join("keys");
    std::fs::write(&file, format!("{K1}\n")).unwrap();
    let config = format!(
        r#"
bindAddress: 127.0.0.1
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
tokenSecret: {{file: {}}}
dataPorts:
  - {{name: chat, port: 0, protocol: tcp}}
  - {{name: game, port: 0, protocol: udp}}
inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 50}}
resourceQueryMapping:
  gameserver:
    group: agones.dev
    version: v1
    resource: gameservers
    addressPath: status.address
    ports: [{{name: game, portName: game}}, {{name: chat, portName: chat}}]
"#,
        file.display()
    );
    let issuer = Proxy::start(&config, &inventory);
    let redeemer = Proxy::start(&config, &inventory);
    let port = |p: &Proxy, name: &str| p.data.iter().find(|(n, _)| n == name).unwrap().1;

    let token = issuer.token(READY);
    // TCP: the token's length is in its header, so stream data may follow it at once.
    let mut tcp = tcp_client(port(&redeemer, "chat"));
    tcp.write_all(format!("{token}hello").as_bytes()).unwrap();
    assert_eq!(read_exact_within(&mut tcp, 6), b"Chello");
    // UDP on the same grant's other port, then a move with a sealed control packet.
    let udp = client();
    udp.send_to(token.as_bytes(), port(&redeemer, "game"))
        .unwrap();
    udp.send_to(b"one", port(&redeemer, "game")).unwrap();
    assert_eq!(expect_datagram(&udp), b"Aone");
    let second = issuer.token(ALLOCATED);
    udp.send_to(&control_packet(&second), port(&redeemer, "game"))
        .unwrap();
    udp.send_to(b"two", port(&redeemer, "game")).unwrap();
    assert_eq!(expect_datagram(&udp), b"Btwo");
    // A forged control packet leaves the session where it is.
    let mut forged = control_packet(&issuer.token(READY));
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    udp.send_to(&forged, port(&redeemer, "game")).unwrap();
    udp.send_to(b"three", port(&redeemer, "game")).unwrap();
    assert_eq!(expect_datagram(&udp), b"Bthree");
    assert_eq!(rejected(&redeemer, "invalid"), 1.0);
}

#[test]
fn a_token_bound_to_the_querying_client_opens_for_it_alone() {
    let echo = Echo::tagged(b'A');
    let inventory = gameserver("gs-a", "Ready", echo.addr, "");
    let keys = scratch_dir();
    let sealed = sealed_proxy(&keys, "s", &[K1], "bindTokenToClientIp: true\n", &inventory);
    let uuid = Proxy::start(&base_config("bindTokenToClientIp: true\n"), &inventory);
    for p in [&sealed, &uuid] {
        // The query came from 127.0.0.1: from 127.0.0.2 the token is refused, and not spent.
        let token = p.token(QUERY);
        let stranger = client_on("127.0.0.2:0");
        stranger.send_to(token.as_bytes(), p.data_addr()).unwrap();
        stranger.send_to(b"ping", p.data_addr()).unwrap();
        expect_nothing(&stranger, Duration::from_millis(300));
        p.eventually("counted", |p| rejected(p, "wrong_client") == 1.0);
        assert_eq!(
            redeem(token.as_bytes(), p.data_addr()).as_deref(),
            Some(&b"Aping"[..])
        );
    }
}

#[test]
fn a_bad_key_file_is_refused_at_start_naming_the_key() {
    let dir = scratch_dir();
    let bad = dir.join("bad.keys");
    std::fs::write(&bad, "not base64!\n").unwrap();
    // 17 distinct keys (K1 with its first character changed): over the cap of 16.
    let many = dir.join("many.keys");
    let keys: String = ('A'..='Q').map(|c| format!("{c}{}\n", &K1[1..])).collect();
    std::fs::write(&many, keys).unwrap();
    let config = dir.join("config.yaml");
    for (file, says) in [
        (bad.display().to_string(), "line 1"),
        (dir.join("missing").display().to_string(), "cannot read"),
        (many.display().to_string(), "17 keys, at most 16"),
    ] {
        std::fs::write(
            &config,
            base_config(&format!("tokenSecret: {{file: {file}}}\n")),
        )
        .unwrap();
        let (code, _, stderr) = run_binary(&["--config", config.to_str().unwrap()]);
        assert_ne!(code, 0);
        assert!(
            stderr.contains("tokenSecret.file") && stderr.contains(says),
            "{stderr}"
        );
    }
}
