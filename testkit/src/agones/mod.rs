//! A STAND-IN for Agones' allocation API, `allocation.agones.dev/v1` GameServerAllocations
//! (create only), for tests and benchmarks of the proxy's allocation: Agones itself cannot run
//! here. It is registered with a real kube-apiserver (the one `scripts/k8s-apiserver.sh start
//! RUN_DIR` runs) through the aggregation layer (an `APIService`), so callers reach it as they
//! would reach Agones: through the API server, with its authentication and RBAC. It follows
//! Agones' documented allocation semantics over the real GameServer objects (ordered selectors,
//! Ready → Allocated written through the API, counter backfill and actions, the metadata patch,
//! `UnAllocated`, `Contention`) and nothing more: no fleets, priorities, lists, player tracking,
//! multi-cluster or batching, and candidates are taken in name order. It is not Agones and must
//! not be mistaken for a check of Agones.
//!
//! The API server refuses loopback Endpoints, so the stand-in listens in a network namespace of
//! its own, joined to this host by a veth pair (`netns`); the kernel removes both with the
//! process. It serves only the API server's aggregator (TLS client certificates from the
//! front-proxy CA), which has authenticated and authorized the caller already (`server`).
//!
//! One stand-in per process. The `APIService` is cluster-wide: each `start` points it at this
//! process (when another process took it meanwhile), and at exit the process removes it if it
//! is still the one served, since an `APIService` whose server is gone breaks every client's API
//! discovery. Two processes using the stand-in at once take it from each other.

mod allocation;
mod kubectl;
mod netns;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use kube::api::PostParams;
use serde_json::{Value, json};

use kubectl::Kubectl;
use server::Shared;

/// The API group the stand-in serves.
pub const GROUP: &str = "allocation.agones.dev";
/// The version of [`GROUP`] the stand-in serves.
pub const VERSION: &str = "v1";
/// Where its Service and Endpoints live, as Agones' do.
const NAMESPACE: &str = "agones-system";
const SERVICE: &str = "agones-allocator-standin";
const API_SERVICE: &str = "v1.allocation.agones.dev";
/// The annotation Agones stamps on every allocation (RFC 3339).
pub const LAST_ALLOCATED: &str = "agones.dev/last-allocated";
/// How long registration may take until a create through the API server reaches this process.
const REGISTERED_WITHIN: Duration = Duration::from_secs(60);

/// The stand-in: where it listens, and what it has served.
#[derive(Debug)]
pub struct AgonesAllocatorStandIn {
    /// Where the API server reaches it (an address in its network namespace).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Held while (re-)registering, so parallel callers wait for one registration; true once
    /// a registration was seen to route here.
    registering: Mutex<bool>,
}

/// Why [`AgonesAllocatorStandIn::start`] gave no stand-in.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StandInError {
    /// It cannot run on this machine: it needs root for its network namespace, and `ip` and
    /// `openssl`. Tests skip on this.
    #[error("no stand-in for Agones' allocation API: {reason}")]
    Unavailable {
        /// What was missing or refused.
        reason: String,
    },
    /// The API server runs without the aggregation layer: no front-proxy CA in its run
    /// directory (scripts/k8s-apiserver.sh start RUN_DIR makes one).
    #[error(
        "{} is missing: the API server runs without the aggregation layer; restart it with \
         scripts/k8s-apiserver.sh start RUN_DIR",
        ca.display()
    )]
    NoAggregationLayer {
        /// The front-proxy CA that should be there.
        ca: PathBuf,
    },
    /// Something it needs failed: its certificate, its runtime, its API client.
    #[error("the stand-in for Agones' allocation API failed to start: {reason}")]
    Failed {
        /// What failed.
        reason: String,
    },
    /// It runs, but the API server did not route its group to it in time (no aggregation
    /// layer, or the `APIService` could not be written).
    #[error(
        "the API server did not route {GROUP}/{VERSION} to the stand-in at {addr} within \
         {REGISTERED_WITHIN:?} (is the aggregation layer on? scripts/k8s-apiserver.sh start \
         turns it on); last attempt: {last}; APIService status: {api_service_status}"
    )]
    NotRouted {
        /// Where the stand-in listens.
        addr: SocketAddr,
        /// What the last attempt got.
        last: String,
        /// The `APIService`'s status as the API server reports it.
        api_service_status: Value,
    },
}

/// One create request the stand-in received from the API server.
#[derive(Clone, Debug)]
pub struct AllocationRecord {
    /// The caller, as the API server vouched for it (`X-Remote-User`).
    pub user: String,
    /// The caller's groups (`X-Remote-Group`).
    pub groups: Vec<String>,
    /// The namespace the allocation was created in.
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
    /// The `Status`'s reason (`Forbidden`, `Invalid`...).
    pub reason: String,
    /// The `Status`'s message.
    pub message: String,
}

