//! A STAND-IN for Agones' allocation API, `allocation.agones.dev/v1` GameServerAllocations
//! (create only), for tests of the proxy's allocation: Agones itself cannot run here. It is
//! registered with the suite's real kube-apiserver through the aggregation layer (an
//! `APIService`), so callers reach it as they would reach Agones: through the API server, with
//! its authentication and RBAC. It follows Agones' documented allocation semantics over the
//! real GameServer objects (ordered selectors, Ready → Allocated written through the API, counter
//! backfill and actions, the metadata patch, `UnAllocated`, `Contention`) and nothing more: no
//! fleets, priorities, lists, player tracking or multi-cluster, and candidates are taken in name
//! order. It is not Agones and must not be mistaken for a check of Agones.
//!
//! The API server refuses loopback Endpoints, so the stand-in listens in a network namespace of
//! its own, joined to this host by a veth pair; the kernel removes both with the process. It
//! serves only the API server's aggregator (TLS client certificates from the front-proxy CA that
//! scripts/k8s-apiserver.sh makes), which has authenticated and authorized the caller already.
//!
//! One stand-in per test process. The `APIService` is cluster-wide: each test's `start` points
//! it at this process (when another process took it meanwhile), and at exit the process removes
//! it if it is still the one served, since an `APIService` whose server is gone breaks every
//! client's API discovery. Two test processes using the stand-in at once take it from each other.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use serde_json::{Map, Value, json};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::cluster::Cluster;
use super::skip_test;

mod allocation;

use allocation::{GameServerAllocation, allocated_status, rfc3339};

/// The API group and version the stand-in serves.
pub const GROUP: &str = "allocation.agones.dev";
pub const VERSION: &str = "v1";
/// Where its Service and Endpoints live, as Agones' do.
const NAMESPACE: &str = "agones-system";
const SERVICE: &str = "agones-allocator-standin";
const API_SERVICE: &str = "v1.allocation.agones.dev";
/// The annotation Agones stamps on every allocation (RFC 3339).
pub const LAST_ALLOCATED: &str = "agones.dev/last-allocated";
/// Request bodies beyond this are refused unread.
const MAX_BODY_BYTES: usize = 1 << 20;
/// How long registration may take until a create through the API server reaches this process.
const REGISTERED_WITHIN: Duration = Duration::from_secs(60);

/// The stand-in: where it listens, and what it has served.
#[derive(Debug)]
pub struct AgonesAllocatorStandIn {
    /// Where the API server reaches it (an address in its network namespace).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Held while (re-)registering, so parallel tests wait for one registration.
    registering: Mutex<bool>,
}

/// One create request the stand-in received from the API server.
#[derive(Clone, Debug)]
pub struct AllocationRecord {
    /// The caller, as the API server vouched for it (`X-Remote-User`).
    pub user: String,
    /// The caller's groups (`X-Remote-Group`).
    pub groups: Vec<String>,
    pub namespace: String,
    /// The answer's `metadata.name`.
    pub name: String,
    /// `Allocated`, `UnAllocated`, `Contention`, or the refusal's reason (`BadRequest`,
    /// `Invalid`, `InternalError`).
    pub state: String,
    /// The GameServer allocated, if one was.
    pub game_server: Option<String>,
    /// The request body (`Null` when it was not JSON).
    pub request: Value,
}

/// A refusal from the API server (or from the stand-in, passed on by it).
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The HTTP status; 0 when no answer came.
    pub code: u16,
    pub reason: String,
    pub message: String,
}

/// What the server thread shares with the test.
#[derive(Debug, Default)]
struct Shared {
    /// Per namespace: a pause between reading the chosen GameServer and writing it.
    race_windows: Mutex<HashMap<String, Duration>>,
    log: Mutex<Vec<AllocationRecord>>,
}

/// The server's side: an admin client for the GameServers, and the shared state.
struct Server {
    client: kube::Client,
    shared: Arc<Shared>,
}

/// How one allocation ended.
enum Outcome {
    Allocated(Box<DynamicObject>),
    UnAllocated,
    Contention,
}

