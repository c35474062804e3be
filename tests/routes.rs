//! Routes with the file inventory (SPEC §7): Route, Service and EndpointSlice objects in the
//! file, entry points from the config. Backends are echo servers on 127.0.0.1, .3, .4, … sharing
//! one port, as endpoints of a Service share the slice's port.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;

const ENTRY_POINTS: &str =
    "entryPoints: [{name: voice, port: 0}, {name: chat, port: 0, protocol: tcp}]\n";

/// Echo servers tagged `tags[i]` on 127.0.0.{1,3,4,…}, all on one port.
fn endpoints(tags: &[u8]) -> Vec<Echo> {
    let first = Echo::spawn("127.0.0.1:0", Some(tags[0]));
    let port = first.addr.port();
    let mut all = vec![first];
    for (i, tag) in tags.iter().enumerate().skip(1) {
        all.push(Echo::spawn(
            &format!("127.0.0.{}:{port}", i + 2),
            Some(*tag),
        ));
    }
    all
}

/// A Service `name` in `games` with port `voice` (5000), and its EndpointSlice listing
/// `ready` and `not_ready` endpoints on `port`.
fn service(name: &str, port: u16, ready: &[&Echo], not_ready: &[&Echo]) -> String {
    let list = |echos: &[&Echo], ready: bool| -> Vec<String> {
        echos
            .iter()
            .map(|e| {
                format!(
                    "{{addresses: [\"{}\"], conditions: {{ready: {ready}}}}}",
                    e.addr.ip()
                )
            })
            .collect()
    };
    let mut eps = list(ready, true);
    eps.extend(list(not_ready, false));
    format!(
        "- {{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: games}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n\
         - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: {name}-1, namespace: games, labels: {{kubernetes.io/service-name: {name}}}}}, \
         ports: [{{name: voice, port: {port}}}], endpoints: [{}]}}\n",
        eps.join(", ")
    )
}

/// A Route in `games` on `entry` with the given rules (YAML flow sequence) and extra spec.
fn route(name: &str, entry: &str, rules: &str, extra: &str) -> String {
    format!(
        "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: {name}, namespace: games}}, \
         spec: {{entryPoint: {entry}, rules: {rules}{extra}}}}}\n"
    )
}

/// This instance's view of route `name` (`GET /routes`).
fn view(p: &Proxy, name: &str) -> serde_json::Value {
    let (code, body) = p.http("GET", "/routes");
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or(serde_json::Value::Null)
}

/// The tag of the endpoint that answers `c`'s datagram through `to`.
fn tag(c: &UdpSocket, to: SocketAddr) -> Option<u8> {
    c.send_to(b"x", to).unwrap();
    datagram_within(c, Duration::from_millis(500)).map(|d| d[0])
}

#[test]
fn weights_split_sessions_and_every_datagram_of_one_stays_on_its_endpoint() {
    let eu = endpoints(b"EF");
    let us = endpoints(b"U");
    let port = eu[0].addr.port();
    let us_port = us[0].addr.port();
    let rules = "[{backends: [{service: eu, port: voice, weight: 3}, {service: us, port: 5000, weight: 1}, {service: off, port: voice, weight: 0}]}]";
    let inventory = format!(
        "{}{}{}{}",
        service("eu", port, &[&eu[0], &eu[1]], &[]),
        service("us", us_port, &[&us[0]], &[]),
        service("off", us_port, &[&us[0]], &[]),
        route("voice", "voice", rules, "")
    );
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &inventory);
    let entry = proxy.entry_addr("voice");
    proxy.eventually("the route is ready", |p| view(p, "voice")["ready"] == true);
    assert_eq!(view(&proxy, "voice")["readyEndpoints"], 4);

    let clients: Vec<UdpSocket> = (0..400).map(|_| client()).collect();
    let mut by_tag: HashMap<u8, usize> = HashMap::new();
    let mut first = Vec::new();
    for c in &clients {
        let t = tag(c, entry).expect("every session gets an endpoint");
        *by_tag.entry(t).or_default() += 1;
        first.push(t);
    }
    let eu_share =
        by_tag.get(&b'E').copied().unwrap_or(0) + by_tag.get(&b'F').copied().unwrap_or(0);
    let us_share = by_tag.get(&b'U').copied().unwrap_or(0);
    assert_eq!(eu_share + us_share, 400);
    assert!(
        (300 - 32..=300 + 32).contains(&eu_share),
        "3:1 within ±8 %: {by_tag:?}"
    );
    assert!(
        by_tag[&b'E'] > 100 && by_tag[&b'F'] > 100,
        "even across eu's endpoints: {by_tag:?}"
    );
    // Every datagram of a session reaches the same endpoint.
    for (c, t) in clients.iter().zip(&first).step_by(10) {
        for _ in 0..5 {
            assert_eq!(tag(c, entry), Some(*t));
        }
    }
    assert_eq!(
        proxy
            .metric(r#"udp_director_route_sessions_total{route="games/voice",service="games/eu"}"#),
        eu_share as f64
    );
    assert_eq!(
        proxy.metric(
            r#"udp_director_route_sessions_total{route="games/voice",service="games/off"}"#
        ),
        0.0,
        "weight 0 gets nothing"
    );
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{kind="route",protocol="udp"}"#),
        400.0
    );
}

