//! The reconciler over a real data plane on loopback: what a change costs (how many forwarders
//! it re-plans, how many objects it reads), driven pass by pass without the run loop.

use std::collections::BTreeMap;
use std::net::UdpSocket;

use super::*;
use crate::inventory::{Object, Versions};

const CONFIG: &str = "bindAddress: 127.0.0.1\nqueryPort: 0\ndataPort: 0\nadminPort: 0\n\
                      workers: 1\ninventory: {kind: file, path: inv.yaml}\n\
                      resourceQueryMapping: {}\nforwarders: {namespace: games}\n";

/// A Forwarder listening on UDP `listen`, to 127.0.0.1:`target`; `extra` goes into the object
/// (a status, say).
fn forwarder(name: &str, created: &str, listen: u16, target: u16, extra: &str) -> Object {
    let yaml = format!(
        "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: {name}, namespace: games, \
         creationTimestamp: \"{created}\", resourceVersion: \"{created}-{}\"}}\n\
         spec: {{udp: {{listenPort: {listen}, targetHost: 127.0.0.1, targetPort: {target}}}}}\n\
         {extra}",
        extra.len()
    );
    Object::from_value(serde_yaml::from_str(&yaml).unwrap()).unwrap()
}

/// `previous` with `change` made, versioned as the inventory would.
fn next(previous: &Snapshot, change: impl FnOnce(&mut Snapshot)) -> Snapshot {
    let mut s = previous.clone();
    change(&mut s);
    s.versions = Versions::next(previous, &s);
    s
}

/// UDP ports free just now, each still held by the returned socket.
fn free_ports(n: usize) -> Vec<(u16, UdpSocket)> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            (s.local_addr().unwrap().port(), s)
        })
        .collect()
}

fn view(r: &Reconciler, name: &str) -> (bool, Option<String>) {
    let table = r.table.lock();
    let v = &table[name];
    (v.ready, v.message.clone())
}

#[test]
fn a_pass_costs_what_changed_and_only_what_waits_is_retried() {
    let config = Config::from_yaml(CONFIG).unwrap();
    let plane = dataplane::DataPlane::start(config.dataplane()).unwrap();
    let mut r = Reconciler::new(&config, plane.controller(), Vec::new(), None).unwrap();
    let mut ports = free_ports(4);
    // Ports 0..2 are released for the forwarders; port 3 stays held by another process.
    let [p0, p1, p2] = [0, 1, 2].map(|i| ports[i].0);
    let (blocked, blocker) = ports.pop().unwrap();
    ports.clear();
    let target = 9;
    let now = Instant::now();
    let mut dirty = Dirty::default();

    let first = Snapshot::build(
        vec![
            forwarder("a", "1", p0, target, ""),
            forwarder("b", "2", p1, target, ""),
            forwarder("c", "3", p2, target, ""),
        ],
        &BTreeMap::new(),
    );
    let first = next(&Snapshot::default(), |s| *s = first);
    r.step(&first, &mut dirty, now);
    assert_eq!((r.replanned, r.parses.reads()), (3, 3));
    for name in ["a", "b", "c"] {
        assert_eq!(view(&r, name), (true, None), "{name}");
    }
    assert!(r.waiting.is_empty());

    // A GameServer moves: nothing the forwarders read did.
    let gameserver = Object::from_value(serde_json::json!({
        "apiVersion": "agones.dev/v1", "kind": "GameServer",
        "metadata": {"name": "gs", "namespace": "games"},
    }))
    .unwrap();
    let fleet = next(&first, |s| {
        s.by_mapping
            .insert("gameserver".into(), vec![Arc::new(gameserver)]);
    });
    assert_ne!(fleet.versions, first.versions);
    r.step(&fleet, &mut dirty, now);
    assert_eq!(
        (r.replanned, r.parses.reads()),
        (3, 3),
        "nothing re-planned"
    );

    // A status written to `b` (a new object, a new resourceVersion, the same spec), or its
    // labels changed (which moves the Forwarders' version): read nothing, re-plan nothing.
    let status = next(&fleet, |s| {
        s.forwarders[1] = Arc::new(forwarder(
            "b",
            "2",
            p1,
            target,
            "status: {instances: [{node: n, ready: true}]}",
        ));
    });
    r.step(&status, &mut dirty, now);
    let labelled = next(&status, |s| {
        let mut b = (*s.forwarders[1]).clone();
        b.raw["metadata"]["labels"] = serde_json::json!({"team": "blue"});
        s.forwarders[1] = Arc::new(b);
    });
    assert_ne!(labelled.versions.forwarders, status.versions.forwarders);
    r.step(&labelled, &mut dirty, now);
    assert_eq!(
        (r.replanned, r.parses.reads()),
        (3, 3),
        "a status is no change"
    );

    // `c` is retargeted; `d` asks for `a`'s port (younger: refused) and `e` for a port another
    // process holds: each read once and re-planned once, the others left alone.
    let changed = next(&labelled, |s| {
        s.forwarders[2] = Arc::new(forwarder("c", "3", p2, target + 1, ""));
        s.forwarders
            .push(Arc::new(forwarder("d", "4", p0, target, "")));
        s.forwarders
            .push(Arc::new(forwarder("e", "5", blocked, target, "")));
    });
    r.step(&changed, &mut dirty, now);
    assert_eq!((r.replanned, r.parses.reads()), (6, 6));
    assert_eq!(view(&r, "c"), (true, None));
    let (ready, why) = view(&r, "d");
    assert!(!ready && why.unwrap().contains("held by forwarder a"));
    assert!(!view(&r, "e").0, "another process holds its port");
    assert_eq!(
        r.waiting.keys().collect::<Vec<_>>(),
        ["e"],
        "a port the rule refuses waits for the objects, not for time"
    );

    // Once a second, `e` alone is tried again, until its port is free.
    for _ in 0..2 {
        r.tick(&mut dirty, now);
        r.step(&changed, &mut dirty, now);
    }
    assert_eq!(r.replanned, 8, "e, twice");
    drop(blocker);
    r.tick(&mut dirty, now);
    r.step(&changed, &mut dirty, now);
    assert_eq!(view(&r, "e"), (true, None));
    assert!(r.waiting.is_empty());
    r.tick(&mut dirty, now);
    r.step(&changed, &mut dirty, now);
    assert_eq!(r.replanned, 9, "nothing waits: a tick costs nothing");

    // `a` goes: `d` takes its port (both re-planned), `a`'s view goes once its counters fold.
    let gone = next(&changed, |s| {
        s.forwarders.remove(0);
    });
    r.step(&gone, &mut dirty, now);
    assert_eq!(r.replanned, 11);
    assert!(r.retiring);
    let (ready, why) = view(&r, "d");
    // The closing listener may still hold the port a moment: then it is tried again soon.
    if !ready {
        assert_eq!(r.waiting.get("d"), Some(&true), "{why:?}");
    }
    let later = now + RETIRE_AFTER;
    for _ in 0..100 {
        r.tick(&mut dirty, later);
        r.step(&gone, &mut dirty, later);
        if r.waiting.is_empty() {
            break;
        }
        std::thread::sleep(RETRY_SOON);
    }
    assert_eq!(view(&r, "d"), (true, None));
    assert!(!r.retiring && !r.table.lock().contains_key("a"));

    plane.controller().shutdown();
    plane.join().unwrap();
}
