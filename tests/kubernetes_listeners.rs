//! Forwarders (SPEC §6) and routes (SPEC §7) against the real kube-apiserver: proxies running as
//! the service account with only the generated RBAC, two instances at once (distinct node
//! names, on 127.0.0.1 and 127.0.0.2), each writing its own status entries, the Service ports
//! they share, and route tables following Routes, Services and EndpointSlices live.
//! Skipped, loudly, when no API server is configured; a failure under `CI=true`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::cluster::{Cluster, cluster};
use common::*;

fn forwarder(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: udp-director.dev/v1alpha1\nkind: Forwarder\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn to(listen: u16, target: SocketAddr) -> String {
    format!(
        "{{listenPort: {listen}, targetHost: \"{}\", targetPort: {}}}",
        target.ip(),
        target.port()
    )
}

/// `status.instances` of a forwarder, by node.
fn instances(c: &Cluster, ns: &str, name: &str) -> Vec<serde_json::Value> {
    let Ok(got) = c.kubectl(&["get", "forwarder", name, "-n", ns, "-o", "json"], None) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    v["status"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn instance(c: &Cluster, ns: &str, name: &str, node: &str) -> serde_json::Value {
    instances(c, ns, name)
        .into_iter()
        .find(|i| i["node"] == node)
        .unwrap_or(serde_json::Value::Null)
}

/// The operator's own UDP port on `lb-udp` (a port no test listens on otherwise).
const KEEP: u16 = 19999;

/// The operator's Services `lb-udp` and `lb-tcp`, each with a port of its own that the proxy
/// must leave alone.
fn create_services(c: &Cluster, ns: &str) {
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb-udp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: keep, port: {KEEP}, protocol: UDP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-tcp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: admin, port: 8080, protocol: TCP}}]}}\n"
    ));
}

/// The ports of Services `lb-udp` and `lb-tcp`, as `name=port/PROTOCOL`, sorted.
fn service_ports(c: &Cluster, ns: &str) -> Vec<String> {
    let mut ports = Vec::new();
    for service in ["lb-udp", "lb-tcp"] {
        let got = c.must(&["get", "service", service, "-n", ns, "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        ports.extend(v["spec"]["ports"].as_array().unwrap().iter().map(|p| {
            format!(
                "{}={}/{}",
                p["name"].as_str().unwrap_or(""),
                p["port"],
                p["protocol"].as_str().unwrap()
            )
        }));
    }
    ports.sort();
    ports
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn round_trip(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    c.send_to(payload, to).unwrap();
    datagram_within(c, Duration::from_millis(500))
}