#[test]
fn source_rules_no_route_and_a_route_timeout() {
    let (local2, ranged, rest) = (endpoints(b"2"), endpoints(b"R"), endpoints(b"*"));
    let rules = |catch_all: &str| {
        format!(
            "[{{match: {{sourceCidrs: [127.0.0.2/32]}}, backends: [{{service: two, port: voice}}]}}, \
             {{match: {{sourcePorts: [\"31000-31010\"]}}, backends: [{{service: ranged, port: voice}}]}}, \
             {{match: {{sourceCidrs: [\"2001:db8::/32\", {catch_all}]}}, backends: [{{service: rest, port: voice}}]}}]"
        )
    };
    let objects = format!(
        "{}{}{}",
        service("two", local2[0].addr.port(), &[&local2[0]], &[]),
        service("ranged", ranged[0].addr.port(), &[&ranged[0]], &[]),
        service("rest", rest[0].addr.port(), &[&rest[0]], &[]),
    );
    let with = |catch_all: &str| {
        format!(
            "{objects}{}",
            route(
                "voice",
                "voice",
                &rules(catch_all),
                ", sessionTimeoutSeconds: 1"
            )
        )
    };
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &with("127.0.0.0/8"));
    let entry = proxy.entry_addr("voice");
    proxy.eventually("the route is ready", |p| view(p, "voice")["ready"] == true);
    // A rule for 127.0.0.2/32 wins over the catch-all for a client bound to that address.
    assert_eq!(tag(&client_on("127.0.0.2:0"), entry), Some(b'2'));
    assert_eq!(tag(&client(), entry), Some(b'*'));
    // A port in the range takes the second rule.
    let in_range = (31000..=31010)
        .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
        .expect("a free port in 31000-31010");
    in_range.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(tag(&in_range, entry), Some(b'R'));
    // A client no rule takes: dropped and counted as no_route.
    proxy.write_inventory(&with("127.0.0.1/32"));
    let before =
        proxy.metric(r#"udp_director_packets_dropped_total{reason="no_route",source="client"}"#);
    proxy.eventually("a client from 127.0.0.8 has no route", |p| {
        tag(&client_on("127.0.0.8:0"), entry).is_none()
            && p.metric(r#"udp_director_packets_dropped_total{reason="no_route",source="client"}"#)
                > before
    });
    assert_eq!(tag(&client(), entry), Some(b'*'), "127.0.0.1 still has one");
    // The route's 1 s idle timeout ends its sessions.
    proxy.eventually("idle route sessions end after 1 s", |p| {
        p.sessions().is_empty()
    });
}

#[test]
fn a_not_ready_endpoint_rehomes_its_sessions_and_gets_no_new_ones() {
    let eps = endpoints(b"AB");
    let port = eps[0].addr.port();
    let rules = "[{backends: [{service: svc, port: voice}]}]";
    let both = format!(
        "{}{}",
        service("svc", port, &[&eps[0], &eps[1]], &[]),
        route("voice", "voice", rules, "")
    );
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &both);
    let entry = proxy.entry_addr("voice");
    proxy.eventually("ready", |p| view(p, "voice")["readyEndpoints"] == 2);
    let clients: Vec<UdpSocket> = (0..10).map(|_| client()).collect();
    let tags: Vec<u8> = clients.iter().map(|c| tag(c, entry).unwrap()).collect();
    let on_a = tags.iter().filter(|t| **t == b'A').count();
    assert!(on_a > 0 && on_a < 10, "{tags:?}");
    proxy.write_inventory(&format!(
        "{}{}",
        service("svc", port, &[&eps[1]], &[&eps[0]]),
        route("voice", "voice", rules, "")
    ));
    proxy.eventually("A's sessions re-homed", |p| {
        p.metric(r#"udp_director_route_rehomed_total{route="games/voice"}"#) == on_a as f64
    });
    for c in &clients {
        assert_eq!(tag(c, entry), Some(b'B'), "re-homed or staying on B");
    }
    assert_eq!(proxy.sessions().len(), 10, "no session lost");
    for _ in 0..5 {
        assert_eq!(tag(&client(), entry), Some(b'B'), "no new session on A");
    }
    assert_eq!(
        proxy.metric("udp_director_sessions_rehomed_total"),
        on_a as f64
    );
}

#[test]
fn an_invalid_backend_and_one_with_no_ready_endpoint_drop_their_shares() {
    let eps = endpoints(b"V");
    let port = eps[0].addr.port();
    // 1 : 1 : 2 — the valid Service, a missing one, one whose only endpoint is not ready.
    let rules = "[{backends: [{service: ok, port: voice}, {service: gone, port: voice}, \
                 {service: empty, port: voice, weight: 2}]}]";
    let inventory = format!(
        "{}{}{}",
        service("ok", port, &[&eps[0]], &[]),
        service("empty", port, &[], &[&eps[0]]),
        route("voice", "voice", rules, "")
    );
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &inventory);
    let entry = proxy.entry_addr("voice");
    proxy.eventually("the route reports its backends", |p| {
        !view(p, "voice")["message"].is_null()
    });
    let v = view(&proxy, "voice");
    assert_eq!(v["ready"], false);
    assert_eq!(
        v["message"],
        "Service games/gone not found; Service games/empty has no ready endpoint: its share of \
         new clients is dropped",
    );
    let no_route = r#"udp_director_packets_dropped_total{reason="no_route",source="client"}"#;
    let before = proxy.metric(no_route);
    let clients: Vec<UdpSocket> = (0..100).map(|_| client()).collect();
    for c in &clients {
        c.send_to(b"x", entry).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let served = clients
        .iter()
        .filter(|c| datagram_within(c, Duration::from_millis(1)).is_some())
        .count();
    // Each worker rotates through the shares on its own: a quarter each, give or take one.
    assert!(
        (23..=27).contains(&served),
        "a quarter of the clients is served, the rest is not sent elsewhere: {served}"
    );
    proxy.eventually("the rest counted as no_route", |p| {
        p.metric(no_route) - before == (100 - served) as f64
    });
}

#[test]
fn a_route_that_serves_no_client_is_not_ready_and_says_why() {
    let eps = endpoints(b"O");
    let port = eps[0].addr.port();
    let catch_all = "[{backends: [{service: svc, port: voice}]}]";
    let dated = |name: &str, entry: &str, created: &str, rules: &str| {
        route(name, entry, rules, "").replace(
            "namespace: games}",
            &format!("namespace: games, creationTimestamp: \"{created}\"}}"),
        )
    };
    let inventory = format!(
        "{}{}{}{}",
        service("svc", port, &[&eps[0]], &[]),
        dated("old", "voice", "2026-01-01T00:00:00Z", catch_all),
        dated("young", "voice", "2026-01-02T00:00:00Z", catch_all),
        dated(
            "weightless",
            "chat",
            "2026-01-01T00:00:00Z",
            "[{backends: [{service: svc, port: voice, weight: 0}]}]"
        ),
    );
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &inventory);
    proxy.eventually("the routes are reported", |p| {
        view(p, "old")["ready"] == true && !view(p, "young")["message"].is_null()
    });
    let young = view(&proxy, "young");
    assert_eq!(young["ready"], false, "{young}");
    assert_eq!(
        young["message"],
        "it serves no client: rule 1 is shadowed by route games/old's rule 1, which comes first \
         on entry point voice (no match)"
    );
    let weightless = view(&proxy, "weightless");
    assert_eq!(weightless["ready"], false, "{weightless}");
    assert_eq!(
        weightless["message"],
        "every backend weighs 0: it serves no client"
    );
    assert_eq!(tag(&client(), proxy.entry_addr("voice")), Some(b'O'));
    // The older route goes: the younger one serves, and says so.
    proxy.write_inventory(&format!(
        "{}{}",
        service("svc", port, &[&eps[0]], &[]),
        dated("young", "voice", "2026-01-02T00:00:00Z", catch_all),
    ));
    proxy.eventually("the younger route is ready", |p| {
        view(p, "young")["ready"] == true && view(p, "young")["message"].is_null()
    });
}

