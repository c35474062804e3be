//! One truthful status across replicas (SPEC §7), against the real kube-apiserver: two proxy
//! instances as two nodes of one fleet elect one writer through the status Lease; the Gateway's
//! status is aggregated from both (a listener whose port another process holds on one node
//! names that node), does not change while nothing changes, keeps another controller's route
//! `parents` entry, moves a `lastTransitionTime` only with its condition's status, and stays
//! true when the holder dies and the other takes over. The holder removes a departed node's
//! `status.instances` entry. A Forwarder and a Gateway listener on one port go to the older on
//! both instances, before and after a restart, and both statuses say so. Skipped, loudly,
//! without an API server; a failure under `CI=true`.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, PROXY_CONFIG, cluster, cond};
use common::*;

const CONTROLLER: &str = "udp-director.dev/gateway-controller";
const LEASE: &str = "udp-director-gateway";

fn get(c: &Cluster, resource: &str, ns: &str, name: &str) -> serde_json::Value {
    c.get_json(resource, ns, name)
}

/// Waits up to `limit` for `f`, showing both proxies' logs when it never holds.
fn wait_for(proxies: &[&Proxy], limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() >= deadline {
            let logs: Vec<String> = proxies.iter().map(|p| p.log()).collect();
            panic!(
                "timed out: {what}\n--- proxy logs ---\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The node holding the status Lease of `ns`, if any (the identity is `NODE_TOKEN`: a
/// token per process, so two processes on one node are two candidates).
fn holder(c: &Cluster, ns: &str) -> Option<String> {
    get(c, "lease", ns, LEASE)["spec"]["holderIdentity"]
        .as_str()
        .and_then(|identity| identity.split('_').next())
        .filter(|node| !node.is_empty())
        .map(str::to_string)
}

/// The proxy config of the test's fleet, bound to `bind`.
fn config(ns: &str, bind: &str) -> String {
    PROXY_CONFIG
        .replace("NAMESPACE", ns)
        .replace("bindAddress: 127.0.0.1", &format!("bindAddress: {bind}"))
}

/// The Events about Gateway `edge` of `ns` that `node` recorded.
fn gateway_events(c: &Cluster, ns: &str, node: &str) -> Vec<serde_json::Value> {
    c.events_about(ns, "Gateway", "edge")
        .into_iter()
        .filter(|e| e["reportingInstance"] == node)
        .collect()
}

fn gateway_objects(ns: &str, class: &str, port: u16, echo: SocketAddr) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {class}}}\n\
         spec: {{controllerName: {CONTROLLER}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: {ns}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{{name: voice, port: {port}, protocol: UDP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: voice, namespace: {ns}}}\n\
         spec: {{clusterIP: None, ports: [{{name: p, port: 5000, protocol: UDP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: voice-x, namespace: {ns}, labels: {{kubernetes.io/service-name: voice}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: {}, protocol: UDP}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
         {}",
        echo.port(),
        udp_route(ns, "voice", "{name: voice, port: 5000}")
    )
}

fn udp_route(ns: &str, name: &str, backends: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: UDPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: voice}}], rules: [{{backendRefs: [{backends}]}}]}}\n"
    )
}

