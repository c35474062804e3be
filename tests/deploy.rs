//! deploy/: every overlay renders with `kubectl kustomize`, is what the proxy expects (its
//! config is valid, its ClusterRole is exactly what `udp-director rbac` derives from that
//! config, its data ports are declared), passes the offline schema check, and applies to the
//! real API server (`--dry-run=server`), where `kubectl auth can-i` confirms the service
//! account gets list and watch on what the config watches and nothing else. An overlay whose
//! config has a hand-off socket (SPEC §12) is also checked for what a rollout without dropped
//! players needs: maxSurge 1 / maxUnavailable 0, no declared ports, the socket's directory a
//! hostPath mounted where the config puts the socket, and the base's fixed non-root UID.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::cluster::{cluster, repo};
use common::*;
use control::config::{DEFAULT_ADMIN_PORT, DEFAULT_DRAIN_SECONDS};
use serde_json::Value;

const OVERLAYS: [&str; 11] = [
    "agones",
    "pods-multiport",
    "dns",
    "ntp",
    "dev",
    "forwarders",
    "routes",
    "gateway-api",
    "monitoring",
    "fast-path",
    "handoff",
];
const SERVICE_ACCOUNT: &str = "system:serviceaccount:udp-director:udp-director";

fn overlay_dir(name: &str) -> PathBuf {
    repo().join("deploy/overlays").join(name)
}

/// True when `tool` runs; otherwise says so loudly (a failure under CI=true).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true (scripts/setup.sh installs it)"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** deploy checks SKIPPED: {tool} not found ***\n"
        );
    }
    found
}