#[test]
fn cross_namespace_backends_are_refused_and_tcp_entry_points_route_connections() {
    let tcp = TcpEcho::tagged(b't');
    let udp = endpoints(b"U");
    let inventory = format!(
        "{}\
         - {{apiVersion: v1, kind: Service, metadata: {{name: chat, namespace: games}}, spec: {{ports: [{{name: chat, port: 6000}}]}}}}\n\
         - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: chat-1, namespace: games, labels: {{kubernetes.io/service-name: chat}}}}, \
         ports: [{{name: chat, port: {}}}], endpoints: [{{addresses: [127.0.0.1]}}]}}\n\
         - {{apiVersion: v1, kind: Service, metadata: {{name: voice, namespace: elsewhere}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n\
         {}{}",
        service("voice", udp[0].addr.port(), &[&udp[0]], &[]),
        tcp.addr.port(),
        route(
            "chat",
            "chat",
            "[{backends: [{service: chat, port: chat}]}]",
            ""
        ),
        route(
            "away",
            "voice",
            "[{backends: [{service: voice, namespace: elsewhere, port: voice}]}]",
            ""
        ),
    );
    let proxy = Proxy::start(&base_config(ENTRY_POINTS), &inventory);
    proxy.eventually("the chat route is ready", |p| {
        view(p, "chat")["ready"] == true
    });
    let mut c = tcp_client(proxy.entry_addr("chat"));
    c.write_all(b"hi").unwrap();
    assert_eq!(read_exact_within(&mut c, 3), b"thi");
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{kind="route",protocol="tcp"}"#),
        1.0
    );
    let away = view(&proxy, "away");
    assert_eq!(away["ready"], false);
    assert!(
        away["message"]
            .as_str()
            .is_some_and(|m| m.contains("another namespace")),
        "{away}"
    );
    assert_eq!(tag(&client(), proxy.entry_addr("voice")), None, "no_route");
    // A Route naming an entry point this proxy lacks says so.
    proxy.write_inventory(&format!(
        "{inventory}{}",
        route(
            "lost",
            "nope",
            "[{backends: [{service: voice, port: voice}]}]",
            ""
        )
    ));
    proxy.eventually("the unknown entry point is reported", |p| {
        view(p, "lost")["message"]
            .as_str()
            .is_some_and(|m| m.contains("entry point `nope`"))
    });
}

