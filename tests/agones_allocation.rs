//! Agones allocation on query (SPEC §13), the proxy against the real kube-apiserver: the
//! proxy's allocations go through the API server's aggregation layer to the stand-in for
//! Agones' allocation API (tests/common/agones.rs, whose own tests check its semantics) over
//! real GameServer objects. Everything on the proxy's side is real: its client, its RBAC (the
//! Role `udp-director rbac` generates), its retries and its request ids.
//!
//! Skipped, loudly, without an API server; a failure under `CI=true`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agones::AgonesAllocatorStandIn;
use common::cluster::{Cluster, cluster};
use common::*;
use serde_json::{Value, json};

/// A proxy config watching `ns`, with an allocating mapping `gameserver` and a backfilling
/// one `gameserver-backfill`.
fn config(ns: &str) -> String {
    format!(
        "bindAddress: 127.0.0.1\nqueryPort: 0\ndataPort: 0\nadminPort: 0\nworkers: 1\n\
         drainSeconds: 1\ninventory: {{kind: kubernetes, watchNamespaces: [{ns}]}}\n\
         resourceQueryMapping:\n\
         \x20 gameserver: {{group: agones.dev, version: v1, resource: gameservers, \
         addressPath: status.address, portName: default, allocation: {{timeoutMs: 1500, \
         metadata: {{labels: {{udp-director.dev/token: \"{{tokenId}}\"}}}}}}}}\n\
         \x20 gameserver-backfill: {{group: agones.dev, version: v1, resource: gameservers, \
         addressPath: status.address, portName: default, allocation: {{backfill: {{counter: \
         players}}, counters: {{players: {{action: Increment}}}}}}}}\n"
    )
}

