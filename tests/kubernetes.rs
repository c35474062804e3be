//! The Kubernetes suite: the proxy against a real kube-apiserver (scripts/k8s-apiserver.sh),
//! running as the RBAC-limited service account. Each test has its own namespace and proxy.
//! Skipped, loudly, when no API server is configured; a failure under `CI=true`.

mod common;

use common::cluster::{READY_WITHIN, cluster, gs_status, ready_query, served_by};
use common::*;

#[test]
fn gameservers_are_picked_by_status_and_follow_status_changes() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("gs-status");
    let (a, b) = (Echo::tagged(1), Echo::tagged(2));
    c.gameserver(&ns, "gs-a", "", "Ready", a.addr);
    c.gameserver(&ns, "gs-b", "", "Allocated", b.addr);
    let p = c.start_proxy(&ns, "");
    assert_eq!(
        p.metric(r#"udp_director_inventory_objects{resource_type="gameserver"}"#),
        2.0
    );
    assert_eq!(
        p.metric(r#"udp_director_inventory_stale{resource="gameservers.agones.dev"}"#),
        0.0
    );

    let ready = ready_query("gameserver", &ns);
    assert_eq!(served_by(&p, &ready), Ok(1));
    // status.addresses, entry of type PodIP.
    assert_eq!(served_by(&p, &ready_query("gameserver-podip", &ns)), Ok(1));

    // The fleet changes under the proxy: routing follows, no restart.
    c.patch_status(&ns, "gameservers", "gs-a", &gs_status("Allocated", a.addr));
    c.patch_status(&ns, "gameservers", "gs-b", &gs_status("Ready", b.addr));
    p.eventually("queries follow the status change", |p| {
        served_by(p, &ready) == Ok(2)
    });
    c.patch_status(&ns, "gameservers", "gs-b", &gs_status("Shutdown", b.addr));
    p.eventually("a server no longer Ready leaves the selection", |p| {
        p.query(&ready)["code"] == "no_match"
    });
    // A GameServer that appears is served, with no API call per query.
    c.gameserver(&ns, "gs-c", "", "Ready", b.addr);
    p.eventually("a new server is picked up", |p| {
        served_by(p, &ready) == Ok(2)
    });
}

#[test]
fn deleted_gameserver_ends_its_sessions_and_default_sessions_move() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("gs-delete");
    let (a, b) = (Echo::tagged(1), Echo::tagged(2));
    c.gameserver(&ns, "gs-a", "id: a", "Ready", a.addr);
    c.gameserver(&ns, "gs-b", "id: b", "Allocated", b.addr);
    let extra = format!("defaultEndpoint: {}\n", ready_query("gameserver", &ns));
    let p = c.start_proxy(&ns, &extra);

    // A token session and a default-endpoint session, both on gs-a.
    let with_token = client();
    let answer = p.token(&format!(
        r#"{{"resourceType":"gameserver","namespace":"{ns}","labelSelector":{{"id":"a"}}}}"#
    ));
    with_token
        .send_to(answer.as_bytes(), p.data_addr())
        .unwrap();
    with_token.send_to(b"x", p.data_addr()).unwrap();
    assert_eq!(expect_datagram(&with_token)[0], 1);
    // The default endpoint is resolved from the inventory after the proxy turns ready: a
    // tokenless datagram before that is dropped (no session), so the client tries again.
    let without = client();
    p.eventually("the default endpoint applies", |p| {
        without.send_to(b"x", p.data_addr()).unwrap();
        datagram_within(&without, std::time::Duration::from_millis(300)).is_some_and(|d| d[0] == 1)
    });
    c.patch_status(&ns, "gameservers", "gs-b", &gs_status("Ready", b.addr));
    c.must(&["delete", "gameserver", "gs-a", "-n", &ns], None);

    // The token session ends, so the client's next datagram opens a default session (gs-b); the
    // default session moves to the new default (gs-b).
    for (what, s) in [
        ("token session ends", &with_token),
        ("default session moves", &without),
    ] {
        // A datagram forwarded to gs-a as its session ends gets no answer: try again.
        p.eventually(what, |p| {
            s.send_to(b"x", p.data_addr()).unwrap();
            datagram_within(s, std::time::Duration::from_millis(300)).is_some_and(|d| d[0] == 2)
        });
    }
    assert!(p.metric("udp_director_sessions_closed_total") >= 1.0);
    assert!(
        p.sessions()
            .iter()
            .all(|s| !s["target"].to_string().contains(&a.addr.to_string()))
    );
}

#[test]
fn pods_with_named_ports_serve_every_data_port() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("pods");
    let (game, voice) = (Echo::tagged(3), Echo::tagged(4));
    c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: match-1, namespace: {ns}, labels: {{app: match}}}}
spec:
  containers:
  - name: server
    image: example.com/game-server:1
    ports: [{{name: game, containerPort: {}, protocol: UDP}}, {{name: voice, containerPort: {}, protocol: UDP}}]