fn resource_version(c: &Cluster, resource: &str, ns: &str, name: &str) -> String {
    get(c, resource, ns, name)["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn two_instances_elect_one_writer_of_a_status_that_tells_the_truth() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("fleet");
    let class = format!("udp-director-{ns}");
    let port = free_port();
    // On node-b (127.0.0.2) another process holds the listener's port.
    let squatter = UdpSocket::bind(("127.0.0.2", port)).expect("127.0.0.2 is a loopback address");
    let echo = Echo::tagged(b'V');
    c.apply(&gateway_objects(&ns, &class, port, echo.addr));
    let a = c.start_node(&config(&ns, "127.0.0.1"), &ns, "node-a");
    let b = c.start_node(&config(&ns, "127.0.0.2"), &ns, "node-b");
    let both = [&a, &b];

    // One holder; the listener's status is the fleet's: open on node-a, not on node-b.
    let listener = |c: &Cluster| get(c, "gateway", &ns, "edge")["status"]["listeners"][0].clone();
    wait_for(
        &both,
        Duration::from_secs(60),
        "aggregated listener status",
        || {
            let l = listener(c);
            let accepted = cond(&l["conditions"], "Accepted");
            let message = accepted["message"].as_str().unwrap_or_default();
            accepted["status"] == "False"
                && accepted["reason"] == "PortUnavailable"
                && message.contains("not open on node node-b")
                && message.contains("(node-a)")
        },
    );
    let first = holder(c, &ns).expect("a holder");
    assert!(["node-a", "node-b"].contains(&first.as_str()), "{first}");
    // The node that cannot open the port records it on the Gateway, once; the other does not.
    wait_for(
        &both,
        Duration::from_secs(30),
        "node-b's PortUnavailable Event",
        || !gateway_events(c, &ns, "node-b").is_empty(),
    );
    let events = gateway_events(c, &ns, "node-b");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["reason"], "PortUnavailable");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .starts_with("listener voice: "),
        "{:#}",
        events[0]
    );
    assert!(gateway_events(c, &ns, "node-a").is_empty());
    // node-b's problems gauge says the listener is not open there (an alert waits on it);
    // node-a's says nothing of it.
    let unavailable = format!(
        r#"udp_director_object_problems{{kind="Gateway",namespace="{ns}",name="edge",reason="PortUnavailable"}}"#
    );
    assert_eq!(b.metric(&unavailable), 1.0);
    assert!(!a.http("GET", "/metrics").1.contains(&unavailable));
    let cl = client();
    wait_for(
        &both,
        Duration::from_secs(10),
        "traffic through node-a",
        || {
            cl.send_to(b"1", ("127.0.0.1", port)).unwrap();
            datagram_within(&cl, Duration::from_millis(300)).as_deref() == Some(b"V1".as_slice())
        },
    );

    // Nothing changes, nothing is written: neither instance rewrites the other's view.
    let gateway_rv = resource_version(c, "gateway", &ns, "edge");
    let route_rv = resource_version(c, "udproute", &ns, "voice");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            resource_version(c, "gateway", &ns, "edge"),
            gateway_rv,
            "the Gateway's status was rewritten while nothing changed"
        );
        assert_eq!(resource_version(c, "udproute", &ns, "voice"), route_rv);
    }
    assert_eq!(
        holder(c, &ns).as_deref(),
        Some(first.as_str()),
        "the Lease stays put"
    );

    // Another controller's parents entry, written under its own field manager, survives our
    // writes (a route change makes us write).
    let mut parents = get(c, "udproute", &ns, "voice")["status"]["parents"].clone();
    parents.as_array_mut().unwrap().push(serde_json::json!({
        "parentRef": {"name": "other-gateway"},
        "controllerName": "example.com/other-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "theirs", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }));
    c.must(
        &[
            "patch",
            "udproute",
            "voice",
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "--field-manager=other-controller",
            "-p",
            &serde_json::json!({"status": {"parents": parents}}).to_string(),
        ],
        None,
    );
    c.apply(&udp_route(
        &ns,
        "voice",
        "{name: voice, port: 5000}, {name: missing, port: 5000}",
    ));
    wait_for(
        &both,
        Duration::from_secs(30),
        "our entry says BackendNotFound",
        || {
            let parents = get(c, "udproute", &ns, "voice")["status"]["parents"].clone();
            let ours = parents
                .as_array()
                .and_then(|l| l.iter().find(|p| p["controllerName"] == CONTROLLER))
                .cloned()
                .unwrap_or_default();
            cond(&ours["conditions"], "ResolvedRefs")["reason"] == "BackendNotFound"
        },
    );
    let parents = get(c, "udproute", &ns, "voice")["status"]["parents"].clone();
    let theirs: Vec<&serde_json::Value> = parents
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["controllerName"] == "example.com/other-controller")
        .collect();
    assert_eq!(theirs.len(), 1, "{parents}");
    assert_eq!(theirs[0]["conditions"][0]["message"], "theirs");

    // attachedRoutes changes; no condition's status does, so no lastTransitionTime moves.
    let before = listener(c);
    c.apply(&udp_route(&ns, "voice2", "{name: voice, port: 5000}"));
    wait_for(&both, Duration::from_secs(30), "attachedRoutes 2", || {
        listener(c)["attachedRoutes"] == 2
    });
    let after = listener(c);
    for type_ in ["Accepted", "Programmed", "ResolvedRefs"] {
        assert_eq!(
            cond(&after["conditions"], type_)["lastTransitionTime"],
            cond(&before["conditions"], type_)["lastTransitionTime"],
            "{type_} moved with attachedRoutes"
        );
    }

    // The holder dies: the other takes the Lease over and writes what is true without it.
    let (survivor_name, survivor, dead) = if first == "node-a" {
        ("node-b", b, a)
    } else {
        ("node-a", a, b)
    };
    drop(dead);
    wait_for(
        &[&survivor],
        Duration::from_secs(45),
        "the Lease taken over",
        || holder(c, &ns).as_deref() == Some(survivor_name),
    );
    c.must(&["delete", "udproute", "voice2", "-n", &ns], None);
    wait_for(
        &[&survivor],
        Duration::from_secs(60),
        "the survivor's truth",
        || {
            let l = listener(c);
            let message = cond(&l["conditions"], "Accepted")["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let truthful = if survivor_name == "node-a" {
                // node-b is gone: open on every node that serves it.
                cond(&l["conditions"], "Programmed")["status"] == "True"
            } else {
                // node-a is gone: not open anywhere that serves it, and it says where.
                cond(&l["conditions"], "Accepted")["reason"] == "PortUnavailable"
                    && message.contains("node-b")
                    && !message.contains("node-a")
            };
            l["attachedRoutes"] == 1 && truthful
        },
    );
    drop(squatter);
}

#[test]
fn the_holder_removes_the_status_entry_of_a_departed_node() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("departed");
    c.grant_forwarder_rbac(&ns);
    let echo = Echo::tagged(b'F');
    let port = free_port();
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb-udp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: keep, port: 1, protocol: UDP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-tcp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: keep, port: 1, protocol: TCP}}]}}\n---\n\
         apiVersion: udp-director.dev/v1alpha1\nkind: Forwarder\nmetadata: {{name: game, namespace: {ns}}}\n\
         spec: {{udp: {{listenPort: {port}, targetHost: \"127.0.0.1\", targetPort: {}}}}}\n",
        echo.addr.port()
    ));
    let a = c.start_forwarder_proxy(&ns, "node-a", "127.0.0.1");
    let b = c.start_forwarder_proxy(&ns, "node-b", "127.0.0.2");
    let nodes = |c: &Cluster| -> Vec<String> {
        let mut nodes: Vec<String> = get(c, "forwarder", &ns, "game")["status"]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["node"].as_str().map(str::to_string))
            .collect();
        nodes.sort();
        nodes
    };
    wait_for(&[&a, &b], Duration::from_secs(30), "both entries", || {
        nodes(c) == ["node-a", "node-b"]
    });
    wait_for(&[&a, &b], Duration::from_secs(30), "a holder", || {
        holder(c, &ns).is_some()
    });
    // An entry of a node with no Lease in this fleet (another fleet's, an older release's),
    // written long ago, is not this fleet's to remove.
    c.must(
        &[
            "apply", "--server-side", "--subresource=status", "--validate=false",
            "--field-manager=udp-director/node-other", "-f", "-",
        ],
        Some(&format!(
            r#"{{"apiVersion":"udp-director.dev/v1alpha1","kind":"Forwarder","metadata":{{"name":"game","namespace":"{ns}"}},"status":{{"instances":[{{"node":"node-other","ready":true,"listening":[],"message":"elsewhere","lastUpdateTime":"2020-01-01T00:00:00Z"}}]}}}}"#
        )),
    );
    // Entries of live nodes stay, however long they have been there.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(nodes(c), ["node-a", "node-b", "node-other"]);
    // node-b stops, and its per-node Lease says it has not renewed for years: it has left.
    drop(b);
    c.must(
        &[
            "patch",
            "lease",
            &format!("{LEASE}-node-b"),
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"renewTime":"2020-01-01T00:00:00.000000Z"}}"#,
        ],
        None,
    );
    // node-a (the holder, or soon the holder once node-b's hold lapses) removes its entry
    // and its Lease.
    wait_for(
        &[&a],
        Duration::from_secs(60),
        "the departed entry removed",
        || nodes(c) == ["node-a", "node-other"],
    );
    wait_for(
        &[&a],
        Duration::from_secs(30),
        "the departed node's Lease deleted",
        || {
            c.kubectl(
                &["get", "lease", &format!("{LEASE}-node-b"), "-n", &ns],
                None,
            )
            .is_err()
        },
    );
    assert_eq!(holder(c, &ns).as_deref(), Some("node-a"));
    assert!(
        c.kubectl(
            &["get", "lease", &format!("{LEASE}-node-a"), "-n", &ns],
            None
        )
        .is_ok(),
        "the live node's Lease stays"
    );
    assert_eq!(nodes(c), ["node-a", "node-other"]);
}