fn at(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Polls `f` (kubectl calls) for up to 30 s; on a timeout the proxies' logs are shown.
fn eventually_logged(proxies: &[&Proxy], what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        if std::time::Instant::now() >= deadline {
            for p in proxies {
                eprintln!("--- proxy log ---\n{}", p.log());
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_logged(&[], what, f);
}

#[test]
fn two_instances_serve_forwarders_and_share_one_service_port_set() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("fwd");
    c.grant_forwarder_rbac(&ns);
    create_services(c, &ns);
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    let (ta, tb) = (TcpEcho::tagged(b'a'), TcpEcho::tagged(b'b'));
    let (p1, p2) = (free_port(), free_port());
    c.apply(&forwarder(
        &ns,
        "game-1",
        &format!("{{udp: {}, tcp: {}}}", to(p1, a.addr), to(p1, ta.addr)),
    ));
    let node_a = c.start_forwarder_proxy(&ns, "node-a", "127.0.0.1");
    let node_b = c.start_forwarder_proxy(&ns, "node-b", "127.0.0.2");

    eventually("both instances report ready", || {
        ["node-a", "node-b"].iter().all(|n| {
            let i = instance(c, &ns, "game-1", n);
            i["ready"] == true
                && i["listening"] == serde_json::json!([format!("udp/{p1}"), format!("tcp/{p1}")])
                && i["observedGeneration"] == 1
        })
    });
    assert!(instance(c, &ns, "game-1", "node-a")["lastUpdateTime"].is_string());
    let cl = client();
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], p1), b"1").unwrap(),
        b"A1"
    );
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 2], p1), b"2").unwrap(),
        b"A2"
    );
    let mut tcp = tcp_client(at([127, 0, 0, 1], p1));
    tcp.write_all(b"x").unwrap();
    assert_eq!(read_exact_within(&mut tcp, 2), b"ax");
    eventually_logged(
        &[&node_a, &node_b],
        "the Service carries both listeners",
        || {
            service_ports(c, &ns)
                == sorted(vec![
                    "admin=8080/TCP".to_string(),
                    format!("game-1={p1}/TCP"),
                    format!("game-1={p1}/UDP"),
                    format!("keep={KEEP}/UDP"),
                ])
        },
    );

    // Update: a new UDP target (the live session moves) and a new TCP port.
    c.apply(&forwarder(
        &ns,
        "game-1",
        &format!("{{udp: {}, tcp: {}}}", to(p1, b.addr), to(p2, tb.addr)),
    ));
    eventually("both instances observed generation 2", || {
        ["node-a", "node-b"].iter().all(|n| {
            let i = instance(c, &ns, "game-1", n);
            i["observedGeneration"] == 2
                && i["listening"] == serde_json::json!([format!("udp/{p1}"), format!("tcp/{p2}")])
        })
    });
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], p1), b"3").unwrap(),
        b"B3"
    );
    expect_closed(&mut tcp);
    let mut tcp = tcp_client(at([127, 0, 0, 2], p2));
    tcp.write_all(b"y").unwrap();
    assert_eq!(read_exact_within(&mut tcp, 2), b"by");
    eventually("the Service port followed", || {
        service_ports(c, &ns)
            == sorted(vec![
                "admin=8080/TCP".to_string(),
                format!("game-1={p1}/UDP"),
                format!("game-1={p2}/TCP"),
                format!("keep={KEEP}/UDP"),
            ])
    });

    // Conflicts: a younger forwarder on a taken port, one on node-a's query port.
    c.apply(&forwarder(
        &ns,
        "game-2",
        &format!("{{udp: {}}}", to(p1, a.addr)),
    ));
    let query = node_a.query.port();
    c.apply(&forwarder(
        &ns,
        "on-query",
        &format!("{{tcp: {}}}", to(query, ta.addr)),
    ));
    eventually("the conflicts are in status", || {
        instance(c, &ns, "game-2", "node-b")["message"]
            == format!("udp/{p1} is held by forwarder game-1 (older)")
            && instance(c, &ns, "on-query", "node-a")["message"]
                == format!("tcp/{query} is held by the query port")
    });
    assert_eq!(instance(c, &ns, "game-2", "node-a")["ready"], false);
    assert_eq!(instance(c, &ns, "on-query", "node-a")["ready"], false);
    assert_eq!(
        instance(c, &ns, "on-query", "node-b")["ready"],
        true,
        "node-b's query port is another one"
    );
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], p1), b"4").unwrap(),
        b"B4",
        "undisturbed"
    );

    // A forwarder on a port the operator's Service already has: it is served, the Service
    // keeps the operator's port, and status says why there is no Service port for it.
    c.apply(&forwarder(
        &ns,
        "clash",
        &format!("{{udp: {}}}", to(KEEP, a.addr)),
    ));
    eventually("the clash is in status", || {
        let i = instance(c, &ns, "clash", "node-b");
        i["ready"] == true && i["message"].as_str().is_some_and(|m| {
            m == format!(
                "udp/{KEEP} has no port on Service lb-udp: the port {KEEP}/UDP named `keep` there"
            )
        })
    });

    // Delete: the listeners close on both instances, the younger forwarder takes the port,
    // and the Service ports follow; the operator's port stays.
    c.must(&["delete", "forwarder", "game-1", "-n", &ns], None);
    eventually("game-2 has the port on both instances", || {
        ["node-a", "node-b"]
            .iter()
            .all(|n| instance(c, &ns, "game-2", n)["ready"] == true)
    });
    expect_closed(&mut tcp);
    let cl = client();
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 2], p1), b"5").unwrap(),
        b"A5"
    );
    eventually_logged(
        &[&node_a, &node_b],
        "the Service lost game-1's ports",
        || {
            let ports = service_ports(c, &ns);
            ports
                == sorted(vec![
                    "admin=8080/TCP".to_string(),
                    format!("game-2={p1}/UDP"),
                    format!("on-query={query}/TCP"),
                    format!("keep={KEEP}/UDP"),
                ])
        },
    );
    assert!(
        node_a.metric(
            r#"udp_director_forwarder_bytes_total{forwarder="game-2",direction="upstream"}"#
        ) + node_b.metric(
            r#"udp_director_forwarder_bytes_total{forwarder="game-2",direction="upstream"}"#
        ) >= 1.0
    );

    // A burst: both instances apply after every change they see, in whatever order; the
    // Service ends with exactly the surviving set.
    let burst: Vec<(String, u16)> = (0..6)
        .map(|i| (format!("burst-{i}"), free_port()))
        .collect();
    for (name, port) in &burst {
        c.apply(&forwarder(
            &ns,
            name,
            &format!("{{udp: {}}}", to(*port, a.addr)),
        ));
    }
    for (name, _) in burst.iter().step_by(2) {
        c.must(&["delete", "forwarder", name, "-n", &ns], None);
    }
    let mut expected = vec![
        "admin=8080/TCP".to_string(),
        format!("game-2={p1}/UDP"),
        format!("on-query={query}/TCP"),
        format!("keep={KEEP}/UDP"),
    ];
    expected.extend(
        burst
            .iter()
            .skip(1)
            .step_by(2)
            .map(|(name, port)| format!("{name}={port}/UDP")),
    );
    let expected = sorted(expected);
    eventually_logged(&[&node_a, &node_b], "the burst converged", || {
        service_ports(c, &ns) == expected
    });

    // The operator re-creates the Service: the instances put their ports back.
    c.must(&["delete", "service", "lb-udp", "-n", &ns], None);
    create_services(c, &ns);
    eventually_logged(
        &[&node_a, &node_b],
        "the re-created Service is refilled",
        || service_ports(c, &ns) == expected,
    );
}