/// Grants the proxy's service account what `udp-director rbac` generates for `config`'s
/// allocation in its namespace (a Role and RoleBinding).
fn grant_allocation(c: &Cluster, config: &str) {
    let file = std::env::temp_dir().join(format!(
        "udp-director-allocation-{}-{}.yaml",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::write(&file, config).unwrap();
    let (code, out, err) = run_binary(&["rbac", file.to_str().unwrap(), "--name", "udp-director"]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 0, "{err}");
    let roles: Vec<&str> = out
        .split("---\n")
        .filter(|d| d.contains("-allocation"))
        .collect();
    assert_eq!(roles.len(), 2, "a Role and its RoleBinding: {out}");
    c.apply(&roles.join("---\n"));
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Creates GameServer `name` with `labels` and writes `status` as the Agones controller would.
fn game_server(c: &Cluster, ns: &str, name: &str, labels: &str, status: Value) {
    c.apply(&format!(
        "apiVersion: agones.dev/v1\nkind: GameServer\nmetadata: {{name: {name}, namespace: {ns}, \
         labels: {{{labels}}}}}\nspec: {{}}\n"
    ));
    c.patch_status(
        ns,
        "gameservers",
        name,
        &json!({ "status": status }).to_string(),
    );
}

fn status(state: &str, at: SocketAddr) -> Value {
    json!({"state": state, "address": at.ip().to_string(), "nodeName": "node-1",
        "ports": [{"name": "default", "port": at.port()}]})
}

fn with_players(state: &str, at: SocketAddr, count: i64, capacity: i64) -> Value {
    let mut s = status(state, at);
    s["counters"] = json!({"players": {"count": count, "capacity": capacity}});
    s
}

fn allocate_query(resource_type: &str, ns: &str, labels: &str, request_id: Option<&str>) -> String {
    let id = request_id.map_or(String::new(), |id| format!(r#","requestId":"{id}""#));
    format!(
        r#"{{"resourceType":"{resource_type}","namespace":"{ns}","labelSelector":{{{labels}}},"allocate":true{id}}}"#
    )
}

/// Sends the token then `payload` on the proxy's data port and returns the reply.
fn through(p: &Proxy, token: &str, payload: &[u8]) -> Option<Vec<u8>> {
    let c = client();
    c.send_to(token.as_bytes(), p.data_addr()).unwrap();
    c.send_to(payload, p.data_addr()).unwrap();
    datagram_within(&c, Duration::from_secs(2))
}

fn state_of(c: &Cluster, ns: &str, name: &str) -> Value {
    c.get_json("gameservers", ns, name)["status"]["state"].clone()
}

fn setup(prefix: &str) -> Option<(&'static Cluster, &'static AgonesAllocatorStandIn, String)> {
    let c = cluster()?;
    let agones = AgonesAllocatorStandIn::start(c)?;
    let ns = c.namespace(prefix);
    Some((c, agones, ns))
}

#[test]
fn a_query_allocates_a_ready_server_and_its_token_carries_traffic_there() {
    let Some((c, agones, ns)) = setup("alloc-ready") else {
        return;
    };
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    game_server(c, &ns, "gs-a", "fleet: arena", status("Ready", a.addr));
    game_server(c, &ns, "gs-b", "fleet: lobby", status("Ready", b.addr));
    let config = config(&ns);
    grant_allocation(c, &config);
    let p = c.start_node(&config, &ns, "node-a");

    let answer = p.query(&allocate_query(
        "gameserver",
        &ns,
        r#""fleet":"arena""#,
        None,
    ));
    let token = answer["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}\n{}", p.log()));
    // Agones marked it Allocated, with the mapping's metadata carrying the token's id.
    assert_eq!(state_of(c, &ns, "gs-a"), "Allocated");
    assert_eq!(state_of(c, &ns, "gs-b"), "Ready");
    let gs = c.get_json("gameservers", &ns, "gs-a");
    assert_eq!(gs["metadata"]["labels"]["udp-director.dev/token"], token);
    // The allocation was the proxy's, as its service account, through the API server.
    let made = agones.requests(&ns);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(
        made[0].user,
        "system:serviceaccount:udp-director:udp-director"
    );
    // Traffic goes to the allocated server, before the watch has even caught up or after.
    assert_eq!(through(&p, token, b"hi").as_deref(), Some(&b"Ahi"[..]));
    assert_eq!(
        p.metric(r#"udp_director_allocations_total{result="allocated"}"#),
        1.0
    );
    assert!(p.metric("udp_director_allocation_duration_seconds_count") >= 1.0);

    // Nothing Ready left in the fleet: UnAllocated is no_capacity.
    let answer = p.query(&allocate_query(
        "gameserver",
        &ns,
        r#""fleet":"arena""#,
        None,
    ));
    assert_eq!(answer["code"], "no_capacity", "{answer}");
    assert_eq!(
        p.metric(r#"udp_director_allocations_total{result="no_capacity"}"#),
        1.0
    );
}

#[test]
fn backfill_fills_an_allocated_server_with_room_before_taking_a_ready_one() {
    let Some((c, _agones, ns)) = setup("alloc-backfill") else {
        return;
    };
    let (full, room, ready) = (Echo::tagged(b'F'), Echo::tagged(b'R'), Echo::tagged(b'N'));
    game_server(
        c,
        &ns,
        "gs-full",
        "fleet: arena",
        with_players("Allocated", full.addr, 4, 4),
    );
    game_server(
        c,
        &ns,
        "gs-room",
        "fleet: arena",
        with_players("Allocated", room.addr, 2, 3),
    );
    game_server(
        c,
        &ns,
        "gs-ready",
        "fleet: arena",
        with_players("Ready", ready.addr, 0, 3),
    );
    let config = config(&ns);
    grant_allocation(c, &config);
    let p = c.start_node(&config, &ns, "node-b");
    let q = allocate_query("gameserver-backfill", &ns, r#""fleet":"arena""#, None);
    // gs-room has one slot: the first player fills it, the next one takes the Ready server.
    let first = p.query(&q);
    let token = first["token"].as_str().unwrap_or_else(|| panic!("{first}"));
    assert_eq!(through(&p, token, b"x").as_deref(), Some(&b"Rx"[..]));
    let counters = &c.get_json("gameservers", &ns, "gs-room")["status"]["counters"];
    assert_eq!(counters["players"]["count"], 3, "{counters}");
    let second = p.query(&q);
    let token = second["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{second}"));
    assert_eq!(through(&p, token, b"y").as_deref(), Some(&b"Ny"[..]));
    assert_eq!(state_of(c, &ns, "gs-ready"), "Allocated");
    assert_eq!(
        c.get_json("gameservers", &ns, "gs-full")["status"]["counters"]["players"]["count"],
        4,
        "the full one untouched"
    );
}

#[test]
fn a_retried_query_with_the_same_request_id_gets_the_same_server_not_a_second() {
    let Some((c, agones, ns)) = setup("alloc-retry") else {
        return;
    };
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    game_server(c, &ns, "gs-a", "fleet: arena", status("Ready", a.addr));
    game_server(c, &ns, "gs-b", "fleet: arena", status("Ready", b.addr));
    let config = config(&ns);
    grant_allocation(c, &config);
    let p = c.start_node(&config, &ns, "node-c");
    let q = allocate_query("gameserver", &ns, r#""fleet":"arena""#, Some("match-1"));
    let first = p.query(&q);
    let retry = p.query(&q);
    let (t1, t2) = (
        first["token"].as_str().unwrap_or_else(|| panic!("{first}")),
        retry["token"].as_str().unwrap_or_else(|| panic!("{retry}")),
    );
    assert_ne!(t1, t2, "a fresh token each time");
    let tag1 = through(&p, t1, b"1").unwrap()[0];
    let tag2 = through(&p, t2, b"2").unwrap()[0];
    assert_eq!(tag1, tag2, "the same server");
    assert_eq!(agones.allocations(&ns), 1, "allocated once");
    // Another request id allocates the other server.
    let other = p.query(&allocate_query(
        "gameserver",
        &ns,
        r#""fleet":"arena""#,
        Some("match-2"),
    ));
    let t3 = other["token"].as_str().unwrap_or_else(|| panic!("{other}"));
    assert_ne!(through(&p, t3, b"3").unwrap()[0], tag1);
    assert_eq!(agones.allocations(&ns), 2);
}

#[test]
fn two_proxies_racing_for_the_last_server_one_wins_and_the_other_retries_then_has_no_capacity() {
    let Some((c, agones, ns)) = setup("alloc-race") else {
        return;
    };
    let last = Echo::tagged(b'L');
    game_server(
        c,
        &ns,
        "gs-last",
        "fleet: arena",
        status("Ready", last.addr),
    );
    let config = config(&ns);
    grant_allocation(c, &config);
    let (p1, p2) = (
        c.start_node(&config, &ns, "node-1"),
        c.start_node(&config, &ns, "node-2"),
    );
    // Both read the last Ready server before either writes it.
    agones.set_race_window(&ns, Duration::from_millis(400));
    let q = allocate_query("gameserver", &ns, r#""fleet":"arena""#, None);
    let (a1, a2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| p1.query(&q));
        let h2 = s.spawn(|| p2.query(&q));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    let answers = [&a1, &a2];
    let winners: Vec<&&Value> = answers.iter().filter(|a| a["token"].is_string()).collect();
    assert_eq!(winners.len(), 1, "{a1} {a2}");
    let loser = answers.iter().find(|a| !a["token"].is_string()).unwrap();
    assert_eq!(
        loser["code"], "no_capacity",
        "retried after Contention: {loser}"
    );
    let states: Vec<String> = agones
        .requests(&ns)
        .iter()
        .map(|r| r.state.clone())
        .collect();
    assert!(states.contains(&"Contention".to_string()), "{states:?}");
    assert!(states.contains(&"UnAllocated".to_string()), "{states:?}");
    let contention = p1.metric(r#"udp_director_allocations_total{result="contention"}"#)
        + p2.metric(r#"udp_director_allocations_total{result="contention"}"#);
    assert_eq!(contention, 0.0, "contention was retried, not answered");
}

#[test]
fn a_proxy_without_the_grant_gets_a_clear_error_and_allocates_nothing() {
    let Some((c, agones, ns)) = setup("alloc-rbac") else {
        return;
    };
    let echo = Echo::tagged(b'E');
    game_server(c, &ns, "gs", "fleet: arena", status("Ready", echo.addr));
    // No grant_allocation: the suite's ClusterRole lets it watch, not allocate.
    let p = c.start_node(&config(&ns), &ns, "node-d");
    let started = Instant::now();
    let answer = p.query(&allocate_query(
        "gameserver",
        &ns,
        r#""fleet":"arena""#,
        None,
    ));
    assert_eq!(answer["code"], "allocation_failed", "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("may not create gameserverallocations") && message.contains(&ns),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "a refusal is not retried"
    );
    assert_eq!(state_of(c, &ns, "gs"), "Ready");
    assert!(agones.requests(&ns).is_empty());
    assert_eq!(
        p.metric(r#"udp_director_allocations_total{result="error"}"#),
        1.0
    );
}

#[test]
fn with_the_api_server_unreachable_an_allocation_is_retried_until_its_timeout_then_fails() {
    let Some((c, _agones, ns)) = setup("alloc-down") else {
        return;
    };
    // The proxy's kubeconfig points at a port nothing listens on: every call fails to connect.
    let dead = free_port();
    let kubeconfig = std::fs::read_to_string(c.proxy_kubeconfig())
        .unwrap()
        .replace(
            "https://127.0.0.1:6443",
            &format!("https://127.0.0.1:{dead}"),
        );
    let path = std::env::temp_dir().join(format!("udp-director-dead-{}-{ns}", std::process::id()));
    std::fs::write(&path, kubeconfig).unwrap();
    let p = Proxy::launch(
        &config(&ns),
        "",
        &[
            ("KUBECONFIG", path.as_os_str()),
            ("NODE_NAME", std::ffi::OsStr::new("node-e")),
            ("POD_NAMESPACE", std::ffi::OsStr::new(&ns)),
        ],
    );
    let started = Instant::now();
    let answer = p.query(&allocate_query(
        "gameserver",
        &ns,
        r#""fleet":"arena""#,
        None,
    ));
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    assert_eq!(answer["code"], "allocation_failed", "{answer}");
    // Retried for the mapping's timeoutMs (1500), not given up at the first failure.
    assert!(
        took >= Duration::from_millis(1300) && took < Duration::from_secs(4),
        "{took:?}: {answer}"
    );
    assert_eq!(
        p.metric(r#"udp_director_allocations_total{result="error"}"#),
        1.0
    );
}