impl AgonesAllocatorStandIn {
    /// This process's stand-in, registered with the API server and reachable through it. None
    /// (after saying so; a failure under CI=true) where it cannot run: it needs root for its
    /// network namespace.
    pub fn start(cluster: &Cluster) -> Option<&'static Self> {
        static STANDIN: OnceLock<Result<AgonesAllocatorStandIn, String>> = OnceLock::new();
        match STANDIN.get_or_init(|| Self::launch(cluster)) {
            Ok(standin) => {
                standin.register(cluster);
                Some(standin)
            }
            Err(e) => {
                skip_test(&format!("no stand-in for Agones' allocation API: {e}"));
                None
            }
        }
    }

    /// Makes allocations in `namespace` pause for `window` between reading the GameServer they
    /// chose and writing it, so two of them racing for the last server reliably conflict: one
    /// is Allocated, the other answered `Contention` (the stand-in does not retry).
    pub fn set_race_window(&self, namespace: &str, window: Duration) {
        self.shared
            .race_windows
            .lock()
            .unwrap()
            .insert(namespace.to_string(), window);
    }

    /// The create requests served for `namespace`, oldest first.
    pub fn requests(&self, namespace: &str) -> Vec<AllocationRecord> {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.namespace == namespace)
            .cloned()
            .collect()
    }

    /// How many requests for `namespace` allocated a GameServer.
    pub fn allocations(&self, namespace: &str) -> usize {
        self.requests(namespace)
            .iter()
            .filter(|r| r.state == "Allocated")
            .count()
    }

    /// Opens the listener in its own network namespace and starts serving on a thread of its
    /// own; Err only where the namespace cannot be made.
    fn launch(cluster: &Cluster) -> Result<Self, String> {
        let listener = listen_in_own_netns()?;
        let addr = listener.local_addr().unwrap();
        let tls = tls_config(cluster, addr.ip());
        if DEREGISTER.set((cluster.run.clone(), addr)).is_ok() {
            // SAFETY: atexit(3) with a function that takes and returns nothing; it is registered
            // once, and touches nothing that exit tears down before it runs.
            unsafe { libc::atexit(deregister_at_exit) };
        }
        let shared = Arc::new(Shared::default());
        let kubeconfig = cluster.admin_kubeconfig();
        let (ready_tx, ready_rx) = mpsc::channel();
        let for_server = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agones-standin".into())
            .spawn(move || serve(listener, tls, for_server, &kubeconfig, &ready_tx))
            .unwrap();
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("the stand-in's API client: {e}"));
        Ok(Self {
            addr,
            shared,
            registering: Mutex::new(false),
        })
    }

    /// Points the `APIService` at this process (unless it already is) and waits until a create
    /// through the API server reaches this stand-in.
    fn register(&self, cluster: &Cluster) {
        // A test that failed registering leaves the flag false: the next one tries again.
        let mut registered = self
            .registering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *registered && routed_here(cluster, self.addr) {
            return;
        }
        // A client-side apply: 1.20's aggregator panics on a server-side apply of an APIService
        // ("FieldManager must be installed to run apply").
        let yaml = format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
spec: {{ports: [{{port: 443, targetPort: {port}, protocol: TCP}}]}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
subsets: [{{addresses: [{{ip: "{ip}"}}], ports: [{{port: {port}, protocol: TCP}}]}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: {API_SERVICE}}}
spec:
  group: {GROUP}
  version: {VERSION}
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 1000
  versionPriority: 15
  service: {{namespace: {NAMESPACE}, name: {SERVICE}, port: 443}}
"#,
            ip = self.addr.ip(),
            port = self.addr.port()
        );
        cluster.must(&["apply", "-f", "-"], Some(&yaml));
        // A probe only this process can have answered: its name lands in this process's log.
        static PROBES: AtomicU32 = AtomicU32::new(0);
        let deadline = Instant::now() + REGISTERED_WITHIN;
        let mut last = String::new();
        while Instant::now() < deadline {
            let name = format!(
                "standin-probe-{}-{}",
                std::process::id(),
                PROBES.fetch_add(1, Ordering::Relaxed)
            );
            let probe = json!({"apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "GameServerAllocation", "metadata": {"name": name}, "spec": {}});
            match create_allocation(&cluster.admin_kubeconfig(), NAMESPACE, &probe) {
                Ok(_) if self.requests(NAMESPACE).iter().any(|r| r.name == name) => {
                    *registered = true;
                    return;
                }
                Ok(answer) => last = format!("answered elsewhere: {answer}"),
                Err(refusal) => last = format!("{refusal:?}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the API server did not route {GROUP}/{VERSION} to the stand-in at {} within {:?} \
             (is the aggregation layer on? scripts/k8s-apiserver.sh start turns it on); last \
             attempt: {last}; APIService status: {}",
            self.addr,
            REGISTERED_WITHIN,
            cluster.get_json("apiservice", "", API_SERVICE)["status"]
        );
    }
}

/// The run directory and address of this process's stand-in, for [`deregister_at_exit`].
static DEREGISTER: OnceLock<(PathBuf, SocketAddr)> = OnceLock::new();

/// Removes the `APIService` when this process's stand-in is the one it routes to: an
/// `APIService` whose server is gone breaks every client's discovery of the whole API
/// ("unable to retrieve the complete list of server APIs"). The next stand-in registers anew.
extern "C" fn deregister_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Some((run, addr)) = DEREGISTER.get() else {
            return;
        };
        let cluster = Cluster { run: run.clone() };
        if routed_here(&cluster, *addr) {
            let _ = cluster.kubectl(&["delete", "apiservice", API_SERVICE, "--wait=false"], None);
        }
    });
}

