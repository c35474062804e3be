//! The stand-in for Agones' allocation API (tests/common/agones.rs) against the real API server:
//! registered through the aggregation layer, it follows Agones' documented allocation semantics
//! over real GameServer objects. These tests check the stand-in, not the proxy; the proxy's
//! allocation tests rely on what they establish.

mod common;

use std::time::Duration;

use common::agones::{
    AgonesAllocatorStandIn, LAST_ALLOCATED, create_allocation, create_allocation_raw,
};
use common::cluster::{Cluster, cluster};
use serde_json::{Value, json};

/// The API server and the stand-in, or None when the suite is skipped.
fn standin() -> Option<(&'static Cluster, &'static AgonesAllocatorStandIn)> {
    let c = cluster()?;
    Some((c, AgonesAllocatorStandIn::start(c)?))
}

/// Creates GameServer `name` with `labels` (YAML map content) and writes `status` to its status
/// subresource, as the Agones controller would.
fn game_server(c: &Cluster, ns: &str, name: &str, labels: &str, status: Value) {
    c.apply(&format!(
        "apiVersion: agones.dev/v1\nkind: GameServer\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{}}\n"
    ));
    c.patch_status(
        ns,
        "gameservers",
        name,
        &json!({ "status": status }).to_string(),
    );
}

/// A status in `state`, at 10.0.0.`n` port 7000 + `n`, on node `node-n`.
fn status(state: &str, n: u8) -> Value {
    json!({"state": state, "address": format!("10.0.0.{n}"), "nodeName": format!("node-{n}"),
        "ports": [{"name": "default", "port": 7000 + u16::from(n)}]})
}

/// [`status`] with a `players` counter at `count` of `capacity`.
fn with_players(state: &str, n: u8, count: i64, capacity: i64) -> Value {
    let mut s = status(state, n);
    s["counters"] = json!({"players": {"count": count, "capacity": capacity}});
    s
}

fn allocation(spec: Value) -> Value {
    json!({"apiVersion": "allocation.agones.dev/v1", "kind": "GameServerAllocation",
        "metadata": {"generateName": "test-"}, "spec": spec})
}

/// Allocates in `ns` as the admin, through the main API server; the answer.
fn allocate(c: &Cluster, ns: &str, spec: Value) -> Value {
    create_allocation(&c.admin_kubeconfig(), ns, &allocation(spec))
        .unwrap_or_else(|refusal| panic!("allocation refused: {refusal:?}"))
}

fn state_of(c: &Cluster, ns: &str, name: &str) -> Value {
    c.get_json("gameservers", ns, name)["status"]["state"].clone()
}

#[test]
fn the_first_selector_that_matches_wins() {
    let Some((c, _agones)) = standin() else {
        return;
    };
    let ns = c.namespace("gsa-order");
    game_server(c, &ns, "gs-a", "tier: gold", status("Ready", 1));
    game_server(c, &ns, "gs-b", "tier: silver", status("Ready", 2));
    game_server(
        c,
        &ns,
        "gs-c",
        "tier: silver, region: eu",
        status("Ready", 3),
    );
    // gs-a comes first by name and matches the second selector; the first selector wins.
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"matchLabels": {"tier": "silver"}}, {"matchLabels": {"tier": "gold"}}]}),
    );
    assert_eq!(answer["status"]["state"], "Allocated", "{answer}");
    assert_eq!(answer["status"]["gameServerName"], "gs-b");
    // Expressions: In, NotIn, Exists, DoesNotExist.
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["silver", "bronze"]},
            {"key": "region", "operator": "Exists"}]}]}),
    );
    assert_eq!(answer["status"]["gameServerName"], "gs-c", "{answer}");
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["silver"]},
            {"key": "region", "operator": "DoesNotExist"}]}]}),
    );
    assert_eq!(answer["status"]["gameServerName"], "gs-a", "{answer}");
}

