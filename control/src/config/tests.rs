//! One test per rejection rule, plus the defaults and aliases.

use super::*;

const MINIMAL: &str = r#"
inventory: {kind: file, path: inv.yaml}
resourceQueryMapping:
  gameserver: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}
"#;

fn err(yaml: &str) -> String {
    Config::from_yaml(yaml).unwrap_err().to_string()
}

fn with(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

#[test]
fn defaults() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.query_port, 9000);
    assert_eq!(c.admin_port, 9090);
    assert_eq!(c.data_ports.len(), 1);
    assert_eq!(c.data_ports[0].port, 7777);
    assert_eq!(c.data_ports[0].name, "default");
    assert_eq!(c.token_ttl, Duration::from_secs(30));
    assert_eq!(c.session_timeout, Duration::from_secs(300));
    assert_eq!(c.query_idle_timeout, Duration::from_secs(10));
    assert_eq!(c.max_query_connections, 1024);
    assert_eq!(c.control_magic, b"\xFF\xFF\xFF\xFFRESET");
    assert_eq!(c.load_balancing, LoadBalancing::LeastSessions);
    assert_eq!(c.bind_address, IpAddr::from([0, 0, 0, 0]));
    assert!(matches!(c.inventory, InventoryConfig::File { .. }));
    assert_eq!(c.affinity, dataplane::WorkerAffinity::None);
    assert_eq!(c.busy_poll, Duration::ZERO);
    assert!(err(&with("busyPollMicros: 20000\n")).contains("busyPollMicros"));
    let c = Config::from_yaml(&with("busyPollMicros: 50\n")).unwrap();
    assert_eq!(c.dataplane().busy_poll, Duration::from_micros(50));
}

#[test]
fn no_inventory_means_kubernetes() {
    let c = Config::from_yaml("resourceQueryMapping: {}").unwrap();
    assert!(matches!(
        c.inventory,
        InventoryConfig::Kubernetes { ref namespaces, label_selector: None } if namespaces.is_empty()
    ));
}

#[test]
fn token_ttl_alias() {
    let c = Config::from_yaml(&with("tokenTTLSeconds: 12\n")).unwrap();
    assert_eq!(c.token_ttl, Duration::from_secs(12));
    let c = Config::from_yaml(&with("tokenTtlSeconds: 13\n")).unwrap();
    assert_eq!(c.token_ttl, Duration::from_secs(13));
}

