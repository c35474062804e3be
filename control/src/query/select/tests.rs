//! Selectors, mapping modes and every load-balancing strategy, on hand-made inventories.

use super::index::QueryIndex;
use super::*;
use crate::config::Config;
use crate::inventory::parse_objects;
use crate::query::Query;

const CONFIG: &str = r#"
inventory: {kind: file, path: x}
dataPorts: [{name: game, port: 7777}, {name: voice, port: 7778}]
resourceQueryMapping:
  gameserver: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}
  gs-podip: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.addresses, addressType: PodIP, portName: default}
  pod: {group: "", version: v1, resource: pods, addressPath: status.podIP, ports: [{name: game, portName: game}, {name: voice, portName: voice}]}
  pathport: {group: "", version: v1, resource: pods, addressPath: status.podIP, portPath: "spec.containers[0].ports[1].containerPort"}
  svc: {group: agones.dev, version: v1, resource: gameservers, serviceSelectorLabel: gs-name, serviceTargetPortName: game}
  dns: {group: "", version: v1, resource: services, addressPath: spec.clusterIP, portName: dns-udp}
"#;

const INVENTORY: &str = r#"
- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {name: a, namespace: ns, labels: {fleet: f, map: dust, players: "3", max: "10"}, annotations: {open: "yes"}}
  status: {state: Ready, address: 10.0.0.1, addresses: [{type: Hostname, address: node1}, {type: PodIP, address: 10.1.0.1}], ports: [{name: default, port: 7001}]}
- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {name: b, namespace: ns, labels: {fleet: f, map: dust, players: "8", max: "10"}, annotations: {open: "no"}}
  status: {state: Allocated, address: 10.0.0.2, ports: [{name: default, port: 7002}]}
- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {name: c, namespace: other, labels: {fleet: f, map: inferno, players: "0", max: "10"}}
  status: {state: Ready, address: 10.0.0.3, ports: [{name: default, port: 7003}]}
- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {name: noaddr, namespace: ns, labels: {fleet: broken}}
  status: {state: Ready, ports: [{name: default, port: 7004}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: ns}
  spec: {containers: [{name: srv, ports: [{name: game, containerPort: 7100}, {name: voice, containerPort: 7101}]}]}
  status: {podIP: 10.2.0.1}
- apiVersion: v1
  kind: Service
  metadata: {name: a-svc, namespace: ns, labels: {gs-name: a}}
  spec: {clusterIP: 10.96.0.10, ports: [{name: game, port: 7777}]}
- apiVersion: v1
  kind: Service
  metadata: {name: c-svc, namespace: other, labels: {gs-name: c}}
  spec: {clusterIP: None, ports: [{name: game, port: 7777, targetPort: 7003}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: c-svc-x1, namespace: other, labels: {kubernetes.io/service-name: c-svc}}
  ports: [{name: game, port: 7003}]
  endpoints: [{addresses: [10.1.0.3], conditions: {ready: true}}]
- apiVersion: v1
  kind: Service
  metadata: {name: kube-dns, namespace: kube-system}
  spec: {clusterIP: 10.96.0.53, ports: [{name: dns-tcp, port: 53, protocol: TCP}, {name: dns-udp, port: 53, protocol: UDP}]}
"#;

fn setup() -> (Config, Snapshot) {
    let config = Config::from_yaml(CONFIG).unwrap();
    let objects = parse_objects(INVENTORY.as_bytes(), "t".as_ref()).unwrap();
    let snap = Snapshot::build(objects, &config.mappings);
    (config, snap)
}

fn query(json: &str) -> Query {
    serde_json::from_str(json).unwrap()
}

fn names(config: &Config, snap: &Snapshot, q: &str) -> Result<Vec<String>, ErrorCode> {
    let q = query(q);
    candidates(&q, &config.mappings[&q.resource_type], snap, 2)
        .map(|c| c.iter().map(|c| c.object.name.clone()).collect())
        .map_err(|e| e.code)
}

#[test]
fn filters_in_order() {
    let (c, s) = setup();
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","namespace":"ns","labelSelector":{"fleet":"f"}}"#
        ),
        Ok(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"}}"#
        )
        .unwrap()
        .len(),
        3
    );
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f","map":"dust"},"statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#
        ),
        Ok(vec!["a".into()])
    );
    assert_eq!(names(&c, &s, r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"},"statusQuery":{"jsonPath":"status.state","expectedValues":["Ready","Allocated"]}}"#).unwrap().len(), 3);
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","annotationSelector":{"open":"no"}}"#
        ),
        Ok(vec!["b".into()])
    );
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","statusQuery":{"jsonPath":"status.ports[0].port","expectedValue":7003}}"#
        ),
        Ok(vec!["c".into()])
    );
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","labelSelector":{"fleet":"nope"}}"#
        ),
        Err(ErrorCode::NoMatch)
    );
    assert_eq!(
        names(
            &c,
            &s,
            r#"{"resourceType":"gameserver","labelSelector":{"fleet":"broken"}}"#
        ),
        Err(ErrorCode::BackendUnresolvable)
    );
}