#[test]
fn a_forwarder_deleted_while_the_proxy_was_down_is_never_opened() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("fwd-down");
    c.grant_forwarder_rbac(&ns);
    create_services(c, &ns);
    let echo = Echo::tagged(b'E');
    let (kept, gone, survivor) = (free_port(), free_port(), free_port());
    c.apply(&forwarder(
        &ns,
        "kept",
        &format!("{{udp: {}}}", to(kept, echo.addr)),
    ));
    let first = c.start_forwarder_proxy(&ns, "node-a", "127.0.0.1");
    eventually("kept is ready", || {
        instance(c, &ns, "kept", "node-a")["ready"] == true
    });
    first.terminate();
    drop(first);
    // While no proxy runs: one forwarder comes and goes, another is deleted.
    c.apply(&forwarder(
        &ns,
        "gone",
        &format!("{{udp: {}}}", to(gone, echo.addr)),
    ));
    c.must(&["delete", "forwarder", "gone", "-n", &ns], None);
    c.must(&["delete", "forwarder", "kept", "-n", &ns], None);
    c.apply(&forwarder(
        &ns,
        "survivor",
        &format!("{{udp: {}}}", to(survivor, echo.addr)),
    ));
    let p = c.start_forwarder_proxy(&ns, "node-a", "127.0.0.1");
    // The reconciler has run once the survivor is served; the others were never opened.
    let cl = client();
    p.eventually("the survivor is served", |_| {
        round_trip(&cl, at([127, 0, 0, 1], survivor), b"s").as_deref() == Some(b"Es".as_slice())
    });
    let names: Vec<serde_json::Value> =
        serde_json::from_str(&p.http("GET", "/forwarders").1).unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(names[0]["name"], "survivor");
    assert_eq!(round_trip(&cl, at([127, 0, 0, 1], kept), b"1"), None);
    assert_eq!(round_trip(&cl, at([127, 0, 0, 1], gone), b"2"), None);
    assert_eq!(udp_sockets_on_port(kept) + udp_sockets_on_port(gone), 0);
    eventually("the Service has the survivor's port only", || {
        service_ports(c, &ns)
            == sorted(vec![
                "admin=8080/TCP".to_string(),
                format!("keep={KEEP}/UDP"),
                format!("survivor={survivor}/UDP"),
            ])
    });
}