"#,
        game.addr.port(),
        voice.addr.port()
    ));
    let pod_query =
        format!(r#"{{"resourceType":"pod","namespace":"{ns}","labelSelector":{{"app":"match"}}}}"#);
    let p = c.start_proxy(&ns, "");
    assert_eq!(
        p.query(&pod_query)["code"],
        "backend_unresolvable",
        "no podIP before the kubelet reports one"
    );
    c.patch_status(
        &ns,
        "pods",
        "match-1",
        r#"{"status":{"phase":"Running","podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}"#,
    );
    p.eventually("the pod's IP is seen", |p| {
        p.query(&pod_query).get("token").is_some()
    });
    let answer = p.query(&pod_query);
    let token = answer["token"].as_str().unwrap();
    for (port, tag) in [("game", 3u8), ("voice", 4u8)] {
        let addr = p.data.iter().find(|(n, _)| n == port).unwrap().1;
        assert_eq!(answer["ports"][port], addr.port(), "{answer}");
        let s = client();
        s.send_to(token.as_bytes(), addr).unwrap();
        s.send_to(b"hello", addr).unwrap();
        assert_eq!(
            expect_datagram(&s),
            [&[tag][..], b"hello"].concat(),
            "{port}"
        );
    }
}

#[test]
fn service_based_lookup_through_cluster_ip_and_endpoint_slices() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("services");
    let (first, second) = (Echo::tagged(5), Echo::tagged(6));
    c.apply_gameserver(&ns, "gs-vip", "id: vip");
    c.apply_gameserver(&ns, "gs-headless", "id: headless");
    c.apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: gs-vip, namespace: {ns}, labels: {{game.example/server: gs-vip}}}}