/// Whether the `APIService` exists and its Service's Endpoints are `addr`.
fn routed_here(cluster: &Cluster, addr: SocketAddr) -> bool {
    let api_service = format!("apiservice/{API_SERVICE}");
    let endpoints = format!("endpoints/{SERVICE}");
    let Ok(out) = cluster.kubectl(
        &[
            "get",
            &api_service,
            &endpoints,
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ],
        None,
    ) else {
        return false;
    };
    let both: Value = serde_json::from_str(&out).unwrap_or_default();
    let subset = &both["items"][1]["subsets"][0];
    both["items"][0]["kind"] == "APIService"
        && subset["addresses"][0]["ip"] == addr.ip().to_string()
        && subset["ports"][0]["port"] == addr.port()
}

/// Creates a GameServerAllocation through the main API server as the user of `kubeconfig`, as
/// a client of Agones would: the answer, or the refusal.
pub fn create_allocation(
    kubeconfig: &Path,
    namespace: &str,
    allocation: &Value,
) -> Result<Value, Refusal> {
    create_allocation_raw(kubeconfig, namespace, allocation.to_string().into_bytes())
}

/// [`create_allocation`] with any body, JSON or not.
pub fn create_allocation_raw(
    kubeconfig: &Path,
    namespace: &str,
    body: Vec<u8>,
) -> Result<Value, Refusal> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let refused = |message: String| Refusal {
            code: 0,
            reason: String::new(),
            message,
        };
        let client = client_for(kubeconfig).await.map_err(refused)?;
        let request = kube::core::Request::new(format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{namespace}/gameserverallocations"
        ))
        .create(&PostParams::default(), body)
        .map_err(|e| refused(e.to_string()))?;
        client.request::<Value>(request).await.map_err(|e| match e {
            kube::Error::Api(status) => Refusal {
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => refused(other.to_string()),
        })
    })
}

