//! Kubernetes-shaped objects into the inventory (control/src/inventory/): the input is tried
//! two ways, both with the same bytes (JSON is YAML, so one corpus feeds both):
//!
//! 1. one object as JSON, as a watch delivers it: `Object::from_value`, then the typed reads a
//!    Forwarder, a Route and a Gateway API object get (`ForwarderObject::from_object`,
//!    `RouteObject::from_object`, `gateway::compile::Model::read` and `plan`);
//! 2. a whole inventory file (`inventory.kind: file`): `parse_objects_checked` with the proxy's spec check, then `Snapshot::build`
//!    with a fixed config's mappings and what a query does with the snapshot (`select::
//!    candidates` for every mapping, `Snapshot::ready_endpoint`, the Gateway API model).
//!
//! Nothing may panic; metadata must be what the object says; an object the file parser accepted
//! must pass the typed read it was checked with.
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use control::config::Config;
use control::inventory::file::parse_objects_checked;
use control::inventory::{Object, Snapshot};
use control::query::Query;
use control::reconcile::forwarder::{ForwarderObject, is_forwarder};
use control::reconcile::gateway::compile::{Model, plan};
use control::reconcile::gateway::is_gateway_api;
use control::reconcile::route::{RouteObject, is_route};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Mappings of every locator kind: direct address + port name, PodIP addresses, a port path, a
/// port list over two data ports, and a Service-based one.
const CONFIG: &str = r#"
dataPorts: [{name: game, port: 7777}, {name: voice, port: 7778}]
inventory: {kind: file, path: inventory.yaml}
resourceQueryMapping:
  gameserver: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}
  gs-podip: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.addresses, addressType: PodIP, portName: default}
  pathport: {group: example.com, version: v2, resource: arenas, kind: BattleArena, addressPath: spec.host, portPath: "spec.ports[0]"}
  pod: {group: "", version: v1, resource: pods, addressPath: status.podIP, ports: [{name: game, portName: game}, {name: voice, portName: voice}]}
  svc: {group: agones.dev, version: v1, resource: gameservers, serviceSelectorLabel: gameserver, serviceTargetPortName: game}
gatewayApi: {controllerName: udp-director.dev/gateway-controller}
"#;

static SETUP: LazyLock<Config> =
    LazyLock::new(|| Config::from_yaml(CONFIG).expect("the fuzz config is valid"));

fuzz_target!(|data: &[u8]| {
    let config = &*SETUP;
    if let Ok(raw) = serde_json::from_slice::<Value>(data) {
        one_object(raw, config);
    }
    file_body(data, config);
});

fn one_object(raw: Value, config: &Config) {
    let Ok(object) = Object::from_value(raw.clone()) else {
        return;
    };
    assert_eq!(
        Some(object.api_version.as_str()),
        raw["apiVersion"].as_str()
    );
    assert_eq!(Some(object.kind.as_str()), raw["kind"].as_str());
    assert_eq!(Some(object.name.as_str()), raw["metadata"]["name"].as_str());
    assert_eq!(object.raw, raw);
    if is_forwarder(&object)
        && let Ok(f) = ForwarderObject::from_object(&object)
    {
        assert!(
            f.listeners().count() >= 1,
            "a valid forwarder listens somewhere"
        );
    }
    if is_route(&object)
        && let Ok(r) = RouteObject::from_object(&object)
    {
        assert_eq!(r.matches.len(), r.spec.rules.len(), "one match per rule");
    }
    if is_gateway_api(&object) {
        gateway(&[Arc::new(object)], config);
    }
}

fn file_body(data: &[u8], config: &Config) {
    let Ok(objects) =
        parse_objects_checked(data, Path::new("inventory.yaml"), &control::spec_check)
    else {
        return;
    };
    for o in &objects {
        // The proxy's file inventory refuses the file when these fail.
        if is_forwarder(o) {
            ForwarderObject::from_object(o).expect("parse_objects checked the Forwarder");
        }
        if is_route(o) {
            RouteObject::from_object(o).expect("parse_objects checked the Route");
        }
    }
    let count = objects.len();
    let snapshot = Snapshot::build(objects, &config.mappings);
    assert!(snapshot.loaded);
    let _ = snapshot.counts();
    for list in snapshot.by_mapping.values() {
        assert!(list.len() <= count);
        assert!(
            list.windows(2)
                .all(|w| (&w[0].namespace, &w[0].name) <= (&w[1].namespace, &w[1].name)),
            "sorted by namespace and name"
        );
    }
    let data_ports = config.data_ports.len();
    for (name, mapping) in &config.mappings {
        let query = Query {
            kind: None,
            resource_type: name.clone(),
            namespace: None,
            label_selector: Default::default(),
            annotation_selector: Default::default(),
            status_query: None,
            allocate: false,
            request_id: None,
        };
        if let Ok(found) =
            control::query::select::candidates(&query, mapping, &snapshot, data_ports)
        {
            for c in found {
                let direct =
                    control::query::select::resolve(mapping, &c.object, &snapshot, data_ports);
                assert!(direct.is_some(), "a candidate resolves on its own too");
            }
        }
    }
    for s in &snapshot.services {
        let _ = snapshot.ready_endpoint(&s.namespace, &s.name, "game");
    }
    gateway(&snapshot.gateway_api, config);
}

fn gateway(objects: &[Arc<Object>], config: &Config) {
    let model = Model::read(objects);
    let controller = config.gateway_controller.as_deref().unwrap_or_default();
    let _ = plan(&model, controller);
}