#[test]
fn a_cluster_service_target_follows_the_service() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("fwd-svc");
    c.grant_forwarder_rbac(&ns);
    create_services(c, &ns);
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: gs, namespace: {ns}}}\n\
         spec: {{clusterIP: None, ports: [{{name: game, port: 7777, protocol: UDP}}]}}\n"
    ));
    // Two game servers on one port, at two addresses: the headless Service's endpoints.
    let first = Echo::spawn("127.0.0.1:0", Some(b'1'));
    let port = first.addr.port();
    let second = Echo::spawn(&format!("127.0.0.3:{port}"), Some(b'2'));
    let slice = |ready_first: bool| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: gs-x, namespace: {ns}, labels: {{kubernetes.io/service-name: gs}}}}\n\
             addressType: IPv4\nports: [{{name: game, port: 7777, protocol: UDP}}]\n\
             endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: {ready_first}}}}}, {{addresses: [127.0.0.3]}}]\n"
        )
    };
    c.apply(&slice(true));
    let listen = free_port();
    c.apply(&forwarder(
        &ns,
        "by-service",
        &format!(
            "{{udp: {{listenPort: {listen}, targetHost: gs.{ns}.svc.cluster.local, targetPort: {port}}}}}"
        ),
    ));
    let p = c.start_forwarder_proxy(&ns, "node-a", "127.0.0.1");
    eventually("ready", || {
        instance(c, &ns, "by-service", "node-a")["ready"] == true
    });
    let cl = client();
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], listen), b"a").unwrap(),
        b"1a"
    );
    // The first endpoint turns not ready: the watch moves the forwarder, and its session.
    c.apply(&slice(false));
    p.eventually("the target follows the EndpointSlice", |p| {
        p.sessions()
            .iter()
            .any(|s| s["target"] == format!("127.0.0.3:{port}"))
    });
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], listen), b"b").unwrap(),
        b"2b"
    );
    // No endpoint ready at all: the last good address is kept, and status says so.
    c.apply(&slice(false).replace(
        "{addresses: [127.0.0.3]}",
        "{addresses: [127.0.0.3], conditions: {ready: false}}",
    ));
    eventually("status says the target is kept", || {
        instance(c, &ns, "by-service", "node-a")["message"]
            .as_str()
            .is_some_and(|m| m.contains("no ready endpoint") && m.contains("still forwarding"))
    });
    assert_eq!(instance(c, &ns, "by-service", "node-a")["ready"], true);
    assert_eq!(
        round_trip(&cl, at([127, 0, 0, 1], listen), b"c").unwrap(),
        b"2c"
    );
    drop(second);
    // A ClusterIP Service: its virtual IP.
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: vip, namespace: {ns}}}\n\
         spec: {{ports: [{{name: game, port: 7777, protocol: UDP}}]}}\n"
    ));
    let cluster_ip = c.must(
        &[
            "get",
            "service",
            "vip",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    let vip_port = free_port();
    c.apply(&forwarder(
        &ns,
        "by-vip",
        &format!("{{udp: {{listenPort: {vip_port}, targetHost: vip.{ns}.svc, targetPort: 7777}}}}"),
    ));
    p.eventually("the ClusterIP is the target", |p| {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&p.http("GET", "/forwarders").1).unwrap();
        list.iter().any(|f| {
            f["name"] == "by-vip"
                && f["targets"]
                    == serde_json::json!([format!("udp/{vip_port} -> {cluster_ip}:7777")])
        })
    });
    // A missing Service: not ready, saying which.
    c.apply(&forwarder(
        &ns,
        "by-missing",
        &format!(
            "{{udp: {{listenPort: {}, targetHost: nope.{ns}.svc, targetPort: 1}}}}",
            free_port()
        ),
    ));
    eventually("the missing Service is reported", || {
        instance(c, &ns, "by-missing", "node-a")["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("Service {ns}/nope not found")))
    });
}

#[test]
fn the_forwarder_rbac_grants_exactly_what_forwarders_need() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("fwd-rbac");
    let other = c.namespace("fwd-rbac-other");
    c.grant_forwarder_rbac(&ns);
    let can = |verb: &str, resource: &str, namespace: &str| c.proxy_can(verb, resource, namespace);
    assert!(can("list", "forwarders.udp-director.dev", &ns));
    assert!(can("watch", "forwarders.udp-director.dev", &ns));
    assert!(can("patch", "forwarders.udp-director.dev/status", &ns));
    for service in ["services/lb-udp", "services/lb-tcp"] {
        assert!(can("get", service, &ns));
        assert!(can("patch", service, &ns));
    }
    for (verb, resource) in [
        ("get", "forwarders.udp-director.dev"),
        ("patch", "forwarders.udp-director.dev"),
        ("create", "forwarders.udp-director.dev"),
        ("delete", "forwarders.udp-director.dev"),
        ("update", "forwarders.udp-director.dev/status"),
        ("patch", "services/other"),
        ("create", "services"),
        ("delete", "services/lb-udp"),
        ("update", "services/lb-tcp"),
        ("patch", "services"),
    ] {
        assert!(!can(verb, resource, &ns), "may {verb} {resource}");
    }
    assert!(
        !can("list", "forwarders.udp-director.dev", &other),
        "another namespace"
    );
    assert!(
        !can("patch", "services/lb-udp", &other),
        "another namespace"
    );
}

// ---- routes --------------------------------------------------------------------------------