#[test]
fn a_ready_server_is_written_allocated_through_the_api() {
    let Some((c, agones)) = standin() else { return };
    let ns = c.namespace("gsa-ready");
    game_server(c, &ns, "gs-1", "fleet: f", status("Ready", 1));
    game_server(c, &ns, "gs-2", "fleet: f", status("Ready", 2));
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"matchLabels": {"fleet": "f"}}]}),
    );
    assert_eq!(answer["kind"], "GameServerAllocation");
    assert_eq!(
        answer["metadata"]["name"], "gs-1",
        "named after the server, as Agones does"
    );
    assert_eq!(answer["metadata"]["namespace"], ns.as_str());
    let status = &answer["status"];
    assert_eq!(status["state"], "Allocated", "{answer}");
    assert_eq!(status["gameServerName"], "gs-1");
    assert_eq!(status["address"], "10.0.0.1");
    assert_eq!(status["nodeName"], "node-1");
    assert_eq!(status["ports"], json!([{"name": "default", "port": 7001}]));
    assert_eq!(status["metadata"]["labels"]["fleet"], "f");
    // Written through the API server: read back.
    let gs = c.get_json("gameservers", &ns, "gs-1");
    assert_eq!(gs["status"]["state"], "Allocated");
    assert!(
        gs["metadata"]["annotations"][LAST_ALLOCATED].is_string(),
        "{gs}"
    );
    assert_eq!(state_of(c, &ns, "gs-2"), "Ready");
    // kubectl reaches it too (through discovery), and the next Ready server is taken.
    let out = c.must(
        &["create", "-n", &ns, "-o", "json", "-f", "-"],
        Some(&allocation(json!({})).to_string()),
    );
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["status"]["gameServerName"], "gs-2", "{answer}");
    assert_eq!(state_of(c, &ns, "gs-2"), "Allocated");
    // The stand-in saw the callers the API server vouched for.
    let served = agones.requests(&ns);
    assert_eq!(served.len(), 2);
    assert!(served.iter().all(|r| r.user == "admin"), "{served:?}");
    assert!(served[0].groups.iter().any(|g| g == "system:masters"));
    assert_eq!(agones.allocations(&ns), 2);
}

#[test]
fn backfill_picks_an_allocated_server_with_room_and_counts_the_player() {
    let Some((c, _agones)) = standin() else {
        return;
    };
    let ns = c.namespace("gsa-backfill");
    game_server(
        c,
        &ns,
        "gs-a-full",
        "",
        with_players("Allocated", 1, 10, 10),
    );
    game_server(c, &ns, "gs-b-room", "", with_players("Allocated", 2, 8, 10));
    game_server(c, &ns, "gs-c-ready", "", with_players("Ready", 3, 0, 10));
    let backfill = json!({
        "selectors": [
            {"gameServerState": "Allocated", "counters": {"players": {"minAvailable": 1}}},
            {"gameServerState": "Ready"}],
        "counters": {"players": {"action": "Increment", "amount": 1}}});
    let players = |name: &str| {
        c.get_json("gameservers", &ns, name)["status"]["counters"]["players"]["count"].clone()
    };
    for count in [9, 10] {
        let answer = allocate(c, &ns, backfill.clone());
        assert_eq!(answer["status"]["gameServerName"], "gs-b-room", "{answer}");
        assert_eq!(answer["status"]["counters"]["players"]["count"], count);
        assert_eq!(players("gs-b-room"), count);
    }
    assert_eq!(players("gs-a-full"), 10, "a full server is skipped");
    // Both Allocated servers full: the Ready one.
    let answer = allocate(c, &ns, backfill.clone());
    assert_eq!(answer["status"]["gameServerName"], "gs-c-ready", "{answer}");
    assert_eq!(state_of(c, &ns, "gs-c-ready"), "Allocated");
    assert_eq!(players("gs-c-ready"), 1);
    // The count stays within capacity; maxAvailable bounds the room.
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"gameServerState": "Allocated",
                "counters": {"players": {"minAvailable": 1, "maxAvailable": 9}}}],
            "counters": {"players": {"action": "Increment", "amount": 50}}}),
    );
    assert_eq!(answer["status"]["gameServerName"], "gs-c-ready", "{answer}");
    assert_eq!(players("gs-c-ready"), 10);
    let answer = allocate(
        c,
        &ns,
        json!({"selectors": [{"gameServerState": "Allocated", "counters": {"players": {"minCount": 10}}}],
            "counters": {"players": {"action": "Decrement", "amount": 3}}}),
    );
    assert_eq!(answer["status"]["gameServerName"], "gs-a-full", "{answer}");
    assert_eq!(players("gs-a-full"), 7);
}

