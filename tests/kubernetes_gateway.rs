//! The Gateway API against the real kube-apiserver (SPEC §7): a Gateway of a GatewayClass
//! naming this proxy's controller, with a UDP and a TCP listener opened at run time, a UDPRoute
//! and a TCPRoute attached by `sectionName`, traffic through both, and the status conditions
//! the API defines. The proxy runs as the service account with only the generated RBAC.
//! Skipped, loudly, when no API server is configured; a failure under `CI=true`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, cluster, cond};
use common::*;

const CONTROLLER: &str = "udp-director.dev/gateway-controller";

fn get(c: &Cluster, resource: &str, ns: &str, name: &str) -> serde_json::Value {
    c.get_json(resource, ns, name)
}

fn wait_for(p: &Proxy, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() >= deadline {
            panic!("timed out: {what}\n--- proxy log ---\n{}", p.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn round_trip(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    c.send_to(payload, to).unwrap();
    datagram_within(c, Duration::from_millis(500))
}

fn service(ns: &str, name: &str, port: u16, protocol: &str, endpoint_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: None, ports: [{{name: p, port: {port}, protocol: {protocol}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: {endpoint_port}, protocol: {protocol}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
    )
}

fn udp_route(ns: &str, name: &str, backends: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: UDPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: voice}}], rules: [{{backendRefs: [{backends}]}}]}}\n"
    )
}

#[test]
fn a_gateway_serves_udp_and_tcp_routes_and_reports_what_the_api_defines() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("gw");
    let far = c.namespace("gw-far");
    let class = format!("udp-director-{ns}");
    let (udp_port, tcp_port) = (free_port(), free_port());
    let echo = Echo::tagged(b'V');
    let tcp_echo = TcpEcho::tagged(b'c');
    let far_echo = Echo::tagged(b'F');
    c.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {class}}}\n\
         spec: {{controllerName: {CONTROLLER}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: {ns}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{{name: voice, port: {udp_port}, protocol: UDP}}, {{name: chat, port: {tcp_port}, protocol: TCP}}]}}\n"
    ));
    c.apply(&service(&ns, "voice", 5000, "UDP", echo.addr.port()));
    c.apply(&service(&ns, "chat", 6000, "TCP", tcp_echo.addr.port()));
    c.apply(&service(&far, "far", 5000, "UDP", far_echo.addr.port()));
    c.apply(&udp_route(&ns, "voice", "{name: voice, port: 5000}"));
    c.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {{name: chat, namespace: {ns}}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: chat}}], rules: [{{backendRefs: [{{name: chat, port: 6000}}]}}]}}\n"
    ));
    let p = c.start_proxy_as(&ns, "node-g");

    // Traffic through both listeners, opened at run time.
    let udp = SocketAddr::from(([127, 0, 0, 1], udp_port));
    let cl = client();
    wait_for(&p, "the UDP listener serves", || {
        round_trip(&cl, udp, b"1").as_deref() == Some(b"V1".as_slice())
    });
    let mut tcp = tcp_client(SocketAddr::from(([127, 0, 0, 1], tcp_port)));
    tcp.write_all(b"hi").unwrap();
    assert_eq!(read_exact_within(&mut tcp, 3), b"chi");

    // Status, as the API defines it.
    wait_for(&p, "the GatewayClass is accepted", || {
        cond(
            &get(c, "gatewayclass", "", &class)["status"]["conditions"],
            "Accepted",
        )["status"]
            == "True"
    });
    wait_for(&p, "the Gateway is accepted and programmed", || {
        let gw = get(c, "gateway", &ns, "edge");
        let listeners = &gw["status"]["listeners"];
        cond(&gw["status"]["conditions"], "Accepted")["status"] == "True"
            && cond(&gw["status"]["conditions"], "Programmed")["status"] == "True"
            && listeners[0]["attachedRoutes"] == 1
            && listeners[1]["attachedRoutes"] == 1
            && listeners[0]["supportedKinds"][0]["kind"] == "UDPRoute"
            && cond(&listeners[1]["conditions"], "Accepted")["status"] == "True"
    });
    wait_for(
        &p,
        "the UDPRoute is accepted with its refs resolved",
        || {
            let r = get(c, "udproute", &ns, "voice");
            let parent = &r["status"]["parents"][0];
            parent["controllerName"] == CONTROLLER
                && parent["parentRef"]["sectionName"] == "voice"
                && cond(&parent["conditions"], "Accepted")["status"] == "True"
                && cond(&parent["conditions"], "ResolvedRefs")["status"] == "True"
        },
    );

    // A route whose backend Service is missing.
    c.apply(&udp_route(&ns, "missing", "{name: nope, port: 5000}"));
    wait_for(&p, "BackendNotFound", || {
        let parent = &get(c, "udproute", &ns, "missing")["status"]["parents"][0];
        let resolved = cond(&parent["conditions"], "ResolvedRefs");
        resolved["status"] == "False" && resolved["reason"] == "BackendNotFound"
    });
    wait_for(&p, "two routes on the voice listener", || {
        get(c, "gateway", &ns, "edge")["status"]["listeners"][0]["attachedRoutes"] == 2
    });

    // A backend in another namespace: refused without a ReferenceGrant, accepted with one.
    c.must(&["delete", "udproute", "voice", "-n", &ns], None);
    c.must(&["delete", "udproute", "missing", "-n", &ns], None);
    c.apply(&udp_route(
        &ns,
        "far",
        &format!("{{name: far, namespace: {far}, port: 5000}}"),
    ));
    wait_for(&p, "RefNotPermitted", || {
        let parent = &get(c, "udproute", &ns, "far")["status"]["parents"][0];
        cond(&parent["conditions"], "ResolvedRefs")["reason"] == "RefNotPermitted"
    });
    let fresh = client();
    assert_eq!(round_trip(&fresh, udp, b"2"), None, "its share is dropped");
    // The core group left out: a 1.20 API server turns a written empty string into null.
    c.must(&["create", "-f", "-"], Some(&format!(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: from-gw, namespace: {far}}}\n\
         spec: {{from: [{{group: gateway.networking.k8s.io, kind: UDPRoute, namespace: {ns}}}], to: [{{kind: Service}}]}}\n"
    )));
    wait_for(&p, "the grant resolves the ref", || {
        let parent = &get(c, "udproute", &ns, "far")["status"]["parents"][0];
        cond(&parent["conditions"], "ResolvedRefs")["status"] == "True"
    });
    let fresh = client();
    wait_for(&p, "traffic reaches the other namespace", || {
        round_trip(&fresh, udp, b"3").as_deref() == Some(b"F3".as_slice())
    });

    // A listener port conflict: another Gateway on the same UDP port.
    c.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: clash, namespace: {ns}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{{name: voice, port: {udp_port}, protocol: UDP}}]}}\n"
    ));
    wait_for(&p, "PortUnavailable", || {
        let gw = get(c, "gateway", &ns, "clash");
        let accepted = cond(&gw["status"]["listeners"][0]["conditions"], "Accepted");
        accepted["status"] == "False"
            && accepted["reason"] == "PortUnavailable"
            && cond(&gw["status"]["conditions"], "Programmed")["status"] == "False"
    });
    assert_eq!(
        round_trip(&client(), udp, b"4").as_deref(),
        Some(b"F4".as_slice()),
        "the first Gateway keeps serving"
    );

    // The Gateway goes: its listeners close.
    c.must(&["delete", "gateway", "edge", "-n", &ns], None);
    wait_for(&p, "the TCP listener closed", || {
        std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], tcp_port))).is_err()
    });
}