/// A client for the API server as the user of `kubeconfig`.
async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// A TCP listener on an address of a network namespace made for it, reached from this host
/// over a veth pair: the API server will not dial loopback Endpoints. The namespace lives as
/// long as the listener (its sockets hold it); with it go the pair and this host's end.
fn listen_in_own_netns() -> Result<TcpListener, String> {
    let pid = std::process::id();
    // A /30 per process in 10.254.0.0/16, away from the suite's other namespaces.
    let base = u32::from(Ipv4Addr::new(10, 254, 0, 0)) + (pid % 16_384) * 4;
    let (host, inner) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
    let host_if = format!("agsi{pid}");
    let (tid_tx, tid_rx) = mpsc::channel::<Result<libc::pid_t, String>>();
    let (link_tx, link_rx) = mpsc::channel::<bool>();
    let inside = std::thread::Builder::new()
        .name("agones-netns".into())
        .spawn(move || -> Result<TcpListener, String> {
            // SAFETY: unshare(2) with CLONE_NEWNET only moves the calling thread (this one,
            // which does nothing else) into a new network namespace; no memory is involved.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
                let _ = tid_tx.send(Err(e.clone()));
                return Err(e);
            }
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() };
            let _ = tid_tx.send(Ok(tid));
            if !link_rx.recv().unwrap_or(false) {
                return Err("no veth pair".into());
            }
            // Children inherit this thread's namespace: these `ip` commands configure it.
            ip(&["addr", "add", &format!("{inner}/30"), "dev", "eth0"])?;
            ip(&["link", "set", "eth0", "up"])?;
            ip(&["link", "set", "lo", "up"])?;
            TcpListener::bind((inner, 0)).map_err(|e| format!("bind {inner}: {e}"))
        })
        .map_err(|e| e.to_string())?;
    let tid = tid_rx.recv().map_err(|e| e.to_string())??;
    let linked = (|| {
        let _ = ip(&["link", "del", &host_if]);
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &tid.to_string(),
        ])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])
    })();
    let _ = link_tx.send(linked.is_ok());
    linked?;
    inside
        .join()
        .map_err(|_panic| "the namespace's thread panicked".to_string())?
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// TLS for the listener: a fresh self-signed certificate (the `APIService` skips verifying
/// it), and client certificates required from the front-proxy CA, so only the API server's
/// aggregator, which vouches for the caller in `X-Remote-User`, is served.
fn tls_config(cluster: &Cluster, ip: IpAddr) -> Arc<rustls::ServerConfig> {
    let front_proxy_ca = cluster.run.join("front-proxy-ca.crt");
    assert!(
        front_proxy_ca.exists(),
        "{} is missing: the API server runs without the aggregation layer; restart it with \
         scripts/k8s-apiserver.sh start RUN_DIR",
        front_proxy_ca.display()
    );
    let dir = super::scratch_dir();
    let (cert, key) = (dir.join("standin.crt"), dir.join("standin.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=agones-allocator-standin", "-addext"])
        .arg(format!("subjectAltName=IP:{ip}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pem_certs = |path: &PathBuf| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs(&front_proxy_ca) {
        roots.add(ca).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pem_certs(&cert),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    // HTTP/1.1 only: the aggregator would otherwise speak HTTP/2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The server thread: a runtime of its own, an admin client, then TLS connections served
/// until the process ends. Says on `ready` whether the client could be made.
fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    kubeconfig: &Path,
    ready: &mpsc::Sender<Result<(), String>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let client = match client_for(kubeconfig).await {
            Ok(client) => client,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = ready.send(Ok(()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let server = Arc::new(Server { client, shared });
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // Out of descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (acceptor, server) = (acceptor.clone(), Arc::clone(&server));
            tokio::spawn(async move {
                // A handshake without the front-proxy certificate ends here.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |request| Arc::clone(&server).handle(request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

impl Server {
    /// Routes one request: discovery, health, and the create of GameServerAllocations.
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let header_values = |name: &str| -> Vec<String> {
            request
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect()
        };
        let user = header_values("x-remote-user").concat();
        let groups = header_values("x-remote-group");
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let get = request.method() == Method::GET;
        Ok(match segments.as_slice() {
            ["healthz" | "readyz" | "livez"] if get => Response::new(Full::from("ok")),
            ["apis"] if get => answer(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group()]}),
            ),
            ["apis", GROUP] if get => answer(StatusCode::OK, &api_group()),
            ["apis", GROUP, VERSION] if get => answer(StatusCode::OK, &api_resources()),
            [
                "apis",
                GROUP,
                VERSION,
                "namespaces",
                namespace,
                "gameserverallocations",
            ] => {
                if request.method() == Method::POST {
                    let namespace = namespace.to_string();
                    let mut record = AllocationRecord {
                        user,
                        groups,
                        namespace: namespace.clone(),
                        name: String::new(),
                        state: String::new(),
                        game_server: None,
                        request: Value::Null,
                    };
                    let response = self
                        .create(&namespace, request.into_body(), &mut record)
                        .await;
                    self.shared.log.lock().unwrap().push(record);
                    response
                } else {
                    failure(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "gameserverallocations support create only",
                    )
                }
            }
            _ => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        })
    }

    /// A create: the body read (bounded) and parsed as untrusted input, then allocated.
    async fn create(
        &self,
        namespace: &str,
        body: Incoming,
        record: &mut AllocationRecord,
    ) -> Response<Full<Bytes>> {
        let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                record.state = "RequestEntityTooLarge".into();
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    &format!("the body is over {MAX_BODY_BYTES} bytes"),
                );
            }
            Err(e) => {
                record.state = "BadRequest".into();
                return failure(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
            }
        };
        let parsed = serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| format!("the body is not JSON: {e}"))
            .and_then(|value| {
                record.request = value.clone();
                serde_json::from_value::<GameServerAllocation>(value)
                    .map_err(|e| format!("the body is not a GameServerAllocation: {e}"))
            })
            .and_then(|gsa| gsa.check_type().map(|()| gsa));
        let gsa = match parsed {
            Ok(gsa) => gsa,
            Err(message) => {
                record.state = "BadRequest".into();
                return failure(StatusCode::BAD_REQUEST, "BadRequest", &message);
            }
        };
        let causes = gsa.invalid_fields();
        if !causes.is_empty() {
            record.state = "Invalid".into();
            return invalid(&causes);
        }
        let outcome = match self.allocate(namespace, &gsa).await {
            Ok(outcome) => outcome,
            Err(e) => {
                record.state = "InternalError".into();
                return failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &format!("allocating: {e}"),
                );
            }
        };
        let mut status = Map::new();
        let name = match &outcome {
            Outcome::Allocated(gs) => {
                status = allocated_status(gs);
                gs.metadata.name.clone().unwrap_or_default()
            }
            Outcome::UnAllocated | Outcome::Contention => gsa.name(),
        };
        let state = match outcome {
            Outcome::Allocated(_) => "Allocated",
            Outcome::UnAllocated => "UnAllocated",
            Outcome::Contention => "Contention",
        };
        status.insert("state".into(), state.into());
        record.state = state.into();
        record.name.clone_from(&name);
        record.game_server = status
            .get("gameServerName")
            .and_then(Value::as_str)
            .map(str::to_string);
        // GameServerAllocations are not stored: the answer is the request, completed.
        answer(
            StatusCode::CREATED,
            &json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "GameServerAllocation",
                "metadata": {"name": name, "namespace": namespace,
                    "creationTimestamp": rfc3339(SystemTime::now(), false)},
                "spec": record.request.get("spec").cloned().unwrap_or_else(|| json!({})),
                "status": status,
            }),
        )
    }

    /// Agones' allocation, once (Agones retries a conflict a few times; the stand-in does not):
    /// the first selector (in order) that some GameServer of the namespace matches picks the
    /// first such server by name; it is written Allocated with the metadata patch and counter
    /// actions, conditional on the version read, so a concurrent write makes this one
    /// `Contention`. (A conflict on the second write leaves the metadata patch applied.)
    async fn allocate(
        &self,
        namespace: &str,
        gsa: &GameServerAllocation,
    ) -> Result<Outcome, kube::Error> {
        let gvk = GroupVersionKind::gvk("agones.dev", "v1", "GameServer");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "gameservers");
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &resource);
        let mut servers = api.list(&ListParams::default()).await?.items;
        servers.retain(|gs| gs.metadata.deletion_timestamp.is_none());
        servers.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let selectors = gsa.selectors();
        let chosen = selectors
            .iter()
            .find_map(|selector| servers.iter().find(|gs| selector.matches(gs)));
        let Some(mut gs) = chosen.cloned() else {
            return Ok(Outcome::UnAllocated);
        };
        let window = self.race_window(namespace);
        if !window.is_zero() {
            tokio::time::sleep(window).await;
        }
        let name = gs.metadata.name.clone().unwrap_or_default();
        gsa.patch_metadata(&mut gs, SystemTime::now());
        // The GameServer CRD here has a status subresource (Agones' own has none): metadata
        // first, then status, each conditional on the version the previous step saw.
        let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
        let mut gs = match api.replace(&name, &PostParams::default(), &gs).await {
            Err(e) if conflict(&e) => return Ok(Outcome::Contention),
            written => written?,
        };
        gsa.patch_status(&mut gs);
        match api.replace_status(&name, &PostParams::default(), &gs).await {
            Err(e) if conflict(&e) => Ok(Outcome::Contention),
            written => Ok(Outcome::Allocated(Box::new(written?))),
        }
    }

    fn race_window(&self, namespace: &str) -> Duration {
        let windows = self.shared.race_windows.lock().unwrap();
        windows.get(namespace).copied().unwrap_or_default()
    }
}