#[test]
fn a_stopping_holder_hands_the_lease_back_at_once() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("handback");
    let a = c.start_node(&config(&ns, "127.0.0.1"), &ns, "node-a");
    wait_for(
        &[&a],
        Duration::from_secs(30),
        "node-a holds the Lease",
        || holder(c, &ns).as_deref() == Some("node-a"),
    );
    let b = c.start_node(&config(&ns, "127.0.0.2"), &ns, "node-b");
    a.terminate();
    // Well inside the Lease's 15 s: node-b did not wait for it to lapse.
    let started = Instant::now();
    wait_for(
        &[&a, &b],
        Duration::from_secs(8),
        "node-b takes the Lease",
        || holder(c, &ns).as_deref() == Some("node-b"),
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn a_forwarder_and_a_gateway_listener_on_one_port_go_to_the_older_on_every_instance() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("ports");
    c.grant_forwarder_rbac(&ns);
    let class = format!("udp-director-{ns}");
    let port = free_port();
    let (relayed, routed) = (Echo::tagged(b'F'), Echo::tagged(b'V'));
    let forwarder = format!(
        "apiVersion: udp-director.dev/v1alpha1\nkind: Forwarder\nmetadata: {{name: relay, namespace: {ns}}}\n\
         spec: {{udp: {{listenPort: {port}, targetHost: \"127.0.0.1\", targetPort: {}}}}}\n",
        relayed.addr.port()
    );
    c.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb-udp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: keep, port: 1, protocol: UDP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb-tcp, namespace: {ns}}}\n\
         spec: {{type: LoadBalancer, ports: [{{name: keep, port: 1, protocol: TCP}}]}}\n---\n\
         {forwarder}"
    ));
    // creationTimestamp counts seconds: the Gateway is a second younger, not as old.
    std::thread::sleep(Duration::from_millis(1100));
    c.apply(&gateway_objects(&ns, &class, port, routed.addr));
    let start =
        |bind: &str, node: &str| c.start_node(&Cluster::forwarder_config(&ns, bind), &ns, node);
    let a = start("127.0.0.1", "node-a");
    let b = start("127.0.0.2", "node-b");

    // Whose backend answers a datagram through `ip`'s port (a new client each time, so no
    // session of the other holder's stands in the way).
    let answer = |ip: &str| {
        let cl = client();
        cl.send_to(b"x", (ip, port)).unwrap();
        datagram_within(&cl, Duration::from_millis(300)).map(|d| d[0])
    };
    let entry = |node: &str| {
        get(c, "forwarder", &ns, "relay")["status"]["instances"]
            .as_array()
            .and_then(|list| list.iter().find(|i| i["node"] == node).cloned())
            .unwrap_or_default()
    };
    let listener = || {
        let l = get(c, "gateway", &ns, "edge")["status"]["listeners"][0].clone();
        (
            cond(&l["conditions"], "Accepted").clone(),
            cond(&l["conditions"], "Programmed").clone(),
        )
    };
    // The Forwarder is older: it serves on both nodes, its entries say ready, and the
    // listener's status names it on both.
    let forwarder_holds = || {
        let held = format!("udp/{port} is held by Forwarder {ns}/relay (older)");
        let (accepted, programmed) = listener();
        let message = accepted["message"].as_str().unwrap_or_default();
        answer("127.0.0.1") == Some(b'F')
            && answer("127.0.0.2") == Some(b'F')
            && ["node-a", "node-b"].iter().all(|n| {
                entry(n)["ready"] == true
                    && message.contains(&format!("not open on node {n}: {held}"))
            })
            && accepted["status"] == "False"
            && accepted["reason"] == "PortUnavailable"
            && programmed["status"] == "False"
    };
    wait_for(
        &[&a, &b],
        Duration::from_secs(60),
        "the older Forwarder holds the port everywhere",
        forwarder_holds,
    );

    // node-b restarts: it picks the same holder.
    drop(b);
    let b = start("127.0.0.2", "node-b");
    wait_for(
        &[&a, &b],
        Duration::from_secs(60),
        "the Forwarder again, after a restart",
        forwarder_holds,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(forwarder_holds(), "and keeps it");

    // The Forwarder goes: the listener opens by itself. Created again, the Forwarder is the
    // younger: it is refused on both nodes, naming the listener, and the listener serves on.
    c.must(&["delete", "forwarder", "relay", "-n", &ns], None);
    let gateway_holds = |refused: bool| {
        let held = format!("udp/{port} is held by Gateway {ns}/edge listener voice (older)");
        let (accepted, programmed) = listener();
        answer("127.0.0.1") == Some(b'V')
            && answer("127.0.0.2") == Some(b'V')
            && accepted["status"] == "True"
            && programmed["status"] == "True"
            && programmed["message"]
                .as_str()
                .is_some_and(|m| m.contains("open on 2 of 2 node(s)"))
            && (!refused
                || ["node-a", "node-b"].iter().all(|n| {
                    let e = entry(n);
                    e["ready"] == false && e["message"] == held.as_str()
                }))
    };
    wait_for(
        &[&a, &b],
        Duration::from_secs(60),
        "the listener opens once the Forwarder is gone",
        || gateway_holds(false),
    );
    c.apply(&forwarder);
    wait_for(
        &[&a, &b],
        Duration::from_secs(60),
        "the older listener keeps the port from the new Forwarder",
        || gateway_holds(true),
    );

    // node-a restarts: it picks the same holder.
    drop(a);
    let a = start("127.0.0.1", "node-a");
    wait_for(
        &[&a, &b],
        Duration::from_secs(60),
        "the listener again, after a restart",
        || gateway_holds(true),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(gateway_holds(true), "and keeps it");
}