#[test]
fn gateway_api_objects_in_the_file_are_served_too() {
    let eps = endpoints(b"G");
    let port = free_port();
    let inventory = format!(
        "{}\
         - {{apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {{name: ours}}, spec: {{controllerName: udp-director.dev/gateway-controller}}}}\n\
         - {{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: edge, namespace: games}}, \
         spec: {{gatewayClassName: ours, listeners: [{{name: voice, port: {port}, protocol: UDP}}]}}}}\n\
         - {{apiVersion: gateway.networking.k8s.io/v1, kind: UDPRoute, metadata: {{name: voice, namespace: games}}, \
         spec: {{parentRefs: [{{name: edge, sectionName: voice}}], rules: [{{backendRefs: [{{name: voice, port: 5000}}]}}]}}}}\n",
        service("voice", eps[0].addr.port(), &[&eps[0]], &[])
    );
    let proxy = Proxy::start(
        &base_config("gatewayApi: {controllerName: udp-director.dev/gateway-controller}\n"),
        &inventory,
    );
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let c = client();
    proxy.eventually("the Gateway's listener serves the UDPRoute", |_| {
        tag(&c, to) == Some(b'G')
    });
    assert_eq!(
        proxy.metric(
            r#"udp_director_route_sessions_total{route="games/udproute/voice",service="games/voice"}"#
        ),
        1.0
    );
    // The Gateway goes from the file: its listener closes.
    proxy.write_inventory(&service("voice", eps[0].addr.port(), &[&eps[0]], &[]));
    proxy.eventually("the listener is closed", |_| udp_sockets_on_port(port) == 0);
}

