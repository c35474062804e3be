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
    assert_eq!(c.watchdog, Duration::from_secs(10));
    let c = Config::from_yaml(&with("watchdogSeconds: 1\n")).unwrap();
    assert_eq!(c.watchdog, Duration::from_secs(1));
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
        // Found by the `config` fuzz target: a non-ASCII digit used to panic on a slice.
        (
            "controlPacketMagicBytes: \"0é0\"\n",
            "controlPacketMagicBytes",
        ),
        ("workers: 0\n", "workers"),
        ("cpuAffinity: sometimes\n", "cpuAffinity"),
        ("cpuAffinity: []\n", "cpuAffinity"),
        ("socketBufferBytes: 10\n", "socketBufferBytes"),
        ("drainSeconds: 99999\n", "drainSeconds"),
        ("watchdogSeconds: 0\n", "watchdogSeconds"),
        ("watchdogSeconds: 3601\n", "watchdogSeconds"),
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
            (
                0,
                PortSource::Path(JsonPath::parse("spec.gamePort").unwrap())
            )
        ]
    );
    assert_eq!(c.mappings["pod"].api_version(), "v1");
}

#[test]
fn affinity_forms() {
    let c = Config::from_yaml(&with("cpuAffinity: auto\n")).unwrap();
    assert_eq!(c.affinity, dataplane::WorkerAffinity::Auto);
    let first = dataplane::available_cores()[0];
    let c = Config::from_yaml(&with(&format!("cpuAffinity: [{first}]\nworkers: 2\n"))).unwrap();
    assert_eq!(c.affinity, dataplane::WorkerAffinity::Cores(vec![first]));
    assert_eq!(c.workers.get(), 2);
    let c = Config::from_yaml_in(&with("cpuAffinity: [2, 3]\n"), &on_cores(&[0, 1, 2, 3])).unwrap();
    assert_eq!(c.affinity, dataplane::WorkerAffinity::Cores(vec![2, 3]));
}

/// This process's environment, on a machine with `cores`.
fn on_cores(cores: &[usize]) -> Environment {
    Environment {
        cores: cores.to_vec(),
        ..Environment::of_this_process()
    }
}

