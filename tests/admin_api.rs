//! Admin HTTP: metrics that move, health, readiness, session listing (paged and filtered) and
//! kill.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};

use common::*;

#[test]
fn metrics_sessions_and_kill() {
    let a = Echo::plain();
    let proxy = Proxy::start(&base_config(""), &gameserver("gs-a", "Ready", a.addr, ""));
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
    assert_eq!(proxy.http("GET", "/readyz").0, 200);
    assert_eq!(proxy.http("GET", "/nope").0, 404);
    assert_eq!(proxy.http("POST", "/metrics").0, 405);

    let c1 = client();
    let c2 = client();
    for c in [&c1, &c2] {
        c.send_to(
            proxy.token(r#"{"resourceType":"gameserver"}"#).as_bytes(),
            proxy.data_addr(),
        )
        .unwrap();
        c.send_to(b"12345", proxy.data_addr()).unwrap();
        assert_eq!(expect_datagram(c), b"12345");
    }
    let garbage = client();
    garbage.send_to(b"garbage", proxy.data_addr()).unwrap();
    proxy.query("nonsense");

    proxy.eventually("counters visible", |p| {
        p.metric(r#"udp_director_packets_dropped_total{reason="no_session",source="client"}"#)
            == 1.0
    });
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="ok"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="bad_request"}"#),
        1.0
    );
    assert_eq!(proxy.metric("udp_director_tokens_issued_total"), 2.0);
    assert_eq!(proxy.metric("udp_director_tokens_redeemed_total"), 2.0);
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{kind="token",protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_active{protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_packets_total{direction="upstream",protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_bytes_total{direction="downstream",protocol="udp"}"#),
        10.0
    );
    // Selection time only: the unparseable request is counted in queries_total, not timed.
    assert_eq!(
        proxy.metric("udp_director_query_duration_seconds_count"),
        2.0
    );
    let (_, body) = proxy.http("GET", "/metrics");
    assert!(!body.contains("127.0.0.1"), "no client addresses in labels");

    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 2);
    let s = sessions
        .iter()
        .find(|s| s["client"] == c1.local_addr().unwrap().to_string())
        .unwrap();
    assert_eq!(s["target"], a.addr.to_string());
    assert_eq!(s["dataPort"], "default");
    assert_eq!(s["origin"], "token");
    assert_eq!(s["protocol"], "udp");
    assert_eq!(s["packetsUpstream"], 1);
    assert_eq!(s["bytesDownstream"], 5);

    let (status, body) = proxy.http("DELETE", &format!("/sessions/{}", c1.local_addr().unwrap()));
    assert_eq!((status, body.as_str()), (200, r#"{"killed":1}"#));
    assert_eq!(proxy.sessions().len(), 1);
    assert_eq!(proxy.http("DELETE", "/sessions/10.9.9.9:1").0, 404);
    assert_eq!(proxy.http("DELETE", "/sessions/bogus").0, 400);
    assert_eq!(proxy.metric("udp_director_sessions_closed_total"), 1.0);
    // The killed client has no session now; its next datagram is dropped.
    c1.send_to(b"x", proxy.data_addr()).unwrap();
    expect_nothing(&c1, std::time::Duration::from_millis(200));
}

/// Two UDP data ports; gs-a (the default endpoint) and gs-b each serve both.
fn two_port_config() -> String {
    r#"
bindAddress: 127.0.0.1
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
dataPorts: [{name: game, port: 0}, {name: voice, port: 0}]
inventory: {kind: file, path: inventory.yaml, pollIntervalMillis: 50}
resourceQueryMapping:
  gameserver:
    group: agones.dev
    version: v1
    resource: gameservers
    addressPath: status.address
    ports: [{name: game, portName: game}, {name: voice, portName: voice}]
defaultEndpoint: {resourceType: gameserver, namespace: starx, labelSelector: {map: a}}
"#
    .to_string()
}

fn two_port_gameserver(name: &str, map: &str, game: SocketAddr, voice: SocketAddr) -> String {
    format!(
        r#"- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: {name}, namespace: starx, labels: {{map: {map}}}}}
  status: {{state: Ready, address: "127.0.0.1", ports: [{{name: game, port: {}}}, {{name: voice, port: {}}}]}}
"#,
        game.port(),
        voice.port()
    )
}

/// One page of `GET /sessions{query}`: (sessions, continue token, remaining).
fn page(proxy: &Proxy, query: &str) -> (Vec<serde_json::Value>, Option<String>, u64) {
    let (status, body) = proxy.http("GET", &format!("/sessions{query}"));
    assert_eq!(status, 200, "{query}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        v["sessions"].as_array().unwrap().clone(),
        v["continue"].as_str().map(str::to_string),
        v["remaining"].as_u64().unwrap(),
    )
}

/// A session's identity in the listing.
fn key(s: &serde_json::Value) -> (String, String) {
    (
        s["client"].as_str().unwrap().to_string(),
        s["listener"].as_str().unwrap().to_string(),
    )
}

/// Every page of `GET /sessions?limit={limit}`, with `between` run after each page but the last.
fn page_through(
    proxy: &Proxy,
    limit: usize,
    mut between: impl FnMut(),
) -> (Vec<usize>, Vec<(String, String)>) {
    let (mut sizes, mut seen) = (Vec::new(), Vec::new());
    let mut query = format!("?limit={limit}");
    loop {
        let (sessions, token, remaining) = page(proxy, &query);
        sizes.push(sessions.len());
        seen.extend(sessions.iter().map(key));
        let Some(token) = token else {
            assert_eq!(remaining, 0, "the last page");
            return (sizes, seen);
        };
        assert!(remaining > 0, "a continue token means more");
        query = format!("?limit={limit}&continue={token}");
        between();
    }
}

/// A client on `bind` with a default session on `port` (its first datagram is echoed).
fn default_session(bind: &str, port: SocketAddr) -> UdpSocket {
    let c = client_on(bind);
    c.send_to(b"hi", port).unwrap();
    assert_eq!(expect_datagram(&c), b"hi");
    c
}

#[test]
fn sessions_page_in_a_stable_order_and_filter() {
    let (game_a, voice_a, game_b, voice_b) =
        (Echo::plain(), Echo::plain(), Echo::plain(), Echo::plain());
    let inventory = two_port_gameserver("gs-a", "a", game_a.addr, voice_a.addr)
        + &two_port_gameserver("gs-b", "b", game_b.addr, voice_b.addr);
    let proxy = Proxy::start(&two_port_config(), &inventory);
    let port = |name: &str| proxy.data.iter().find(|(n, _)| n == name).unwrap().1;
    let (game, voice) = (port("game"), port("voice"));

    // 250 default sessions from distinct client ports: 200 on game, 50 on voice.
    let mut clients: Vec<UdpSocket> = (0..200)
        .map(|_| default_session("127.0.0.1:0", game))
        .collect();
    clients.extend((0..50).map(|_| default_session("127.0.0.1:0", voice)));

    let (sizes, seen) = page_through(&proxy, 100, || {});
    assert_eq!(sizes, [100, 100, 50]);
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), 250, "no session twice");
    for c in &clients {
        let me = c.local_addr().unwrap().to_string();
        assert!(seen.iter().any(|(client, _)| *client == me), "{me} found");
    }
    let addrs: Vec<SocketAddr> = seen.iter().map(|(c, _)| c.parse().unwrap()).collect();
    assert!(addrs.windows(2).all(|w| w[0] < w[1]), "in client order");
    let (first, _, remaining) = page(&proxy, "?limit=100");
    assert_eq!((first.len(), remaining), (100, 150));
    let (all, token, _) = page(&proxy, "");
    assert_eq!((all.len(), token), (250, None), "500 a page by default");

    // Paging through a table that changes between pages: sessions that lived throughout are
    // each seen once; sessions already seen and ended, or not yet seen and ended, are no harm.
    let mut churn = 0;
    let (_, seen) = page_through(&proxy, 60, || {
        churn += 1;
        let (gone_seen, gone_unseen) = (&clients[churn * 7], &clients[249 - churn]);
        for c in [gone_seen, gone_unseen] {
            let (status, _) =
                proxy.http("DELETE", &format!("/sessions/{}", c.local_addr().unwrap()));
            assert_eq!(status, 200);
        }
        for _ in 0..3 {
            clients.push(default_session("127.0.0.1:0", game));
        }
    });
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no session twice under churn");
    let ended: HashSet<String> = (1..=churn)
        .flat_map(|n| [&clients[n * 7], &clients[249 - n]])
        .map(|c| c.local_addr().unwrap().to_string())
        .collect();
    for c in &clients[..250] {
        let me = c.local_addr().unwrap().to_string();
        if !ended.contains(&me) {
            assert!(seen.iter().any(|(client, _)| *client == me), "{me} skipped");
        }
    }

    // Three token sessions to gs-b from another loopback address.
    let query = r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"b"}}"#;
    let b_clients: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let c = client_on("127.0.0.2:0");
            c.send_to(proxy.token(query).as_bytes(), game).unwrap();
            c.send_to(b"to b", game).unwrap();
            assert_eq!(expect_datagram(&c), b"to b");
            c
        })
        .collect();
    let live = proxy.sessions().len();
    let count = |query: &str| {
        let (sessions, token, remaining) = page(&proxy, &format!("?limit=5000&{query}"));
        assert_eq!((token, remaining), (None, 0));
        sessions
    };
    // The churn above ended one voice session a round.
    let voice_live = 50 - churn;
    let on_voice = count("listener=voice");
    assert_eq!(on_voice.len(), voice_live);
    assert!(on_voice.iter().all(|s| s["dataPort"] == "voice"
        && s["listener"] == "data port voice"
        && s["target"] == voice_a.addr.to_string()));
    assert_eq!(count("listener=data+port+voice").len(), voice_live);
    assert_eq!(count("listener=game").len(), live - voice_live);
    assert_eq!(count("listener=nope").len(), 0);
    let to_b = count(&format!("backend={}", game_b.addr));
    assert_eq!(to_b.len(), 3);
    assert!(to_b.iter().all(|s| s["origin"] == "token"));
    assert_eq!(count("backend=127.0.0.1").len(), live);
    assert_eq!(count(&format!("backend={}", voice_b.addr)).len(), 0);
    assert_eq!(count("client=127.0.0.2").len(), 3);
    let one = b_clients[1].local_addr().unwrap().to_string();
    let just_one = count(&format!("client={one}"));
    assert_eq!(just_one.len(), 1);
    assert_eq!(just_one[0]["client"], one);
    assert_eq!(
        count(&format!(
            "listener=game&client=127.0.0.2&backend={}",
            game_b.addr
        ))
        .len(),
        3
    );
    assert_eq!(count("listener=voice&client=127.0.0.2").len(), 0, "AND");
    let (sessions, token, remaining) = page(&proxy, "?client=127.0.0.2&limit=1");
    assert_eq!((sessions.len(), remaining), (1, 2));
    assert!(token.is_some());

    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=5001", "limit"),
        ("limit=ten", "limit"),
        ("continue=not-a-token", "continue"),
        ("client=nobody", "client"),
        ("backend=10.0.0.1:99999", "backend"),
        ("limit=5&colour=blue", "colour"),
        ("limit=5&limit=6", "limit"),
    ] {
        let (status, body) = proxy.http("GET", &format!("/sessions?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["parameter"], parameter, "{body}");
        assert!(
            error["error"].as_str().unwrap().contains(parameter),
            "{body}"
        );
    }
}