#[test]
fn a_gateway_listener_that_does_not_read_is_refused_alone() {
    let eps = endpoints(b"LM");
    let port = free_port();
    // The Gateway with `listeners`, its UDPRoute, and the route's Service with `ready`.
    let gateway = |listeners: &str, ready: &[&Echo]| {
        format!(
            "{}\
             - {{apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {{name: ours}}, spec: {{controllerName: udp-director.dev/gateway-controller}}}}\n\
             - {{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: edge, namespace: games}}, \
             spec: {{gatewayClassName: ours, listeners: [{listeners}]}}}}\n\
             - {{apiVersion: gateway.networking.k8s.io/v1, kind: UDPRoute, metadata: {{name: voice, namespace: games}}, \
             spec: {{parentRefs: [{{name: edge, sectionName: voice}}], rules: [{{backendRefs: [{{name: voice, port: 5000}}]}}]}}}}\n",
            service("voice", eps[0].addr.port(), ready, &[])
        )
    };
    let listeners = |big: u32| {
        format!(
            "{{name: big, port: {big}, protocol: UDP}}, {{name: voice, port: {port}, protocol: UDP}}"
        )
    };
    let proxy = Proxy::start(
        &base_config("gatewayApi: {controllerName: udp-director.dev/gateway-controller}\n"),
        &gateway(&listeners(70000), &[&eps[0]]),
    );
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let c = client();
    proxy.eventually("the valid listener serves", |_| tag(&c, to) == Some(b'L'));
    // Passes of the reconciler that leave the listener's problem as it is: the route's Service
    // gains a ready endpoint and loses it again, each pass seen on the route's gauge.
    let ready = r#"udp_director_route_ready_endpoints{route="games/udproute/voice"}"#;
    let passes = |big: u32| {
        for n in [2, 1, 2, 1] {
            proxy.write_inventory(&gateway(&listeners(big), &[&eps[0], &eps[1]][..n]));
            proxy.eventually("a pass of the reconciler", |p| p.metric(ready) == n as f64);
        }
    };
    passes(70000);
    let said =
        "Gateway games/edge listener big: not served: port: 70000 is not a port (1 to 65535)";
    assert_eq!(proxy.log().matches(said).count(), 1, "{}", proxy.log());
    // Its text changes: logged again, once; the valid listener is not disturbed.
    proxy.write_inventory(&gateway(&listeners(0), &[&eps[0]]));
    let changed = "Gateway games/edge listener big: not served: port: 0 is not a port (1 to 65535)";
    proxy.eventually("the changed problem is logged", |p| {
        p.log().contains(changed)
    });
    passes(0);
    assert_eq!(proxy.log().matches(changed).count(), 1, "{}", proxy.log());
    assert_eq!(proxy.log().matches(said).count(), 1);
    assert_eq!(tag(&c, to), Some(b'L'), "the same session serves on");
}