#[test]
fn direct_mapping_modes() {
    let (c, s) = setup();
    let q = query(
        r#"{"resourceType":"gameserver","namespace":"ns","labelSelector":{"map":"dust"},"statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#,
    );
    let got = candidates(&q, &c.mappings["gameserver"], &s, 2).unwrap();
    let a: SocketAddr = "10.0.0.1:7001".parse().unwrap();
    assert_eq!(
        &*got[0].backend.addrs,
        &[Some(a), Some(a)],
        "single-port mapping serves every data port"
    );

    let q = query(r#"{"resourceType":"gs-podip","namespace":"ns","labelSelector":{"map":"dust"}}"#);
    let got = candidates(&q, &c.mappings["gs-podip"], &s, 2).unwrap();
    assert_eq!(got.len(), 1, "b has no addresses array");
    assert_eq!(
        got[0].backend.addr_for(0),
        Some("10.1.0.1:7001".parse().unwrap())
    );

    let q = query(r#"{"resourceType":"pod"}"#);
    let got = candidates(&q, &c.mappings["pod"], &s, 2).unwrap();
    assert_eq!(
        &*got[0].backend.addrs,
        &[
            Some("10.2.0.1:7100".parse().unwrap()),
            Some("10.2.0.1:7101".parse().unwrap())
        ]
    );
    let q = query(r#"{"resourceType":"pathport"}"#);
    let got = candidates(&q, &c.mappings["pathport"], &s, 2).unwrap();
    assert_eq!(
        got[0].backend.addr_for(0),
        Some("10.2.0.1:7101".parse().unwrap())
    );
}

#[test]
fn service_mapping() {
    let (c, s) = setup();
    let q = query(r#"{"resourceType":"svc","namespace":"ns"}"#);
    let got = candidates(&q, &c.mappings["svc"], &s, 2).unwrap();
    assert_eq!(got.len(), 1, "only a has a Service");
    assert_eq!(got[0].object.name, "a");
    assert_eq!(
        got[0].backend.addr_for(0),
        Some("10.96.0.10:7777".parse().unwrap())
    );
}

#[test]
fn headless_service_resolves_through_endpoint_slices() {
    let (c, s) = setup();
    let q = query(r#"{"resourceType":"svc","namespace":"other"}"#);
    let got = candidates(&q, &c.mappings["svc"], &s, 2).unwrap();
    assert_eq!(got[0].object.name, "c");
    assert_eq!(
        got[0].backend.addr_for(0),
        Some("10.1.0.3:7003".parse().unwrap()),
        "the endpoint's address and the slice's port, not the Service port"
    );
}

#[test]
fn service_ports_by_name() {
    let (c, s) = setup();
    let q = query(r#"{"resourceType":"dns","namespace":"kube-system"}"#);
    let got = candidates(&q, &c.mappings["dns"], &s, 2).unwrap();
    assert_eq!(
        got[0].backend.addr_for(0),
        Some("10.96.0.53:53".parse().unwrap())
    );
}

#[test]
fn backend_ids_are_stable_and_follow_addresses() {
    let (c, s) = setup();
    let q =
        query(r#"{"resourceType":"gameserver","namespace":"ns","labelSelector":{"fleet":"f"}}"#);
    let one = candidates(&q, &c.mappings["gameserver"], &s, 2).unwrap();
    let two = candidates(&q, &c.mappings["gameserver"], &s, 2).unwrap();
    assert_eq!(one[0].backend.id, two[0].backend.id);
    assert_ne!(one[0].backend.id, one[1].backend.id);
    let moved = INVENTORY.replace("address: 10.0.0.1,", "address: 10.0.0.9,");
    let s2 = Snapshot::build(
        parse_objects(moved.as_bytes(), "t".as_ref()).unwrap(),
        &c.mappings,
    );
    let three = candidates(&q, &c.mappings["gameserver"], &s2, 2).unwrap();
    assert_ne!(
        one[0].backend.id, three[0].backend.id,
        "new address, new backend"
    );
    // A mapping that reads one data port fewer (as a reload may change it) keeps the ids.
    let mut fewer = c.mappings["gameserver"].clone();
    if let crate::config::Locator::Direct { ports, .. } = &mut fewer.locator {
        ports.truncate(1);
    }
    let four = candidates(&q, &fewer, &s, 2).unwrap();
    assert_eq!(
        one[0].backend.id, four[0].backend.id,
        "same IP, same backend"
    );
}

fn three_candidates() -> Vec<Candidate> {
    let (c, s) = setup();
    let q = query(r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"}}"#);
    candidates(&q, &c.mappings["gameserver"], &s, 2).unwrap()
}

#[test]
fn least_sessions_picks_the_least_loaded() {
    let cands = three_candidates();
    let loads = [5u64, 2, 7];
    let load = |id| loads[cands.iter().position(|c| c.backend.id == id).unwrap()];
    assert_eq!(
        choose(&LoadBalancing::LeastSessions, &cands, load, &mut 0).unwrap(),
        1
    );
    // Ties go to the first in name order.
    assert_eq!(
        choose(&LoadBalancing::LeastSessions, &cands, |_| 0, &mut 0).unwrap(),
        0
    );
}

#[test]
fn round_robin_rotates() {
    let cands = three_candidates();
    let mut rotation = 0;
    let picks: Vec<usize> = (0..6)
        .map(|_| choose(&LoadBalancing::RoundRobin, &cands, |_| 0, &mut rotation).unwrap())
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn random_covers_every_candidate() {
    let cands = three_candidates();
    let mut seen = [false; 3];
    for _ in 0..200 {
        seen[choose(&LoadBalancing::Random, &cands, |_| 0, &mut 0).unwrap()] = true;
    }
    assert_eq!(seen, [true; 3]);
}

#[test]
fn label_arithmetic() {
    // Candidates in name order: a (ns, 3/10), b (ns, 8/10), c (other, 0/10).
    let mut cands = three_candidates();
    cands.sort_by(|x, y| x.object.name.cmp(&y.object.name));
    let lb = |overlap| LoadBalancing::LabelArithmetic {
        current_label: "players".into(),
        max_label: "max".into(),
        overlap,
    };
    // Most available wins: c has 10.
    assert_eq!(choose(&lb(0), &cands, |_| 0, &mut 0).unwrap(), 2);
    // Local sessions and grants count against capacity: c with 8 local has 2 left, a has 7.
    let c_id = cands[2].backend.id;
    assert_eq!(
        choose(&lb(0), &cands, |id| if id == c_id { 8 } else { 0 }, &mut 0).unwrap(),
        0
    );
    // Overlap removes head-room everywhere: with 10, nobody has capacity.
    let err = choose(&lb(10), &cands, |_| 0, &mut 0).unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    // Objects without the labels are not eligible.
    let lb_missing = LoadBalancing::LabelArithmetic {
        current_label: "nope".into(),
        max_label: "max".into(),
        overlap: 0,
    };
    assert_eq!(
        choose(&lb_missing, &cands, |_| 0, &mut 0).unwrap_err().code,
        ErrorCode::NoCapacity
    );
}

#[test]
fn one_index_per_snapshot_answers_like_a_scan_and_keeps_few_status_paths() {
    let (config, snap) = setup();
    let index = QueryIndex::build(&snap, &config.mappings, 2);
    let queries = [
        r#"{"resourceType":"gameserver"}"#,
        r#"{"resourceType":"gameserver","namespace":"starx"}"#,
        r#"{"resourceType":"gameserver","namespace":"nowhere"}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"agones.dev/fleet":"m-tutorial"}}"#,
        r#"{"resourceType":"gameserver","statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#,
        // Narrowed by one list, checked against the others: the namespace, every other label.
        r#"{"resourceType":"gameserver","namespace":"other","labelSelector":{"fleet":"f"}}"#,
        r#"{"resourceType":"gameserver","namespace":"ns","labelSelector":{"map":"inferno"}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f","map":"dust"}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f","map":"dust","players":"8"}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"map":"inferno","fleet":"broken"}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"},"statusQuery":{"jsonPath":"status.state","expectedValues":["Ready","Allocated"]}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"},"statusQuery":{"jsonPath":"status.state","expectedValue":"Nowhere"}}"#,
        r#"{"resourceType":"gameserver","labelSelector":{"fleet":"f"},"annotationSelector":{"open":"yes"}}"#,
    ];
    // The reference: every object of the type, filtered in order, no index.
    let scan_of = |q: &Query| -> Vec<String> {
        let status = q.status_query.as_ref().map(|sq| {
            (
                crate::query::jsonpath::Path::parse(&sq.json_path).unwrap(),
                sq.expected(),
            )
        });
        let mapping = &config.mappings[&q.resource_type];
        snap.by_mapping[&q.resource_type]
            .iter()
            .filter(|o| q.namespace.as_ref().is_none_or(|ns| &o.namespace == ns))
            .filter(|o| {
                q.label_selector
                    .iter()
                    .all(|(k, v)| o.labels.get(k) == Some(v))
            })
            .filter(|o| {
                status.as_ref().is_none_or(|(p, expected)| {
                    p.get_string(&o.raw).is_some_and(|v| expected.contains(&v))
                })
            })
            .filter(|o| {
                q.annotation_selector
                    .iter()
                    .all(|(k, v)| o.annotations.get(k) == Some(v))
            })
            .filter(|o| resolve(mapping, o, &snap, 2).is_some())
            .map(|o| o.name.clone())
            .collect()
    };
    for text in queries {
        let q = query(text);
        let scan = names(&config, &snap, text);
        if let Ok(found) = &scan {
            assert_eq!(
                found,
                &scan_of(&q),
                "{text}: the index against a plain scan"
            );
        } else {
            assert!(scan_of(&q).is_empty(), "{text}");
        }
        let indexed = matching(&q, index.mapping("gameserver").unwrap())
            .map(|c| c.iter().map(|c| c.object.name.clone()).collect::<Vec<_>>())
            .map_err(|e| e.code);
        assert_eq!(indexed, scan, "{text}");
    }
    // The same index answers again from its kept status values; a client cannot make it keep
    // more than a few paths.
    let m = index.mapping("gameserver").unwrap();
    for i in 0..40 {
        let path = crate::query::jsonpath::Path::parse(&format!("status.x{i}")).unwrap();
        let kept = m.status_values(&path);
        assert_eq!(kept.is_some(), i < 15, "path {i}");
    }
}

#[test]
fn a_warm_index_has_the_status_paths_asked_of_the_last_one_read_up_front() {
    let (config, snap) = setup();
    let first = QueryIndex::build(&snap, &config.mappings, 2);
    let state = crate::query::jsonpath::Path::parse("status.state").unwrap();
    let asked = first.mapping("gameserver").unwrap().status_values(&state);
    let cold = QueryIndex::build(&snap, &config.mappings, 2);
    assert!(
        cold.mapping("gameserver")
            .unwrap()
            .status_paths()
            .is_empty()
    );
    let warm = QueryIndex::build_warm(&snap, &config.mappings, 2, Some(&first));
    let m = warm.mapping("gameserver").unwrap();
    assert_eq!(m.status_paths(), vec![state.clone()]);
    // The values are those of the new snapshot's objects, read before any query asks.
    assert_eq!(m.status_values(&state), asked);
    let q = query(
        r#"{"resourceType":"gameserver","statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#,
    );
    assert_eq!(
        matching(&q, m).map(|c| c.len()).map_err(|e| e.code),
        matching(&q, first.mapping("gameserver").unwrap())
            .map(|c| c.len())
            .map_err(|e| e.code)
    );
}