spec: {{ports: [{{name: game, port: 7777, protocol: UDP}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: gs-headless, namespace: {ns}, labels: {{game.example/server: gs-headless}}}}
spec: {{clusterIP: None, ports: [{{name: game, port: 7777, protocol: UDP}}]}}
"#
    ));
    let slice = |port: u16, ready: bool| {
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: gs-headless-x1, namespace: {ns}, labels: {{kubernetes.io/service-name: gs-headless}}}}
addressType: IPv4
ports: [{{name: game, port: {port}, protocol: UDP}}]
endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: {ready}}}}}]
"#
        )
    };
    c.apply(&slice(first.addr.port(), true));
    let p = c.start_proxy(&ns, "");
    let by_id = |id: &str| {
        format!(
            r#"{{"resourceType":"gameserver-svc","namespace":"{ns}","labelSelector":{{"id":"{id}"}}}}"#
        )
    };

    // A ClusterIP Service: its virtual IP and the Service port.
    let cluster_ip = c.must(
        &[
            "get",
            "service",
            "gs-vip",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    let token = p.token(&by_id("vip"));
    let s = client();
    s.send_to(token.as_bytes(), p.data_addr()).unwrap();
    p.eventually("a session to the ClusterIP", |p| {
        p.sessions()
            .iter()
            .any(|x| x["target"] == format!("{cluster_ip}:7777"))
    });

    // A headless Service: a ready endpoint of its EndpointSlice, on the slice's port.
    assert_eq!(served_by(&p, &by_id("headless")), Ok(5));
    c.apply(&slice(second.addr.port(), true));
    p.eventually("EndpointSlice changes are watched", |p| {
        served_by(p, &by_id("headless")) == Ok(6)
    });
    c.apply(&slice(second.addr.port(), false));
    p.eventually("no ready endpoint, no backend", |p| {
        p.query(&by_id("headless"))["code"] == "backend_unresolvable"
    });
}

#[test]
fn a_missing_permission_keeps_the_proxy_unready_and_says_which() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("forbidden");
    // ConfigMaps are not in the ClusterRole generated from the suite's config.
    let extra = "  settings: {group: \"\", version: v1, resource: configmaps, addressPath: data.address, portPath: data.port}\n";
    let p = c.launch_proxy(&ns, extra);
    p.eventually_within(READY_WITHIN, "the forbidden watch is reported stale", |p| {
        p.metric(r#"udp_director_inventory_stale{resource="configmaps"}"#) == 1.0
    });
    assert_eq!(p.http("GET", "/readyz").0, 503);
    assert_eq!(
        p.query(&ready_query("gameserver", &ns))["code"],
        "inventory_unavailable",
        "queries wait for every initial list"
    );
}

#[test]
fn remote_sessions_api_callers_need_a_token_the_api_server_allows() {
    let Some(c) = cluster() else { return };
    let net = match common::netns::NetNs::create() {
        Ok(net) => net,
        Err(e) => {
            skip_test(&format!("cannot make a network namespace: {e}"));
            return;
        }
    };
    let ns = c.namespace("sessions-api");
    // Service account `ops` may list and delete sessions; `viewer` has no such grant.
    c.apply(&format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: udp-director-sessions-operator}}
rules: [{{apiGroups: [udp-director.dev], resources: [sessions], verbs: [list, delete]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: udp-director-sessions-operator-{ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: udp-director-sessions-operator}}
subjects: [{{kind: ServiceAccount, name: ops, namespace: {ns}}}]
"#
    ));
    let ops = c.service_account_token(&ns, "ops", Some("udp-director"));
    let viewer = c.service_account_token(&ns, "viewer", Some("udp-director"));
    // The same account's token for the API server: not for this proxy.
    let ops_for_api_server = c.service_account_token(&ns, "ops", None);

    let echo = Echo::tagged(1);
    c.gameserver(&ns, "gs-a", "", "Ready", echo.addr);
    let p = c.start_proxy_on(&ns, "0.0.0.0");
    assert_eq!(served_by(&p, &ready_query("gameserver", &ns)), Ok(1));
    let admin = std::net::SocketAddr::new(net.host_ip, p.admin.port());
    let remote = |method: &'static str, path: &'static str, token: Option<&str>| {
        let header = token.map(|t| format!("Authorization: Bearer {t}\r\n"));
        net.run(move || http_request(admin, method, path, header.as_deref().unwrap_or("")))
    };

    assert_eq!(
        remote("GET", "/healthz", None).0,
        200,
        "probes need no token"
    );
    let (status, body) = remote("GET", "/sessions", None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(remote("GET", "/sessions", Some("made-up-token")).0, 401);
    let (status, body) = remote("GET", "/sessions", Some(&ops_for_api_server));
    assert_eq!(status, 401, "a token for another audience: {body}");
    let (status, body) = remote("GET", "/sessions", Some(&viewer));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("viewer") && !body.contains("127.0.0.1"),
        "{body}"
    );
    let (status, body) = remote("GET", "/sessions", Some(&ops));
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["sessions"].as_array().unwrap().len(), 1, "{body}");

    assert_eq!(
        remote("DELETE", "/sessions/127.0.0.1", Some(&viewer)).0,
        403
    );
    assert_eq!(
        p.sessions().len(),
        1,
        "loopback needs no token; nothing killed yet"
    );
    let (status, body) = remote("DELETE", "/sessions/127.0.0.1", Some(&ops));
    assert_eq!((status, body.as_str()), (200, r#"{"killed":1}"#));
    assert!(p.sessions().is_empty());
}

#[test]
fn the_forwarder_crd_is_accepted_and_validates_its_objects() {
    let Some(c) = cluster() else { return };
    let crds =
        std::fs::read_to_string(common::cluster::repo().join("deploy/crds/udp-director.dev.yaml"))
            .unwrap();
    c.apply(&crds);
    c.must(
        &[
            "wait",
            "--for=condition=Established",
            "crd/forwarders.udp-director.dev",
            "--timeout=30s",
        ],
        None,
    );
    let ns = c.namespace("fwd-crd");
    let forwarder = |name: &str, port: u32| {
        format!(
            "apiVersion: udp-director.dev/v1alpha1\nkind: Forwarder\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  udp: {{listenPort: {port}, targetHost: gs-1.games.svc.cluster.local, targetPort: 27015, idleTimeoutSeconds: 30}}\n  proxyProtocol: v2-first\n"
        )
    };
    c.apply(&forwarder("game-1", 27015));
    let got = c.must(
        &["get", "forwarders", "-n", &ns, "game-1", "-o", "json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["spec"]["udp"]["listenPort"], 27015);
    // The schema refuses what a forwarder cannot be: port 0, over 65535, an unknown protocol.
    for bad in [forwarder("bad-0", 0), forwarder("bad-big", 70000)] {
        let e = c
            .kubectl(&["apply", "--server-side", "-f", "-"], Some(&bad))
            .unwrap_err();
        assert!(e.contains("listenPort"), "{e}");
    }
    let bad = forwarder("bad-proto", 27016).replace("v2-first", "v3");
    let e = c
        .kubectl(&["apply", "--server-side", "-f", "-"], Some(&bad))
        .unwrap_err();
    assert!(e.contains("proxyProtocol"), "{e}");
    // Each instance's status entry is keyed by node: two field managers, two entries.
    for node in ["node-a", "node-b"] {
        let status = format!(
            r#"{{"apiVersion":"udp-director.dev/v1alpha1","kind":"Forwarder","metadata":{{"name":"game-1","namespace":"{ns}"}},"status":{{"instances":[{{"node":"{node}","ready":true,"listening":["udp/27015"],"message":""}}]}}}}"#
        );
        c.must(
            &[
                "apply",
                "--server-side",
                "--subresource=status",
                // A status apply carries no spec; the client-side schema check would ask for one.
                "--validate=false",
                &format!("--field-manager=udp-director-{node}"),
                "-f",
                "-",
            ],
            Some(&status),
        );
    }
    let got = c.must(
        &["get", "forwarders", "-n", &ns, "game-1", "-o", "json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    let nodes: Vec<&str> = v["status"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        ["node-a", "node-b"],
        "neither instance overwrote the other"
    );
}