fn render(name: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(overlay_dir(name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The proxy's ConfigMap (an overlay may add others, such as the Grafana dashboard's).
fn config_map(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["config.yaml"].is_string())
        .expect("no ConfigMap with config.yaml")
}

/// (apiGroup, resource, verb) triples a ClusterRole grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

fn write_scratch(name: &str, text: &str) -> PathBuf {
    let dir = scratch_dir();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn overlays_render_to_what_the_proxy_needs() {
    if !have("kubectl") {
        return;
    }
    for name in OVERLAYS {
        let docs = documents(&render(name));
        let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
        ] {
            assert!(kinds.contains(kind), "{name}: no {kind}");
        }

        // The config is valid, and the ClusterRole is exactly the generated one.
        let config_text = config_map(&docs)["data"]["config.yaml"].as_str().unwrap();
        let config = write_scratch("config.yaml", config_text);
        let (code, _, err) = run_binary(&["check-config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {err}");
        let (code, generated, err) = run_binary(&["rbac", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {err}");
        let generated = documents(&generated);
        assert_eq!(
            grants(of_kind(&docs, "ClusterRole")),
            grants(&generated[0]),
            "{name}: clusterrole.yaml is stale; regenerate it with `udp-director rbac {name}/config.yaml`"
        );
        // Every generated Role (the forwarders' in their namespace, the status Lease's in the
        // proxy's) is rendered as generated, and bound; and no other Role is.
        let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Role").collect();
        assert_eq!(
            roles.len(),
            generated.len() - 1,
            "{name}: the Roles differ from what `udp-director rbac {name}/config.yaml` prints"
        );
        for wanted in &generated[1..] {
            let role = roles
                .iter()
                .find(|r| r["metadata"]["name"] == wanted["metadata"]["name"])
                .unwrap_or_else(|| panic!("{name}: no Role {}", wanted["metadata"]["name"]));
            assert_eq!(
                (&role["metadata"]["namespace"], &role["rules"]),
                (&wanted["metadata"]["namespace"], &wanted["rules"]),
                "{name}: Role {} is stale; regenerate it with `udp-director rbac {name}/config.yaml`",
                wanted["metadata"]["name"]
            );
            let bound = docs.iter().any(|d| {
                d["kind"] == "RoleBinding"
                    && d["roleRef"]["name"] == role["metadata"]["name"]
                    && d["metadata"]["namespace"] == role["metadata"]["namespace"]
            });
            assert!(
                bound,
                "{name}: Role {} is not bound",
                wanted["metadata"]["name"]
            );
        }
        // Read-only on what it watches; `create` only on the reviews of sessionsApi.auth and
        // on Events, `patch` only on the status of routes (each instance writes its own entry)
        // and on Events (a repeat is counted into the one Event).
        assert!(
            grants(&generated[0]).iter().all(|(g, r, v)| v == "list"
                || v == "watch"
                || (v == "create"
                    && [
                        ("authentication.k8s.io", "tokenreviews"),
                        ("authorization.k8s.io", "subjectaccessreviews")
                    ]
                    .contains(&(g.as_str(), r.as_str())))
                || (v == "patch" && g == "udp-director.dev" && r == "routes/status")
                || (v == "patch" && g == "gateway.networking.k8s.io" && r.ends_with("/status"))
                || ((v == "create" || v == "patch") && g == "events.k8s.io" && r == "events")),
            "{name}"
        );

        let pod = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "{name}");
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{name}");
        assert_eq!(pod["serviceAccountName"], "udp-director", "{name}");
        let container = &pod["containers"][0];
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{name}"
        );
        assert!(
            container["resources"]["requests"]["memory"].is_string(),
            "{name}"
        );
        assert!(
            container["resources"]["limits"]["memory"].is_string(),
            "{name}"
        );
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(
            security["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        let added = security["capabilities"]["add"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let config: Value = serde_yaml::from_str(config_text).unwrap();
        // Capabilities: NET_BIND_SERVICE for low ports at most, and CAP_BPF with CAP_NET_ADMIN
        // exactly when the config turns the kernel fast path on (and nothing more for it).
        let fast_path = config["fastPath"]["kind"] == "tc";
        let fast_caps = ["BPF", "NET_ADMIN"];
        assert!(
            added.iter().all(|c| c == "NET_BIND_SERVICE"
                || (fast_path && fast_caps.contains(&c.as_str().unwrap()))),
            "{name}: {added:?}"
        );
        if fast_path {
            for cap in fast_caps {
                assert!(
                    added.iter().any(|c| c == cap),
                    "{name}: no {cap} in {added:?}"
                );
            }
        }
        // The probes reach the admin port, by number or by the name of a declared port.
        let admin_port = config["adminPort"]
            .as_u64()
            .unwrap_or(DEFAULT_ADMIN_PORT.into());
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                port_number(container, &container[probe]["httpGet"]["port"]),
                Some(admin_port),
                "{name}: {probe} does not reach adminPort"
            );
        }
        // SIGTERM starts the drain: the grace period leaves it time to finish and the process
        // time to exit.
        let drain = config["drainSeconds"]
            .as_u64()
            .unwrap_or(DEFAULT_DRAIN_SECONDS);
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace >= drain + 10,
            "{name}: terminationGracePeriodSeconds {grace} leaves drainSeconds {drain} no time"
        );
        // Init containers (the hand-off directory's owner) hold CAP_CHOWN at most.
        let handoff = config["handoff"]["socketPath"].as_str();
        for init in pod["initContainers"].as_array().into_iter().flatten() {
            assert!(
                handoff.is_some(),
                "{name}: an init container without hand-off"
            );
            let security = &init["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(
                security["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(
                security["capabilities"]["add"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|c| c == "CHOWN"),
                "{name}: {}",
                init["name"]
            );
        }
        match handoff {
            // No declared ports: the rollout starts the new pod beside the old one.
            Some(socket) => handoff_rollout(name, of_kind(&docs, "DaemonSet"), socket),
            // The config's data ports are declared (host ports, with hostNetwork).
            None => {
                let declared: BTreeSet<(u64, &str)> = container["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p["containerPort"].as_u64().unwrap(),
                            p["protocol"].as_str().unwrap(),
                        )
                    })
                    .collect();
                for port in config["dataPorts"].as_array().unwrap() {
                    assert!(
                        declared.contains(&(port["port"].as_u64().unwrap(), "UDP")),
                        "{name}: {port}"
                    );
                }
                for port in config["entryPoints"].as_array().into_iter().flatten() {
                    let protocol = match port["protocol"].as_str() {
                        Some("tcp") => "TCP",
                        _ => "UDP",
                    };
                    assert!(
                        declared.contains(&(port["port"].as_u64().unwrap(), protocol)),
                        "{name}: entry point {port} not declared"
                    );
                }
            }
        }
        // The config volume is the generated ConfigMap.
        assert_eq!(
            pod["volumes"][0]["configMap"]["name"],
            config_map(&docs)["metadata"]["name"],
            "{name}"
        );
    }
}

/// The port a probe's `port` names: a number, or a declared port's name.
fn port_number(container: &Value, port: &Value) -> Option<u64> {
    match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())?["containerPort"]
            .as_u64(),
        _ => None,
    }
}