#[test]
fn the_gateway_rbac_watches_and_writes_status_only() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("gw-rbac");
    for resource in [
        "gatewayclasses.gateway.networking.k8s.io",
        "gateways.gateway.networking.k8s.io",
        "udproutes.gateway.networking.k8s.io",
        "tcproutes.gateway.networking.k8s.io",
        "referencegrants.gateway.networking.k8s.io",
    ] {
        assert!(c.proxy_can("list", resource, &ns), "list {resource}");
        assert!(c.proxy_can("watch", resource, &ns), "watch {resource}");
        for verb in ["create", "update", "patch", "delete"] {
            assert!(!c.proxy_can(verb, resource, &ns), "may {verb} {resource}");
        }
    }
    for resource in [
        "gatewayclasses.gateway.networking.k8s.io/status",
        "gateways.gateway.networking.k8s.io/status",
        "udproutes.gateway.networking.k8s.io/status",
        "tcproutes.gateway.networking.k8s.io/status",
    ] {
        assert!(c.proxy_can("patch", resource, &ns), "patch {resource}");
        assert!(!c.proxy_can("update", resource, &ns), "update {resource}");
    }
    assert!(!c.proxy_can(
        "patch",
        "referencegrants.gateway.networking.k8s.io/status",
        &ns
    ));
}

#[test]
fn a_listener_that_cannot_be_served_is_refused_alone() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("gw-bad");
    let class = format!("udp-director-{ns}");
    let port = free_port();
    let echo = Echo::tagged(b'B');
    // Port 0 gets past this API server's schema (the official CRDs refuse it; a file does not).
    c.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {class}}}\n\
         spec: {{controllerName: {CONTROLLER}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: {ns}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{{name: nowhere, port: 0, protocol: UDP}}, {{name: voice, port: {port}, protocol: UDP}}]}}\n"
    ));
    c.apply(&service(&ns, "voice", 5000, "UDP", echo.addr.port()));
    c.apply(&udp_route(&ns, "voice", "{name: voice, port: 5000}"));
    let p = c.start_proxy_as(&ns, "node-b");
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let cl = client();
    wait_for(&p, "the valid listener serves", || {
        round_trip(&cl, to, b"1").as_deref() == Some(b"B1".as_slice())
    });
    wait_for(&p, "the invalid listener's status says why", || {
        let gw = get(c, "gateway", &ns, "edge");
        let listeners = gw["status"]["listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let named = |name: &str| {
            listeners
                .iter()
                .find(|l| l["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        let (bad, good) = (named("nowhere"), named("voice"));
        let accepted = cond(&bad["conditions"], "Accepted");
        accepted["status"] == "False"
            && accepted["reason"] == "UnsupportedValue"
            && accepted["message"] == "port: 0 is not a port (1 to 65535)"
            && cond(&bad["conditions"], "Programmed")["status"] == "False"
            && cond(&good["conditions"], "Accepted")["status"] == "True"
            && good["attachedRoutes"] == 1
            && cond(&gw["status"]["conditions"], "Accepted")["reason"] == "ListenersNotValid"
            && cond(&gw["status"]["conditions"], "Accepted")["status"] == "True"
    });
    assert_eq!(
        p.log()
            .matches("listener nowhere: not served: port: 0 is not a port")
            .count(),
        1,
        "logged once"
    );
}