/// The discovery document of the group.
fn api_group() -> Value {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
        "versions": [version], "preferredVersion": version})
}

/// The discovery document of the version: what the aggregator's availability check and
/// kubectl's REST mapping read.
fn api_resources() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [{"name": "gameserverallocations", "singularName": "gameserverallocation",
            "namespaced": true, "kind": "GameServerAllocation", "verbs": ["create"],
            "shortNames": ["gsa"]}]})
}

fn answer(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body.to_string()));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// A `Status` refusal, as Kubernetes API servers answer.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    answer(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// A 422 `Invalid` Status naming each invalid field, as Agones' validation answers.
fn invalid(causes: &[(String, String)]) -> Response<Full<Bytes>> {
    let code = StatusCode::UNPROCESSABLE_ENTITY;
    let message = causes
        .iter()
        .map(|(field, why)| format!("{field}: {why}"))
        .collect::<Vec<_>>()
        .join(", ");
    let causes: Vec<Value> = causes
        .iter()
        .map(|(field, why)| json!({"type": "FieldValueInvalid", "field": field, "message": why}))
        .collect();
    answer(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("GameServerAllocation is invalid: {message}"), "reason": "Invalid",
            "details": {"group": GROUP, "kind": "GameServerAllocation", "causes": causes},
            "code": code.as_u16()}),
    )
}
