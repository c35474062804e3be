//! The Kubernetes suite's API server: the real kube-apiserver that `scripts/k8s-apiserver.sh
//! start RUN_DIR` runs (scripts/test.sh does it), found through `UDP_DIRECTOR_K8S_RUN=RUN_DIR`.
//! Tests drive it with kubectl as an operator would, and run the proxy as the RBAC-limited
//! service account `udp-director/udp-director`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{Proxy, client, expect_datagram};

/// The suite's proxy config: every mapping the Kubernetes tests use. `NAMESPACE` is replaced by
/// the test's namespace. The ClusterRole the proxy runs under is generated from this very file
/// (`udp-director rbac`), so a watch the generator forgets fails the tests.
pub const PROXY_CONFIG: &str = include_str!("../k8s/proxy.yaml");

/// How long a proxy may take to list everything and turn ready.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// An Agones status: `status.address`, `status.addresses` (a Hostname and the PodIP) and a port.
pub fn gs_status(state: &str, addr: SocketAddr) -> String {
    format!(
        r#"{{"status":{{"state":"{state}","address":"{ip}","addresses":[{{"type":"Hostname","address":"node-1"}},{{"type":"PodIP","address":"{ip}"}}],"ports":[{{"name":"default","port":{port}}}]}}}}"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// A query for a Ready object of `resource_type` in `namespace`.
pub fn ready_query(resource_type: &str, namespace: &str) -> String {
    format!(
        r#"{{"resourceType":"{resource_type}","namespace":"{namespace}","statusQuery":{{"jsonPath":"status.state","expectedValue":"Ready"}}}}"#
    )
}

/// Queries, opens a session on the `game` port with the token and returns the tag of the echo
/// server that answers; Err(answer) when the query is refused.
pub fn served_by(p: &Proxy, query: &str) -> Result<u8, serde_json::Value> {
    let answer = p.query(query);
    let token = answer["token"].as_str().ok_or_else(|| answer.clone())?;
    let c = client();
    c.send_to(token.as_bytes(), p.data_addr()).unwrap();
    c.send_to(b"ping", p.data_addr()).unwrap();
    Ok(expect_datagram(&c)[0])
}

/// The API server, or None (after saying so on the terminal) when none is configured.
pub struct Cluster {
    pub run: PathBuf,
}

pub fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let Some(run) = std::env::var_os("UDP_DIRECTOR_K8S_RUN") else {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but UDP_DIRECTOR_K8S_RUN is not set: the Kubernetes suite must run \
                     in CI (scripts/test.sh starts the API server)"
                );
                // Straight to the terminal: the test harness captures eprintln! of passing tests.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** Kubernetes suite SKIPPED: no API server configured. Run scripts/test.sh, \
                     or `scripts/k8s-apiserver.sh start DIR` and set UDP_DIRECTOR_K8S_RUN=DIR. ***\n"
                );
                return None;
            };
            let cluster = Cluster { run: run.into() };
            cluster.grant_proxy_rbac();
            Some(cluster)
        })
        .as_ref()
}