#[test]
fn unknown_keys_are_named() {
    let e = err(&with("sesionTimeoutSeconds: 3\n"));
    assert!(e.contains("sesionTimeoutSeconds"), "{e}");
    let e = err(r#"
resourceQueryMapping:
  gs: {group: a, version: v1, resource: gs, adressPath: x, portName: p}
"#);
    assert!(
        e.contains("adressPath") && e.contains("resourceQueryMapping"),
        "{e}"
    );
}

#[test]
fn wrong_types_are_named() {
    let e = err(&with("queryPort: lots\n"));
    assert!(e.contains("queryPort"), "{e}");
    let e = err(&with("dataPort: 70000\n"));
    assert!(e.contains("dataPort"), "{e}");
}

#[test]
fn each_rejection_names_its_key() {
    let cases = [
        ("bindAddress: not-an-ip\n", "bindAddress"),
        ("tokenTtlSeconds: 0\n", "tokenTtlSeconds"),
        ("sessionTimeoutSeconds: 0\n", "sessionTimeoutSeconds"),
        ("queryIdleTimeoutSeconds: 0\n", "queryIdleTimeoutSeconds"),
        ("maxQueryConnections: 0\n", "maxQueryConnections"),
        ("maxSessions: 0\n", "maxSessions"),
        ("maxSessionsPerIp: 0\n", "maxSessionsPerIp"),
        ("controlPacketMagicBytes: FFF\n", "controlPacketMagicBytes"),
        ("controlPacketMagicBytes: ZZZZ\n", "controlPacketMagicBytes"),
        ("workers: 0\n", "workers"),
        ("cpuAffinity: sometimes\n", "cpuAffinity"),
        ("cpuAffinity: []\n", "cpuAffinity"),
        ("socketBufferBytes: 10\n", "socketBufferBytes"),
        ("drainSeconds: 99999\n", "drainSeconds"),
        (
            "dataPort: 1\ndataPorts: [{name: a, port: 2}]\n",
            "dataPorts",
        ),
        (
            "dataPorts: [{name: a, port: 2}, {name: a, port: 3}]\n",
            "dataPorts[1].name",
        ),
        (
            "dataPorts: [{name: a, port: 2}, {name: b, port: 2}]\n",
            "dataPorts[1].port",
        ),
        (
            "dataPorts: [{name: a, port: 2, protocol: sctp}]\n",
            "dataPorts[0].protocol",
        ),
        ("dataPorts: [{name: '', port: 2}]\n", "dataPorts[0].name"),
        ("loadBalancing: {type: fastest}\n", "loadBalancing.type"),
        (
            "loadBalancing: {type: labelArithmetic, maxLabel: m}\n",
            "loadBalancing.currentLabel",
        ),
        (
            "loadBalancing: {type: roundRobin, overlap: 1}\n",
            "loadBalancing",
        ),
        (
            "defaultEndpoint: {resourceType: pod}\n",
            "defaultEndpoint.resourceType",
        ),
        (
            "defaultEndpoint: {resourceType: gameserver, statusQuery: {jsonPath: a}}\n",
            "defaultEndpoint",
        ),
    ];
    for (extra, key) in cases {
        let e = err(&with(extra));
        assert!(e.contains(key), "{extra:?} should name {key}: {e}");
    }
}

#[test]
fn inventory_rules() {
    assert!(err("inventory: {kind: file}\n").contains("inventory.path"));
    assert!(err("inventory: {kind: etcd}\n").contains("inventory.kind"));
    assert!(err("inventory: {kind: kubernetes, path: x}\n").contains("inventory.path"));
    assert!(
        err("inventory: {kind: file, path: x, pollIntervalMillis: 1}\n")
            .contains("inventory.pollIntervalMillis")
    );
    assert!(
        err("inventory: {kind: file, path: x, watchNamespaces: [a]}\n")
            .contains("inventory.watchNamespaces")
    );
    assert!(
        err("inventory: {kind: kubernetes, watchNamespaces: [ok, Not_OK]}\n")
            .contains("inventory.watchNamespaces[1]")
    );
    assert!(
        err("inventory: {kind: kubernetes, labelSelector: ' '}\n")
            .contains("inventory.labelSelector")
    );
    let c = Config::from_yaml(
        "inventory: {kind: kubernetes, watchNamespaces: [a, b], labelSelector: 'fleet=x'}\n",
    )
    .unwrap();
    assert!(matches!(
        c.inventory,
        InventoryConfig::Kubernetes { ref namespaces, label_selector: Some(ref l) }
            if namespaces == &["a", "b"] && l == "fleet=x"
    ));
}

#[test]
fn mapping_rules() {
    let base = "resourceQueryMapping:\n  gs: ";
    let cases = [
        (
            "{group: a, version: v1, resource: gs}",
            "resourceQueryMapping.gs",
        ),
        (
            "{group: a, version: '', resource: gs, addressPath: x, portName: p}",
            "resourceQueryMapping.gs.version",
        ),
        (
            "{group: a, version: v1, resource: gs, addressPath: x}",
            "resourceQueryMapping.gs",
        ),
        (
            "{group: a, version: v1, resource: gs, portName: p}",
            "resourceQueryMapping.gs.addressPath",
        ),
        (
            "{group: a, version: v1, resource: gs, addressPath: x, portName: p, portPath: q}",
            "resourceQueryMapping.gs",
        ),
        (
            "{group: a, version: v1, resource: gs, addressPath: x, portName: p, serviceSelectorLabel: l}",
            "resourceQueryMapping.gs",
        ),
        (
            "{group: a, version: v1, resource: gs, serviceSelectorLabel: l}",
            "serviceTargetPortName",
        ),
        (
            "{group: a, version: v1, resource: gs, addressPath: x, ports: [{name: voice, portName: v}]}",
            "resourceQueryMapping.gs.ports[0].name",
        ),
        (
            "{group: a, version: v1, resource: gs, addressPath: x, ports: []}",
            "resourceQueryMapping.gs.ports",
        ),
    ];
    for (m, key) in cases {
        let e = err(&format!("{base}{m}\n"));
        assert!(e.contains(key), "{m} should name {key}: {e}");
    }
}

#[test]
fn multi_port_mapping_indexes_data_ports() {
    let c = Config::from_yaml(
        r#"
dataPorts: [{name: game, port: 7777}, {name: voice, port: 7778, protocol: udp}]
resourceQueryMapping:
  pod:
    group: ""
    version: v1
    resource: pods
    addressPath: status.podIP
    ports: [{name: voice, portName: voip}, {name: game, portPath: spec.gamePort}]
"#,
    )
    .unwrap();
    let Locator::Direct { ports, .. } = &c.mappings["pod"].locator else {
        panic!("direct");
    };
    assert_eq!(
        ports,
        &vec![
            (1, PortSource::Name("voip".into())),
            (0, PortSource::Path("spec.gamePort".into()))
        ]
    );
    assert_eq!(c.mappings["pod"].api_version(), "v1");
}

#[test]
fn affinity_forms() {
    let c = Config::from_yaml(&with("cpuAffinity: auto\n")).unwrap();
    assert_eq!(c.affinity, dataplane::WorkerAffinity::Auto);
    let c = Config::from_yaml(&with("cpuAffinity: [2, 3]\nworkers: 2\n")).unwrap();
    assert_eq!(c.affinity, dataplane::WorkerAffinity::Cores(vec![2, 3]));
    assert_eq!(c.workers.get(), 2);
}

#[test]
fn tcp_data_ports_are_refused_clearly() {
    let e = err(&with(
        "dataPorts: [{name: a, port: 2}, {name: t, port: 3, protocol: tcp}]\n",
    ));
    assert!(e.contains("dataPorts") && e.contains("TCP"), "{e}");
}

#[test]
fn example_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".yaml") && !name.contains("inventory") {
            Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen += 1;
        }
    }
    assert!(seen >= 1);
}