/// What a rollout that hands over (SPEC §12) needs of the DaemonSet, for a config whose hand-off
/// socket is `socket`.
fn handoff_rollout(name: &str, daemonset: &Value, socket: &str) {
    // The new pod starts beside the old one (maxSurge), which goes only once the new one is
    // available (maxUnavailable 0), ready for a while without a break: longer than a refused new
    // pod lives, and than the moment its probes may reach the old proxy.
    let spec = &daemonset["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate", "{name}");
    assert_eq!(
        spec["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}),
        "{name}"
    );
    let pod = &spec["template"]["spec"];
    let period = pod["containers"][0]["readinessProbe"]["periodSeconds"]
        .as_u64()
        .unwrap_or(10);
    assert!(
        spec["minReadySeconds"].as_u64().unwrap_or(0) >= 5 * period,
        "{name}: minReadySeconds {} is under five readiness periods",
        spec["minReadySeconds"]
    );

    // No container declares a port: with hostNetwork each would be a host port, and the
    // scheduler would not place the second pod on the node.
    let containers = || {
        ["containers", "initContainers"]
            .iter()
            .flat_map(|k| pod[*k].as_array().into_iter().flatten())
    };
    for container in containers() {
        assert!(
            container["ports"].as_array().is_none_or(Vec::is_empty),
            "{name}: {} declares ports",
            container["name"]
        );
    }

    // The socket's directory is a hostPath (the node's, the same for the old and the new pod),
    // mounted writable where the config puts the socket.
    let socket = std::path::Path::new(socket);
    assert!(socket.is_absolute(), "{name}: {socket:?}");
    let dir = socket.parent().unwrap().to_str().unwrap();
    let proxy = &pod["containers"][0];
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
    assert_ne!(mount["readOnly"], true, "{name}: {dir} is read-only");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{name}: no volume {}", mount["name"]));
    assert_eq!(
        volume["hostPath"],
        serde_json::json!({"path": dir, "type": "DirectoryOrCreate"}),
        "{name}: {dir} is not the node's"
    );

    // Old and new pod run as the same fixed, non-root UID: the base's.
    let base: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/base/daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let base = &base["spec"]["template"]["spec"]["securityContext"];
    let security = &pod["securityContext"];
    let uid = security["runAsUser"].as_u64().expect("a fixed runAsUser");
    let gid = security["runAsGroup"].as_u64().expect("a fixed runAsGroup");
    assert_ne!(uid, 0, "{name}");
    assert_eq!(security["runAsNonRoot"], true, "{name}");
    assert_eq!(
        (&security["runAsUser"], &security["runAsGroup"]),
        (&base["runAsUser"], &base["runAsGroup"]),
        "{name}: not the base's UID"
    );
    for field in ["runAsUser", "runAsGroup", "runAsNonRoot"] {
        assert!(
            proxy["securityContext"][field].is_null(),
            "{name}: the container sets its own {field}"
        );
    }
    // The kubelet creates the directory as root: an init container gives it to that UID before
    // the proxy starts.
    let owner = format!("{uid}:{gid}");
    let chowns = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|init| {
            let command: Vec<&str> = init["command"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(init["args"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            command.first() == Some(&"chown")
                && command.contains(&owner.as_str())
                && command.contains(&dir)
                && init["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"] == mount["name"] && m["mountPath"] == dir)
        });
    assert!(chowns, "{name}: nothing gives {dir} to {owner}");
}

#[test]
fn overlays_pass_the_offline_schema_check() {
    if !have("kubectl") || !have("kubernetes-validate") {
        return;
    }
    for name in OVERLAYS {
        // Custom resources are checked by the API server against the CRD (the next test); the
        // offline checker knows the built-in kinds only (not ours, nor the Prometheus Operator's
        // PrometheusRule and PodMonitor).
        let built_in: Vec<String> = documents(&render(name))
            .into_iter()
            .filter(|d| {
                let api = d["apiVersion"].as_str().unwrap();
                !api.contains("udp-director.dev") && !api.starts_with("monitoring.coreos.com/")
            })
            .map(|d| serde_json::to_string(&d).unwrap())
            .collect();
        let rendered = write_scratch(&format!("{name}.yaml"), &built_in.join("\n---\n"));
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.33.0"])
            .arg(&rendered)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn can_i(c: &common::cluster::Cluster, verb: &str, resource: &str) -> bool {
    c.kubectl(
        &[
            "auth",
            "can-i",
            verb,
            resource,
            &format!("--as={SERVICE_ACCOUNT}"),
        ],
        None,
    )
    .is_ok()
}

#[test]
fn overlays_apply_to_the_api_server_with_least_privilege() {
    let Some(c) = cluster() else { return };
    if !have("kubectl") {
        return;
    }
    let mut every_resource = BTreeSet::new();
    let rendered: Vec<(&str, String)> = OVERLAYS.iter().map(|n| (*n, render(n))).collect();
    for (_, yaml) in &rendered {
        // Subresources (routes/status) are checked by the Kubernetes suite's RBAC tests.
        for (group, resource, _) in grants(of_kind(&documents(yaml), "ClusterRole")) {
            if !resource.contains('/') {
                every_resource.insert(qualified(&group, &resource));
            }
        }
    }
    // maxSurge on a DaemonSet (the hand-off overlay's rollout) came with Kubernetes 1.21 (on by
    // default from 1.22); an older server (the suite's is 1.20) refuses the field, and without
    // it maxUnavailable 0, so it gets such a DaemonSet with the server's default rollingUpdate.
    // The offline check validates it whole against 1.33's schema.
    let surge_known = server_minor(c) >= 22;
    for (name, yaml) in &rendered {
        let yaml = &if surge_known {
            yaml.clone()
        } else {
            without_surge(yaml)
        };
        // Every object as the server would take it: schema, defaults, admission.
        let server_side = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=test",
        ];
        c.kubectl(
            &[&server_side[..], &["--dry-run=server", "-f", "-"]].concat(),
            Some(yaml),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));

        // The RBAC for real, then ask the server what the service account may do.
        let docs = documents(yaml);
        let rbac: Vec<String> = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
        .iter()
        .map(|k| serde_json::to_string(of_kind(&docs, k)).unwrap())
        .collect();
        c.kubectl(
            &[&server_side[..], &["-f", "-"]].concat(),
            Some(&rbac.join("\n")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let granted = grants(of_kind(&docs, "ClusterRole"));
        let with_verb = |verb: &str| -> BTreeSet<String> {
            granted
                .iter()
                .filter(|(_, _, v)| v == verb)
                .map(|(g, r, _)| qualified(g, r))
                .collect()
        };
        // What the config watches: list and watch, nothing else.
        let needed = with_verb("list");
        assert_eq!(needed, with_verb("watch"), "{name}");
        for resource in &needed {
            for verb in ["list", "watch"] {
                assert!(can_i(c, verb, resource), "{name}: cannot {verb} {resource}");
            }
            for verb in ["get", "create", "update", "patch", "delete"] {
                assert!(!can_i(c, verb, resource), "{name}: may {verb} {resource}");
            }
        }
        // Events (with routes or Gateways): create and patch (a repeat is counted into one
        // Event), nothing else.
        let events = "events.events.k8s.io";
        if with_verb("create").contains(events) {
            for verb in ["create", "patch"] {
                assert!(can_i(c, verb, events), "{name}: cannot {verb} {events}");
            }
            for verb in ["get", "list", "watch", "delete"] {
                assert!(!can_i(c, verb, events), "{name}: may {verb} {events}");
            }
        }
        // `sessionsApi.auth: kubernetes`: create reviews, nothing else.
        let reviews: BTreeSet<String> = with_verb("create")
            .into_iter()
            .filter(|r| r != events)
            .collect();
        for resource in &reviews {
            assert!(
                [
                    "tokenreviews.authentication.k8s.io",
                    "subjectaccessreviews.authorization.k8s.io"
                ]
                .contains(&resource.as_str()),
                "{name}: may create {resource}"
            );
            assert!(
                can_i(c, "create", resource),
                "{name}: cannot create {resource}"
            );
            for verb in ["get", "list", "delete"] {
                assert!(!can_i(c, verb, resource), "{name}: may {verb} {resource}");
            }
        }
        let needed: BTreeSet<String> = needed.union(&reviews).cloned().collect();
        let unneeded = every_resource.iter().filter(|r| !needed.contains(*r));
        for resource in unneeded
            .map(String::as_str)
            .chain(["secrets", "configmaps", "nodes"])
        {
            assert!(!can_i(c, "list", resource), "{name}: may list {resource}");
        }
    }
}

/// The API server's minor version.
fn server_minor(c: &common::cluster::Cluster) -> u64 {
    let version: Value =
        serde_json::from_str(&c.kubectl(&["version", "-o", "json"], None).unwrap()).unwrap();
    let minor = version["serverVersion"]["minor"].as_str().unwrap();
    minor.trim_end_matches('+').parse().unwrap()
}

/// `yaml` with no DaemonSet's `rollingUpdate` that has a `maxSurge` (the server defaults it).
fn without_surge(yaml: &str) -> String {
    documents(yaml)
        .into_iter()
        .map(|mut d| {
            let surge = &d["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"];
            if d["kind"] == "DaemonSet" && !surge.is_null() {
                let strategy = d["spec"]["updateStrategy"].as_object_mut().unwrap();
                strategy.remove("rollingUpdate");
            }
            serde_yaml::to_string(&d).unwrap()
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `resource.group`, as kubectl names a resource of a group.
fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}