#[test]
fn the_metadata_patch_lands_on_the_game_server() {
    let Some((c, _agones)) = standin() else {
        return;
    };
    let ns = c.namespace("gsa-meta");
    game_server(c, &ns, "gs-1", "fleet: f, keep: me", status("Ready", 1));
    let answer = allocate(
        c,
        &ns,
        json!({"metadata": {"labels": {"session": "s-42"}, "annotations": {"players": "alice,bob"}}}),
    );
    assert_eq!(answer["status"]["state"], "Allocated", "{answer}");
    assert_eq!(answer["status"]["metadata"]["labels"]["session"], "s-42");
    let gs = c.get_json("gameservers", &ns, "gs-1");
    let labels = &gs["metadata"]["labels"];
    assert_eq!(labels["session"], "s-42", "{gs}");
    assert_eq!(
        (&labels["fleet"], &labels["keep"]),
        (&json!("f"), &json!("me"))
    );
    assert_eq!(gs["metadata"]["annotations"]["players"], "alice,bob");
    assert_eq!(gs["status"]["state"], "Allocated");
}

#[test]
fn nothing_matching_is_unallocated() {
    let Some((c, agones)) = standin() else { return };
    let ns = c.namespace("gsa-none");
    game_server(c, &ns, "gs-1", "fleet: f", status("Ready", 1));
    game_server(c, &ns, "gs-2", "fleet: f", status("Shutdown", 2));
    for spec in [
        json!({"selectors": [{"matchLabels": {"fleet": "other"}}]}),
        json!({"selectors": [{"gameServerState": "Allocated"}]}),
        json!({"selectors": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}]}),
        json!({"selectors": [{"counters": {"players": {"minAvailable": 1}}}]}),
    ] {
        let answer = allocate(c, &ns, spec.clone());
        assert_eq!(
            answer["status"]["state"], "UnAllocated",
            "{spec} → {answer}"
        );
        assert!(answer["status"]["gameServerName"].is_null());
        let name = answer["metadata"]["name"].as_str().unwrap();
        assert!(
            name.starts_with("test-") && name.len() > 5,
            "generated: {name}"
        );
    }
    assert_eq!(state_of(c, &ns, "gs-1"), "Ready", "nothing was written");
    assert_eq!(agones.allocations(&ns), 0);
    assert_eq!(agones.requests(&ns).len(), 4);
}

#[test]
fn two_allocations_racing_for_the_last_server_one_wins_one_contends() {
    let Some((c, agones)) = standin() else { return };
    let ns = c.namespace("gsa-race");
    game_server(c, &ns, "gs-last", "fleet: f", status("Ready", 1));
    agones.set_race_window(&ns, Duration::from_millis(1500));
    let spec = json!({"selectors": [{"matchLabels": {"fleet": "f"}}]});
    let mut states: Vec<String> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..2)
            .map(|_| s.spawn(|| allocate(c, &ns, spec.clone())))
            .collect();
        racers
            .into_iter()
            .map(|r| {
                r.join().unwrap()["status"]["state"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    });
    states.sort();
    assert_eq!(states, ["Allocated", "Contention"]);
    assert_eq!(state_of(c, &ns, "gs-last"), "Allocated");
    // No window: the server is taken, so the next request finds none.
    agones.set_race_window(&ns, Duration::ZERO);
    assert_eq!(allocate(c, &ns, spec)["status"]["state"], "UnAllocated");
}