/// The condition `type_` in `conditions` (a status's list), `Null` when absent.
pub fn cond<'a>(conditions: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
    conditions
        .as_array()
        .and_then(|list| list.iter().find(|c| c["type"] == type_))
        .unwrap_or(&serde_json::Value::Null)
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Cluster {
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.run.join("kubeconfig")
    }

    pub fn proxy_kubeconfig(&self) -> PathBuf {
        self.run.join("kubeconfig-proxy")
    }

    /// kubectl as admin: Ok(stdout) or Err(stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.admin_kubeconfig())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        if out.status.success() {
            Ok(text(out.stdout))
        } else {
            Err(text(out.stderr))
        }
    }

    /// The `events.k8s.io/v1` Events of `ns` about the object `kind`/`name` (none when they
    /// cannot be listed).
    pub fn events_about(&self, ns: &str, kind: &str, name: &str) -> Vec<serde_json::Value> {
        let Ok(out) = self.kubectl(
            &["get", "events.v1.events.k8s.io", "-n", ns, "-o", "json"],
            None,
        ) else {
            return Vec::new();
        };
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
            .cloned()
            .collect()
    }

    /// An object as JSON (`Null` when it cannot be read): `ns` empty for a cluster-scoped one.
    pub fn get_json(&self, resource: &str, ns: &str, name: &str) -> serde_json::Value {
        let mut args = vec!["get", resource, name, "-o", "json"];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args, None)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// kubectl as admin, panicking on failure.
    pub fn must(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.kubectl(args, stdin)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// A server-side apply of YAML (client-side apply would treat the EndpointSlice stand-in as
    /// the built-in type and send a strategic-merge patch the CRD cannot take).
    pub fn apply(&self, yaml: &str) {
        self.must(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=test",
                "-f",
                "-",
            ],
            Some(yaml),
        );
    }

    /// A merge patch of an object's status subresource, as a controller (Agones, the kubelet)
    /// writes it.
    pub fn patch_status(&self, namespace: &str, resource: &str, name: &str, json: &str) {
        self.must(
            &[
                "patch",
                resource,
                name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                json,
            ],
            None,
        );
    }

    /// A namespace of its own for one test, unique across runs on the same server.
    pub fn namespace(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.must(&["create", "namespace", &name], None);
        self.grant_lease_rbac(&name);
        name
    }

    /// Starts a proxy as the service account, watching `namespace` with [`PROXY_CONFIG`] plus
    /// `extra`, and waits until it is ready (every initial list done).
    pub fn start_proxy(&self, namespace: &str, extra: &str) -> Proxy {
        let proxy = self.launch_proxy(namespace, extra);
        proxy.eventually_within(READY_WITHIN, "proxy ready", |p| {
            p.http("GET", "/readyz").0 == 200
        });
        proxy
    }

    /// Starts a proxy as [`Cluster::start_proxy`] does, on `bind_address` instead of loopback.
    pub fn start_proxy_on(&self, namespace: &str, bind_address: &str) -> Proxy {
        let config = PROXY_CONFIG.replace("NAMESPACE", namespace).replace(
            "bindAddress: 127.0.0.1",
            &format!("bindAddress: {bind_address}"),
        );
        let kubeconfig = self.proxy_kubeconfig();
        let proxy = Proxy::launch(
            &config,
            "",
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("POD_NAMESPACE", std::ffi::OsStr::new(namespace)),
            ],
        );
        proxy.eventually_within(READY_WITHIN, "proxy ready", |p| {
            p.http("GET", "/readyz").0 == 200
        });
        proxy
    }

    /// The config of a proxy serving the forwarders of `namespace`, with `servicePorts` on
    /// Services `lb-udp` and `lb-tcp` (one per protocol: the suite's API server, 1.20, predates
    /// mixed-protocol LoadBalancers).
    pub fn forwarder_config(namespace: &str, bind_address: &str) -> String {
        format!(
            "{}forwarders: {{namespace: {namespace}, servicePorts: {{udp: lb-udp, tcp: lb-tcp}}}}\n",
            PROXY_CONFIG.replace("NAMESPACE", namespace).replace(
                "bindAddress: 127.0.0.1",
                &format!("bindAddress: {bind_address}")
            )
        )
    }

    /// Grants the proxy's service account what `udp-director rbac` generates for
    /// [`Cluster::forwarder_config`] in `namespace`: the Role `udp-director-forwarders` there
    /// (bound to the account). Its ClusterRole part must be the one the suite already granted.
    pub fn grant_forwarder_rbac(&self, namespace: &str) {
        let config = std::env::temp_dir().join(format!(
            "udp-director-rbac-{}-{namespace}.yaml",
            std::process::id()
        ));
        std::fs::write(&config, Self::forwarder_config(namespace, "127.0.0.1")).unwrap();
        let (code, out, err) =
            super::run_binary(&["rbac", config.to_str().unwrap(), "--name", "udp-director"]);
        let _ = std::fs::remove_file(&config);
        assert_eq!(code, 0, "{err}");
        let (cluster_role, rest) = out.split_once("---\n").expect("a ClusterRole and a Role");
        let role = rest
            .split("---\n")
            .find(|doc| doc.contains("name: udp-director-forwarders"))
            .expect("the forwarders' Role");
        assert_eq!(
            cluster_role,
            self.granted_cluster_role(),
            "forwarders need nothing cluster-wide beyond the suite's ClusterRole"
        );
        self.apply(&format!(
            "{role}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
             metadata: {{name: udp-director-forwarders, namespace: {namespace}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: udp-director-forwarders}}\n\
             subjects: [{{kind: ServiceAccount, name: udp-director, namespace: udp-director}}]\n"
        ));
    }

    /// Starts a proxy serving the forwarders of `namespace` on `bind_address`, as the instance
    /// on `node`, and waits until it is ready.
    pub fn start_forwarder_proxy(&self, namespace: &str, node: &str, bind_address: &str) -> Proxy {
        self.start_node(
            &Self::forwarder_config(namespace, bind_address),
            namespace,
            node,
        )
    }

    /// Starts a proxy on `config` as the service account and as the instance on `node` of a
    /// fleet in `namespace` (its status Lease there), and waits until it is ready.
    pub fn start_node(&self, config: &str, namespace: &str, node: &str) -> Proxy {
        let proxy = self.launch_node(config, namespace, node);
        proxy.eventually_within(READY_WITHIN, "proxy ready", |p| {
            p.http("GET", "/readyz").0 == 200
        });
        proxy
    }

    /// Starts a proxy as [`Cluster::start_node`] does, without waiting for it to be ready.
    pub fn launch_node(&self, config: &str, namespace: &str, node: &str) -> Proxy {
        let kubeconfig = self.proxy_kubeconfig();
        Proxy::launch(
            config,
            "",
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("NODE_NAME", std::ffi::OsStr::new(node)),
                ("POD_NAMESPACE", std::ffi::OsStr::new(namespace)),
            ],
        )
    }

    /// Starts a proxy with [`PROXY_CONFIG`] on `namespace` as the instance on `node` (status
    /// entries are written under that name), and waits until it is ready.
    pub fn start_proxy_as(&self, namespace: &str, node: &str) -> Proxy {
        self.start_node(
            &PROXY_CONFIG.replace("NAMESPACE", namespace),
            namespace,
            node,
        )
    }

    /// kubectl as the proxy's service account: `auth can-i VERB RESOURCE -n NAMESPACE`;
    /// `RESOURCE` may be `TYPE/NAME`, or `TYPE/status` for the status subresource.
    pub fn proxy_can(&self, verb: &str, resource: &str, namespace: &str) -> bool {
        let mut args = vec![
            "auth",
            "can-i",
            verb,
            "-n",
            namespace,
            "--as=system:serviceaccount:udp-director:udp-director",
        ];
        match resource.strip_suffix("/status") {
            Some(kind) => args.extend([kind, "--subresource=status"]),
            None => args.push(resource),
        }
        let out = self.kubectl(&args, None);
        match out {
            Ok(answer) => answer.trim() == "yes",
            // "no" goes to stdout with exit status 1; anything on stderr but a warning (a
            // cluster-scoped resource asked about in a namespace) is a real failure.
            Err(stderr) => {
                assert!(
                    stderr
                        .lines()
                        .all(|l| l.trim().is_empty() || l.starts_with("Warning:")),
                    "kubectl auth can-i: {stderr}"
                );
                false
            }
        }
    }

    /// Starts a proxy as [`Cluster::start_proxy`] does, without waiting for it to be ready.
    pub fn launch_proxy(&self, namespace: &str, extra: &str) -> Proxy {
        let config = format!("{}{extra}", PROXY_CONFIG.replace("NAMESPACE", namespace));
        let kubeconfig = self.proxy_kubeconfig();
        Proxy::launch(
            &config,
            "",
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("POD_NAMESPACE", std::ffi::OsStr::new(namespace)),
            ],
        )
    }

    /// A token of service account `namespace/name` (created if missing) from the TokenRequest
    /// API, issued for `audience` (None: the API server's own).
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: Option<&str>,
    ) -> String {
        let _ = self.kubectl(&["create", "serviceaccount", name, "-n", namespace], None);
        let audiences = audience.map_or(String::new(), |a| format!(r#""audiences":["{a}"],"#));
        let request = format!(
            r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{{{audiences}"expirationSeconds":600}}}}"#
        );
        let answer = self.must(
            &[
                "create",
                "--raw",
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
                "-f",
                "-",
            ],
            Some(&request),
        );
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        answer["status"]["token"].as_str().unwrap().to_string()
    }

    /// Creates a GameServer (no status yet); `labels` is YAML map content (`id: a`).
    pub fn apply_gameserver(&self, namespace: &str, name: &str, labels: &str) {
        self.apply(&format!(
            "apiVersion: agones.dev/v1\nkind: GameServer\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec: {{}}\n"
        ));
    }

    /// Creates a GameServer and writes its status as the Agones controller would.
    pub fn gameserver(
        &self,
        namespace: &str,
        name: &str,
        labels: &str,
        state: &str,
        addr: SocketAddr,
    ) {
        self.apply_gameserver(namespace, name, labels);
        self.patch_status(namespace, "gameservers", name, &gs_status(state, addr));
    }

    /// Runs `scripts/k8s-apiserver.sh VERB RUN_DIR`.
    pub fn script(&self, verb: &str) {
        let status = Command::new(repo().join("scripts/k8s-apiserver.sh"))
            .arg(verb)
            .arg(&self.run)
            .status()
            .unwrap();
        assert!(status.success(), "k8s-apiserver.sh {verb}: {status:?}");
    }

    /// The ClusterRole `udp-director rbac` generates for [`PROXY_CONFIG`].
    fn granted_cluster_role(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        // A file per call: tests granting RBAC run in parallel.
        let config = std::env::temp_dir().join(format!(
            "udp-director-rbac-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config, PROXY_CONFIG.replace("NAMESPACE", "default")).unwrap();
        let (code, out, err) =
            super::run_binary(&["rbac", config.to_str().unwrap(), "--name", "udp-director"]);
        let _ = std::fs::remove_file(&config);
        assert_eq!(code, 0, "{err}");
        // The ClusterRole comes first; the status Lease's Role is granted per namespace.
        out.split("---\n").next().unwrap_or_default().to_string()
    }

    /// Grants the proxy's service account the status Lease's Role that `udp-director rbac`
    /// generates for [`PROXY_CONFIG`], in `namespace`: each test's proxies run with it as their
    /// own namespace (`POD_NAMESPACE`), so each test's instances are a fleet of their own.
    fn grant_lease_rbac(&self, namespace: &str) {
        static ROLE: OnceLock<serde_json::Value> = OnceLock::new();
        let role = ROLE.get_or_init(|| {
            let config = std::env::temp_dir().join(format!(
                "udp-director-rbac-lease-{}.yaml",
                std::process::id()
            ));
            std::fs::write(&config, PROXY_CONFIG.replace("NAMESPACE", "default")).unwrap();
            let (code, out, err) =
                super::run_binary(&["rbac", config.to_str().unwrap(), "--name", "udp-director"]);
            let _ = std::fs::remove_file(&config);
            assert_eq!(code, 0, "{err}");
            out.split("---\n")
                .filter_map(|doc| serde_yaml::from_str::<serde_json::Value>(doc).ok())
                .find(|doc| doc["metadata"]["name"] == "udp-director-lease")
                .expect("`udp-director rbac` prints the status Lease's Role")
        });
        let mut role = role.clone();
        role["metadata"]["namespace"] = serde_json::Value::from(namespace);
        self.apply(&format!(
            "{}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
             metadata: {{name: udp-director-lease, namespace: {namespace}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: udp-director-lease}}\n\
             subjects: [{{kind: ServiceAccount, name: udp-director, namespace: udp-director}}]\n",
            serde_yaml::to_string(&role).unwrap()
        ));
    }

    /// Binds the proxy's service account to the ClusterRole `udp-director rbac` generates for
    /// [`PROXY_CONFIG`], and to nothing else.
    fn grant_proxy_rbac(&self) {
        let role = self.granted_cluster_role();
        self.apply(&format!(
            "{role}---\n{}",
            r#"apiVersion: v1
kind: Namespace
metadata: {name: udp-director}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: udp-director, namespace: udp-director}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: udp-director}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: udp-director}
subjects: [{kind: ServiceAccount, name: udp-director, namespace: udp-director}]
"#
        ));
    }
}