#[test]
fn affinity_names_cores_this_machine_lacks() {
    let e = Config::from_yaml_in(&with("cpuAffinity: [1, 99, 100]\n"), &on_cores(&[0, 1]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cpuAffinity") && e.contains("99, 100") && e.contains("available: 0, 1"),
        "{e}"
    );
    let e = err(&with("cpuAffinity: [99999]\n"));
    assert!(e.contains("cpuAffinity") && e.contains("99999"), "{e}");
}

#[test]
fn workers_are_bounded() {
    let e = err(&with("workers: 10000\n"));
    assert!(e.contains("workers") && e.contains("1024"), "{e}");
    assert_eq!(
        Config::from_yaml(&with("workers: 1024\n"))
            .unwrap()
            .workers
            .get(),
        1024
    );
}

#[test]
fn query_and_admin_ports_differ() {
    let e = err(&with("queryPort: 9100\nadminPort: 9100\n"));
    assert!(e.contains("adminPort") && e.contains("queryPort"), "{e}");
    // Port 0 twice is two free ports, not a clash.
    Config::from_yaml(&with("queryPort: 0\nadminPort: 0\n")).unwrap();
}

#[test]
fn paths_are_parsed_at_load() {
    let e = err(r#"
resourceQueryMapping:
  gs: {group: a, version: v1, resource: gs, addressPath: "status..address", portName: p}
"#);
    assert!(e.contains("resourceQueryMapping.gs.addressPath"), "{e}");
    let e = err(r#"
resourceQueryMapping:
  gs: {group: a, version: v1, resource: gs, addressPath: status.address, portPath: "spec.ports[x]"}
"#);
    assert!(e.contains("resourceQueryMapping.gs.portPath"), "{e}");
    let e = err(r#"
dataPorts: [{name: a, port: 1}]
resourceQueryMapping:
  gs: {group: a, version: v1, resource: gs, addressPath: status.address, ports: [{name: a, portPath: "p[1"}]}
"#);
    assert!(
        e.contains("resourceQueryMapping.gs.ports[0].portPath"),
        "{e}"
    );
}

#[test]
fn sessions_api_and_query_limits() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.sessions_api, SessionsApiAuth::Loopback);
    assert_eq!(c.max_query_connections_per_ip, 32);
    let c = Config::from_yaml(&with(
        "sessionsApi: {auth: kubernetes}\nmaxQueryConnectionsPerIp: 4\n",
    ))
    .unwrap();
    assert_eq!(c.sessions_api, SessionsApiAuth::Kubernetes);
    assert_eq!(c.sessions_api_audiences, ["udp-director"]);
    assert_eq!(c.max_query_connections_per_ip, 4);
    let c = Config::from_yaml(&with(
        "sessionsApi: {auth: kubernetes, audiences: [a, b]}\n",
    ))
    .unwrap();
    assert_eq!(c.sessions_api_audiences, ["a", "b"]);
    let c = Config::from_yaml(&with("sessionsApi: {auth: kubernetes, audiences: []}\n")).unwrap();
    assert!(
        c.sessions_api_audiences.is_empty(),
        "the API server's own audience"
    );
    assert!(
        err(&with("sessionsApi: {auth: loopback, audiences: [a]}\n"))
            .contains("sessionsApi.audiences")
    );
    assert!(err(&with("sessionsApi: {auth: open}\n")).contains("sessionsApi.auth"));
    assert!(err(&with("sessionsApi: {}\n")).contains("auth"));
    assert!(err(&with("maxQueryConnectionsPerIp: 0\n")).contains("maxQueryConnectionsPerIp"));
}

#[test]
fn inventory_max_bytes() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert!(matches!(
        c.inventory,
        InventoryConfig::File {
            max_bytes: DEFAULT_INVENTORY_MAX_BYTES,
            ..
        }
    ));
    let c = Config::from_yaml(
        "inventory: {kind: file, path: x, maxBytes: 1000}\nresourceQueryMapping: {}",
    )
    .unwrap();
    assert!(matches!(
        c.inventory,
        InventoryConfig::File {
            max_bytes: 1000,
            ..
        }
    ));
    let e = err("inventory: {kind: file, path: x, maxBytes: 0}\nresourceQueryMapping: {}");
    assert!(e.contains("inventory.maxBytes"), "{e}");
    let e = err("inventory: {kind: kubernetes, maxBytes: 10}\nresourceQueryMapping: {}");
    assert!(e.contains("inventory.maxBytes"), "{e}");
}

#[test]
fn tcp_data_ports_keep_their_index_among_all_data_ports() {
    // The TCP port sits between two UDP ones: a mapping's port index must be its place among
    // *all* data ports, which is also its listener id in the data plane.
    let c = Config::from_yaml(&with(
        "dataPorts: [{name: game, port: 2}, {name: chat, port: 3, protocol: tcp}, \
         {name: voice, port: 4, protocol: udp}]\ntcpTokenTimeoutSeconds: 3\n",
    ))
    .unwrap();
    let dp = c.dataplane();
    let got: Vec<(&str, u16, Protocol)> = dp
        .data_ports
        .iter()
        .map(|p| (p.name.as_str(), p.bind.port(), p.transport))
        .collect();
    assert_eq!(
        got,
        [
            ("game", 2, Protocol::Udp),
            ("chat", 3, Protocol::Tcp),
            ("voice", 4, Protocol::Udp)
        ]
    );
    assert_eq!(dp.tcp_token_timeout, Duration::from_secs(3));
    assert_eq!(
        Config::from_yaml(MINIMAL).unwrap().tcp_token_timeout,
        Duration::from_secs(10)
    );
    let e = err(&with("tcpTokenTimeoutSeconds: 0\n"));
    assert!(e.contains("tcpTokenTimeoutSeconds"), "{e}");
    let e = err(&with("dataPorts: [{name: t, port: 3, protocol: sctp}]\n"));
    assert!(e.contains("dataPorts[0].protocol"), "{e}");
    let e = err(&with("dataPorts: []\n"));
    assert!(e.contains("dataPorts"), "{e}");
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

#[test]
fn forwarders_are_off_unless_configured_and_every_key_is_checked() {
    assert_eq!(Config::from_yaml(MINIMAL).unwrap().forwarders, None);
    let in_namespace = |ns: Option<&str>| {
        let env = Environment {
            pod_namespace: ns.map(str::to_string),
            ..Environment::of_this_process()
        };
        let c = Config::from_yaml_in(&with("forwarders: {}\n"), &env).unwrap();
        (c.forwarders.unwrap(), c.status_lease)
    };
    let (f, lease) = in_namespace(Some("games"));
    assert_eq!(
        f.namespace, "games",
        "the proxy's own namespace (POD_NAMESPACE)"
    );
    assert_eq!(lease.namespace, "games", "the status Lease's too");
    assert_eq!(lease.name, DEFAULT_STATUS_LEASE);
    assert_eq!(f.resolve_interval, Duration::from_secs(30));
    assert_eq!((f.udp_service, f.tcp_service), (None, None));
    let (f, lease) = in_namespace(None);
    assert_eq!(f.namespace, DEFAULT_FORWARDERS_NAMESPACE);
    assert_eq!(lease.namespace, DEFAULT_FORWARDERS_NAMESPACE);
    let c = Config::from_yaml(&with(
        "forwarders: {namespace: edge, servicePorts: {udp: game-lb, tcp: game-lb}, resolveIntervalSeconds: 5}\n",
    ))
    .unwrap();
    let f = c.forwarders.unwrap();
    assert_eq!(f.namespace, "edge");
    assert_eq!(f.udp_service.as_deref(), Some("game-lb"));
    assert_eq!(f.tcp_service.as_deref(), Some("game-lb"));
    assert_eq!(f.resolve_interval, Duration::from_secs(5));
    assert!(err(&with("forwarders: {namespace: Edge}\n")).contains("forwarders.namespace"));
    assert!(
        err(&with("forwarders: {servicePorts: {udp: a.b}}\n"))
            .contains("forwarders.servicePorts.udp")
    );
    assert!(
        err(&with("forwarders: {resolveIntervalSeconds: 0}\n"))
            .contains("forwarders.resolveIntervalSeconds")
    );
    assert!(err(&with("forwarders: {servicePorts: {sctp: x}}\n")).contains("sctp"));
}

#[test]
fn rate_limits_are_off_unless_configured_and_checked() {
    assert_eq!(Config::from_yaml(MINIMAL).unwrap().rate_limit, None);
    let c = Config::from_yaml(&with("rateLimit: {perIpPacketsPerSecond: 50}\n")).unwrap();
    let l = c.rate_limit.unwrap();
    assert_eq!(
        (l.packets_per_second, l.burst, l.sessions_per_second),
        (50, 50, 0)
    );
    assert_eq!(c.dataplane().rate_limit, Some(l));
    let c = Config::from_yaml(&with(
        "rateLimit: {perIpPacketsPerSecond: 50, perIpBurst: 5, newSessionsPerIpPerSecond: 2}\n",
    ))
    .unwrap();
    assert_eq!(c.rate_limit.unwrap().sessions_per_second, 2);
    assert!(
        err(&with("rateLimit: {perIpPacketsPerSecond: 0}\n")).contains("perIpPacketsPerSecond")
    );
    assert!(
        err(&with(
            "rateLimit: {perIpPacketsPerSecond: 5, perIpBurst: 0}\n"
        ))
        .contains("perIpBurst")
    );
    assert!(err(&with("rateLimit: {perIpBurst: 5}\n")).contains("perIpPacketsPerSecond"));
    assert!(
        err(&with(
            "rateLimit: {perIpPacketsPerSecond: 5, newSessionsPerIpPerSecond: 0}\n"
        ))
        .contains("newSessionsPerIpPerSecond")
    );
    assert!(
        err(&with(
            "rateLimit: {perIpPacketsPerSecond: 5, perIpBurst: 5000000}\n"
        ))
        .contains("perIpBurst")
    );
}

#[test]
fn the_status_lease_name_is_a_dns_label() {
    let c = Config::from_yaml(&with(
        "gatewayApi: {controllerName: example.net/gw, leaseName: edge-status}\n",
    ))
    .unwrap();
    assert_eq!(c.status_lease.name, "edge-status");
    let e = err(&with(
        "gatewayApi: {controllerName: example.net/gw, leaseName: Edge_Status}\n",
    ));
    assert!(e.contains("gatewayApi.leaseName"), "{e}");
    // A fleet that serves no Gateway (forwarders, routes) names its Lease all the same.
    let c = Config::from_yaml(&with(
        "gatewayApi: {leaseName: relay-status}
",
    ))
    .unwrap();
    assert_eq!(c.status_lease.name, "relay-status");
    assert_eq!(c.gateway_controller, None);
}

#[test]
fn option_values_are_refused_by_the_schema_naming_the_key_and_the_choices() {
    for (yaml, key, choices) in [
        (
            "loadBalancing: {type: fastest}\n",
            "loadBalancing.type",
            "leastSessions",
        ),
        (
            "sessionsApi: {auth: password}\n",
            "sessionsApi.auth",
            "kubernetes",
        ),
        (
            "dataPorts: [{name: game, port: 7777, protocol: sctp}]\n",
            "dataPorts[0].protocol",
            "tcp",
        ),
    ] {
        let e = err(&with(yaml));
        assert!(e.contains(key) && e.contains(choices), "{yaml}: {e}");
    }
    let e = err("inventory: {kind: etcd}\n");
    assert!(
        e.contains("inventory.kind") && e.contains("kubernetes"),
        "{e}"
    );
}

#[test]
fn allocation_settings_are_read_and_each_bad_one_names_its_key() {
    let mapping = |allocation: &str| {
        format!(
            "inventory: {{kind: kubernetes}}\nresourceQueryMapping:\n  gs: {{group: agones.dev, \
             version: v1, resource: gameservers, addressPath: status.address, portName: default, \
             allocation: {allocation}}}\n"
        )
    };
    let c = Config::from_yaml(&mapping(
        "{enabled: true, backfill: {counter: players}, timeoutMs: 500, \
         metadata: {labels: {udp-director.dev/token: \"{tokenId}\"}, annotations: {a: b}}, \
         counters: {players: {action: Increment}, rooms: {action: Decrement, amount: 2}}}",
    ))
    .unwrap();
    let a = c.mappings["gs"].allocation.clone().unwrap();
    assert!(a.enabled);
    assert_eq!(a.backfill_counter.as_deref(), Some("players"));
    assert_eq!(a.timeout, Duration::from_millis(500));
    assert_eq!(a.labels["udp-director.dev/token"], "{tokenId}");
    assert_eq!(a.counters["players"], 1);
    assert_eq!(a.counters["rooms"], -2);
    let defaults = Config::from_yaml(&mapping("{}")).unwrap();
    let d = defaults.mappings["gs"].allocation.clone().unwrap();
    assert!(!d.enabled);
    assert_eq!(d.timeout, Duration::from_secs(2));
    for (allocation, key) in [
        (
            "{timeoutMs: 50}",
            "resourceQueryMapping.gs.allocation.timeoutMs",
        ),
        (
            "{backfill: {counter: \"\"}}",
            "resourceQueryMapping.gs.allocation.backfill.counter",
        ),
        (
            "{counters: {players: {action: Increment, amount: 0}}}",
            "resourceQueryMapping.gs.allocation.counters.players.amount",
        ),
        (
            "{metadata: {labels: {\"-bad\": x}}}",
            "resourceQueryMapping.gs.allocation.metadata.labels",
        ),
        ("{counters: {players: {action: Double}}}", "action"),
    ] {
        let e = err(&mapping(allocation));
        assert!(e.contains(key), "{allocation} should name {key}: {e}");
    }
    // Pods cannot be allocated.
    let e = err(
        "resourceQueryMapping:\n  pod: {group: \"\", version: v1, resource: pods, addressPath: \
         status.podIP, portName: game, allocation: {}}\n",
    );
    assert!(e.contains("resourceQueryMapping.pod.allocation"), "{e}");
}

#[test]
fn handoff_takes_an_absolute_unix_socket_path() {
    assert_eq!(Config::from_yaml(MINIMAL).unwrap().handoff, None);
    let c = Config::from_yaml(&format!(
        "{MINIMAL}\nhandoff: {{socketPath: /run/udp-director/handoff.sock}}\n"
    ))
    .unwrap();
    assert_eq!(
        c.handoff.unwrap().socket_path,
        std::path::PathBuf::from("/run/udp-director/handoff.sock")
    );
    for bad in [
        "handoff.sock",
        "/run/dir/",
        &format!("/{}", "a".repeat(107)),
    ] {
        let e = Config::from_yaml(&format!("{MINIMAL}\nhandoff: {{socketPath: {bad:?}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("handoff.socketPath"), "{bad}: {e}");
    }
    let e = Config::from_yaml(&format!("{MINIMAL}\nhandoff: {{path: /x}}\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("handoff"), "{e}");
}