#[test]
fn a_caller_without_rbac_is_refused_by_the_api_server_before_the_stand_in() {
    let Some((c, agones)) = standin() else { return };
    let ns = c.namespace("gsa-rbac");
    game_server(c, &ns, "gs-1", "", status("Ready", 1));
    // The proxy's service account has no grant on gameserverallocations (yet).
    let refusal =
        create_allocation(&c.proxy_kubeconfig(), &ns, &allocation(json!({}))).expect_err("refused");
    assert_eq!(refusal.code, 403, "{refusal:?}");
    assert_eq!(refusal.reason, "Forbidden");
    assert!(agones.requests(&ns).is_empty(), "the stand-in saw it");
    assert_eq!(state_of(c, &ns, "gs-1"), "Ready");
    // Granted `create`, the same caller allocates, and the stand-in sees who it was.
    c.apply(&format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: allocate, namespace: {ns}}}
rules: [{{apiGroups: [allocation.agones.dev], resources: [gameserverallocations], verbs: [create]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: allocate, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: allocate}}
subjects: [{{kind: ServiceAccount, name: udp-director, namespace: udp-director}}]
"#
    ));
    let answer = create_allocation(&c.proxy_kubeconfig(), &ns, &allocation(json!({})))
        .unwrap_or_else(|r| panic!("{r:?}"));
    assert_eq!(answer["status"]["state"], "Allocated", "{answer}");
    let served = agones.requests(&ns);
    assert_eq!(served.len(), 1);
    assert_eq!(
        served[0].user,
        "system:serviceaccount:udp-director:udp-director"
    );
}

#[test]
fn malformed_and_invalid_requests_get_a_status_and_the_stand_in_carries_on() {
    let Some((c, agones)) = standin() else { return };
    let ns = c.namespace("gsa-bad");
    game_server(c, &ns, "gs-1", "", status("Ready", 1));
    let admin = c.admin_kubeconfig();
    let refused =
        |body: &[u8]| create_allocation_raw(&admin, &ns, body.to_vec()).expect_err("refused");
    for body in [
        &b"{not json"[..],
        br#"{"spec": {"selectors": "all"}}"#,
        br#"{"spec": {"selectors": [{"matchLabels": {"a": 1}}]}}"#,
        br#"{"kind": "Pod", "apiVersion": "allocation.agones.dev/v1"}"#,
        b"[]",
    ] {
        let r = refused(body);
        assert_eq!(
            (r.code, r.reason.as_str()),
            (400, "BadRequest"),
            "{body:?}: {r:?}"
        );
    }
    for spec in [
        json!({"selectors": [{"gameServerState": "Shutdown"}]}),
        json!({"selectors": [{"matchExpressions": [{"key": "a", "operator": "Near", "values": ["b"]}]}]}),
        json!({"selectors": [{"matchExpressions": [{"key": "a", "operator": "In"}]}]}),
        json!({"counters": {"players": {"action": "Double", "amount": 1}}}),
        json!({"counters": {"players": {"action": "Increment", "amount": -1}}}),
    ] {
        let r = create_allocation(&admin, &ns, &allocation(spec.clone())).expect_err("refused");
        assert_eq!(
            (r.code, r.reason.as_str()),
            (422, "Invalid"),
            "{spec}: {r:?}"
        );
    }
    assert_eq!(state_of(c, &ns, "gs-1"), "Ready");
    assert_eq!(allocate(c, &ns, json!({}))["status"]["state"], "Allocated");
    assert_eq!(agones.requests(&ns).len(), 11);
}

#[test]
fn only_the_api_servers_aggregator_is_served() {
    let Some((c, agones)) = standin() else { return };
    let url = format!("https://{}/apis/allocation.agones.dev/v1", agones.addr);
    let curl = |cert: &[&str]| {
        std::process::Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(cert)
            .arg(&url)
            .output()
            .expect("curl runs")
    };
    // Without the front-proxy client certificate there is no TLS session at all.
    let direct = curl(&[]);
    assert!(
        !direct.status.success(),
        "served without a client certificate"
    );
    let (cert, key) = (
        c.run.join("front-proxy-client.crt"),
        c.run.join("front-proxy-client.key"),
    );
    let aggregator = curl(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&aggregator.stdout), "200");
}