impl AgonesAllocatorStandIn {
    /// This process's stand-in, registered with the API server whose run directory is `run`
    /// (its admin kubeconfig is `run/kubeconfig`, the front-proxy CA `run/front-proxy-ca.crt`)
    /// and reachable through it. The first call launches it; every call makes sure the
    /// `APIService` still routes here.
    pub fn start(run: &Path) -> Result<&'static Self, StandInError> {
        static STANDIN: OnceLock<Result<AgonesAllocatorStandIn, StandInError>> = OnceLock::new();
        match STANDIN.get_or_init(|| Self::launch(run)) {
            Ok(standin) => standin.register(&Kubectl::admin(run)).map(|()| standin),
            Err(e) => Err(e.clone()),
        }
    }

    /// Makes allocations in `namespace` pause for `window` between reading the GameServer they
    /// chose and writing it, so two of them racing for the last server reliably conflict: one
    /// is Allocated, the other answered `Contention` (the stand-in does not retry).
    pub fn set_race_window(&self, namespace: &str, window: Duration) {
        self.shared.set_race_window(namespace, window);
    }

    /// The create requests served for `namespace`, oldest first.
    pub fn requests(&self, namespace: &str) -> Vec<AllocationRecord> {
        self.shared.requests(namespace)
    }

    /// How many requests for `namespace` allocated a GameServer.
    pub fn allocations(&self, namespace: &str) -> usize {
        self.requests(namespace)
            .iter()
            .filter(|r| r.state == "Allocated")
            .count()
    }

    /// Opens the listener in its own network namespace and starts serving on a thread of its
    /// own.
    fn launch(run: &Path) -> Result<Self, StandInError> {
        let listener =
            netns::listen_in_own_netns().map_err(|reason| StandInError::Unavailable { reason })?;
        let failed = |reason: String| StandInError::Failed { reason };
        let addr = listener.local_addr().map_err(|e| failed(e.to_string()))?;
        let tls = server::tls_config(run, addr.ip())?;
        if DEREGISTER.set((run.to_path_buf(), addr)).is_ok() {
            // SAFETY: atexit(3) with a function that takes and returns nothing; it is registered
            // once, and touches nothing that exit tears down before it runs.
            unsafe { libc::atexit(deregister_at_exit) };
        }
        let shared = Arc::new(Shared::default());
        let kubeconfig = Kubectl::admin(run).kubeconfig;
        let (ready_tx, ready_rx) = mpsc::channel();
        let for_server = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agones-standin".into())
            .spawn(move || server::serve(listener, tls, for_server, &kubeconfig, &ready_tx))
            .map_err(|e| failed(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("the stand-in's API client: {e}")))?;
        Ok(Self {
            addr,
            shared,
            registering: Mutex::new(false),
        })
    }

    /// Points the `APIService` at this process (unless it already is) and waits until a create
    /// through the API server reaches this stand-in.
    fn register(&self, kubectl: &Kubectl) -> Result<(), StandInError> {
        // A caller that failed registering leaves the flag false: the next one tries again.
        let mut registered = self
            .registering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *registered && routed_here(kubectl, self.addr) {
            return Ok(());
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
        let not_routed = |last: String| StandInError::NotRouted {
            addr: self.addr,
            last,
            api_service_status: kubectl.get_json("apiservice", API_SERVICE)["status"].clone(),
        };
        if let Err(e) = kubectl.run(&["apply", "-f", "-"], Some(&yaml)) {
            return Err(not_routed(format!("kubectl apply: {e}")));
        }
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
            match create_allocation(&kubectl.kubeconfig, NAMESPACE, &probe) {
                Ok(_) if self.requests(NAMESPACE).iter().any(|r| r.name == name) => {
                    *registered = true;
                    return Ok(());
                }
                Ok(answer) => last = format!("answered elsewhere: {answer}"),
                Err(refusal) => last = format!("{refusal:?}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(not_routed(last))
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
        let kubectl = Kubectl::admin(run);
        if routed_here(&kubectl, *addr) {
            let _ = kubectl.run(&["delete", "apiservice", API_SERVICE, "--wait=false"], None);
        }
    });
}

/// Whether the `APIService` exists and its Service's Endpoints are `addr`.
fn routed_here(kubectl: &Kubectl, addr: SocketAddr) -> bool {
    let api_service = format!("apiservice/{API_SERVICE}");
    let endpoints = format!("endpoints/{SERVICE}");
    let Ok(out) = kubectl.run(
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
    let refused = |message: String| Refusal {
        code: 0,
        reason: String::new(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| refused(e.to_string()))?;
    runtime.block_on(async {
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