fn endpoint_slice(ns: &str, service: &str, port: u16, endpoints: &[(&str, bool)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, ready)| format!("{{addresses: [{ip}], conditions: {{ready: {ready}}}}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: voice, port: {port}, protocol: UDP}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

#[test]
fn routes_follow_route_service_and_endpoint_slice_changes_live() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("routes");
    let a = Echo::spawn("127.0.0.1:0", Some(b'A'));
    let port = a.addr.port();
    let b = Echo::spawn(&format!("127.0.0.3:{port}"), Some(b'B'));
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: voice, namespace: {ns}}}\n\
         spec: {{clusterIP: None, ports: [{{name: voice, port: 5000, protocol: UDP}}]}}\n"
    ));
    c.apply(&endpoint_slice(&ns, "voice", port, &[("127.0.0.1", true)]));
    let route = |backends: &str| {
        format!(
            "apiVersion: udp-director.dev/v1alpha1\nkind: Route\nmetadata: {{name: voice, namespace: {ns}}}\n\
             spec: {{entryPoint: lobby, rules: [{{backends: [{backends}]}}]}}\n"
        )
    };
    c.apply(&route("{service: voice, port: voice}"));
    let p = c.start_proxy_as(&ns, "node-r");
    let entry = p.entry_addr("lobby");
    let route_instance = || instance_of(c, "routes.udp-director.dev", &ns, "voice", "node-r");
    eventually_logged(&[&p], "the route reports ready", || {
        let i = route_instance();
        i["ready"] == true && i["readyEndpoints"] == 1 && i["observedGeneration"] == 1
    });
    let cl = client();
    assert_eq!(round_trip(&cl, entry, b"1").unwrap(), b"A1");
    // A second node writes its own entry beside the first (server-side apply merges the list
    // by node; each node's field manager owns its entry).
    let q = c.start_proxy_as(&ns, "node-s");
    eventually_logged(&[&p, &q], "both nodes' entries, side by side", || {
        instance_of(c, "routes.udp-director.dev", &ns, "voice", "node-s")["ready"] == true
            && route_instance()["ready"] == true
    });

    // The EndpointSlice changes: A not ready, B ready. The session re-homes to B.
    c.apply(&endpoint_slice(
        &ns,
        "voice",
        port,
        &[("127.0.0.1", false), ("127.0.0.3", true)],
    ));
    p.eventually("the session re-homed", |p| {
        p.metric(&format!(
            r#"udp_director_route_rehomed_total{{route="{ns}/voice"}}"#
        )) == 1.0
    });
    assert_eq!(round_trip(&cl, entry, b"2").unwrap(), b"B2");

    // The Route changes: a missing Service is reported, and its share dropped.
    c.apply(&route(
        "{service: voice, port: voice}, {service: gone, port: voice}",
    ));
    eventually_logged(&[&p], "the missing Service is in status", || {
        let i = route_instance();
        i["ready"] == false
            && i["observedGeneration"] == 2
            && i["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("Service {ns}/gone not found")))
    });
    assert_eq!(round_trip(&client(), entry, b"3").unwrap(), b"B3");
    eventually_logged(&[&p, &q], "the other node's entry says so too", || {
        let i = instance_of(c, "routes.udp-director.dev", &ns, "voice", "node-s");
        i["ready"] == false && i["observedGeneration"] == 2 && route_instance()["ready"] == false
    });
    drop(q);

    // The Service goes: nothing to route to.
    c.must(&["delete", "service", "voice", "-n", &ns], None);
    p.eventually("no route without the Service", |_| {
        round_trip(&client(), entry, b"4").is_none()
    });
    drop(b);
}

/// `status.instances` entry of `node` in a `resource` object.
fn instance_of(c: &Cluster, resource: &str, ns: &str, name: &str, node: &str) -> serde_json::Value {
    let Ok(got) = c.kubectl(&["get", resource, name, "-n", ns, "-o", "json"], None) else {
        return serde_json::Value::Null;
    };
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    v["status"]["instances"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i["node"] == node).cloned())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn the_route_rbac_lists_routes_and_patches_their_status_only() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("routes-rbac");
    let can = |verb: &str, resource: &str| c.proxy_can(verb, resource, &ns);
    assert!(can("list", "routes.udp-director.dev"));
    assert!(can("watch", "routes.udp-director.dev"));
    assert!(can("patch", "routes.udp-director.dev/status"));
    for verb in ["get", "create", "update", "patch", "delete"] {
        assert!(!can(verb, "routes.udp-director.dev"), "may {verb} routes");
    }
    assert!(!can("update", "routes.udp-director.dev/status"));
    assert!(can("list", "endpointslices.discovery.k8s.io"));
    assert!(
        !can("patch", "services"),
        "no Service writes outside the forwarders' Role"
    );
}
