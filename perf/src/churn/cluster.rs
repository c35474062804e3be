//! The API server side of `churn`: finding or starting the kube-apiserver, the client and the
//! runtime it runs on, the objects the run creates, and deleting them again.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};

use super::ChurnArgs;

/// The kube-apiserver: one already running, or one started here (stopped when dropped).
#[derive(Debug)]
pub(super) struct ApiServer {
    pub(super) run: PathBuf,
    /// The script that started it, when this run did.
    started_by: Option<PathBuf>,
}

impl ApiServer {
    pub(super) fn find_or_start(args: &ChurnArgs) -> anyhow::Result<Self> {
        if let Some(run) = &args.k8s_run {
            if !run.join("kubeconfig").exists() {
                bail!(
                    "no kubeconfig in {} (start one: scripts/k8s-apiserver.sh start {0})",
                    run.display()
                );
            }
            return Ok(Self {
                run: run.clone(),
                started_by: None,
            });
        }
        let port: u16 = std::env::var("K8S_API_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(6443);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            bail!(
                "something already listens on {addr} (an API server?): pass --k8s-run DIR or set \
                 UDP_DIRECTOR_K8S_RUN to use it"
            );
        }
        let run = std::env::temp_dir().join(format!("udp-director-churn-{}", std::process::id()));
        eprintln!("churn: starting an API server in {}", run.display());
        let out = Command::new(&args.k8s_script)
            .arg("start")
            .arg(&run)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", args.k8s_script.display()))?;
        let server = Self {
            run,
            started_by: Some(args.k8s_script.clone()),
        };
        if !out.status.success() {
            bail!(
                "{} start failed: {}{}",
                args.k8s_script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(server)
    }

    /// Whether this run started it (and stops it).
    pub(super) fn started_here(&self) -> bool {
        self.started_by.is_some()
    }

    /// A process of the API server's (`apiserver` or `etcd`), from its pid file.
    pub(super) fn pid(&self, which: &str) -> Option<u32> {
        std::fs::read_to_string(self.run.join(format!("{which}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(script) = &self.started_by {
            let _ = Command::new(script)
                .arg("stop")
                .arg(&self.run)
                .stdout(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.run);
        }
    }
}

/// A current-thread tokio runtime driven by a thread of its own, so that plain threads can
/// run API calls on it ([`Runtime::block_on`]) and spawn tasks that keep running meanwhile.
pub(super) struct Runtime {
    pub(super) handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    driver: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    pub(super) fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::Builder::new()
            .name("churn-kube".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            driver: Some(driver),
        })
    }

    /// Runs `future` to completion from a plain thread (the driver thread does its I/O).
    pub(super) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub(super) fn gameservers() -> ApiResource {
    resource("agones.dev", "v1", "GameServer", "gameservers")
}

pub(super) fn forwarders() -> ApiResource {
    resource("udp-director.dev", "v1alpha1", "Forwarder", "forwarders")
}

fn routes() -> ApiResource {
    resource("udp-director.dev", "v1alpha1", "Route", "routes")
}

fn services() -> ApiResource {
    resource("", "v1", "Service", "services")
}

fn endpoint_slices() -> ApiResource {
    resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
}

fn leases() -> ApiResource {
    resource("coordination.k8s.io", "v1", "Lease", "leases")
}

/// The label of the forwarders a window creates (`key=value`), so a rerun deletes them.
pub(super) const CHANGE_LABEL: &str = "udp-director.dev/churn=change";

/// The entry point the routes are on.
pub(super) const ENTRY_POINT: &str = "churn";

/// The namespace the run fills, and the client it writes with.
pub(super) struct Cluster {
    client: kube::Client,
    pub(super) namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// One object to create (a GameServer's status is patched right after).
#[derive(Clone, Copy, Debug)]
enum Job {
    Service(usize),
    Slice(usize),
    Route(usize),
    Forwarder(usize),
    GameServer(usize),
}

impl Cluster {
    /// A client of the API server `kubeconfig` names, for objects in `namespace`.
    pub(super) async fn connect(kubeconfig: &Path, namespace: String) -> anyhow::Result<Self> {
        let file = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
        // A delete of the whole collection of 10,000 GameServers takes a while.
        config.read_timeout = Some(Duration::from_secs(600));
        let client = kube::Client::try_from(config)?;
        Ok(Self { client, namespace })
    }

    pub(super) fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, resource)
    }

    /// Creates the namespace and everything in it; returns the API writes done. In a kept
    /// namespace (a rerun with `--keep`), what points at the echo server is updated, the
    /// GameServers are Ready again, and the forwarders an earlier window created are deleted.
    pub(super) async fn populate(
        &self,
        args: &ChurnArgs,
        ports: &[u16],
        echo: SocketAddr,
    ) -> anyhow::Result<usize> {
        let namespaces = Api::<DynamicObject>::all_with(
            self.client.clone(),
            &resource("", "v1", "Namespace", "namespaces"),
        );
        create(
            &namespaces,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}),
        )
        .await?;
        self.api(&forwarders())
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(CHANGE_LABEL),
            )
            .await
            .context("deleting an earlier window's forwarders")?;
        let jobs = (0..args.routes)
            .flat_map(|i| [Job::Service(i), Job::Slice(i), Job::Route(i)])
            .chain((0..args.forwarders).map(Job::Forwarder))
            .chain((0..args.gameservers).map(Job::GameServer));
        let total = 3 * args.routes + args.forwarders + 2 * args.gameservers;
        let apis = [
            self.api(&services()),
            self.api(&endpoint_slices()),
            self.api(&routes()),
            self.api(&forwarders()),
            self.api(&gameservers()),
        ];
        let ns = &self.namespace;
        let mut results = futures::stream::iter(jobs)
            .map(|job| {
                let apis = &apis;
                async move {
                    match job {
                        Job::Service(i) => create(&apis[0], service(ns, i)).await.map(|()| 1),
                        Job::Slice(i) => apply(&apis[1], slice(ns, i, echo)).await.map(|()| 1),
                        Job::Route(i) => create(&apis[2], route(ns, i)).await.map(|()| 1),
                        Job::Forwarder(i) => {
                            let f = forwarder(ns, &format!("fwd-{i}"), ports[i], echo, json!({}));
                            apply(&apis[3], f).await.map(|()| 1)
                        }
                        Job::GameServer(i) => {
                            create(&apis[4], gameserver(ns, i, args.fleets)).await?;
                            patch_status(&apis[4], &format!("gs-{i}"), gameserver_status(i))
                                .await?;
                            Ok(2)
                        }
                    }
                }
            })
            .buffer_unordered(args.concurrency.max(1));
        let began = Instant::now();
        let mut last_said = Instant::now();
        let mut done = 0;
        while let Some(result) = results.next().await {
            done += result?;
            if last_said.elapsed() >= Duration::from_secs(10) {
                last_said = Instant::now();
                eprintln!(
                    "churn: {done} of {total} API writes, {:.0}/s",
                    done as f64 / began.elapsed().as_secs_f64()
                );
            }
        }
        Ok(done)
    }

    /// Deletes everything the run created, and the namespace. No controller-manager runs
    /// beside this API server, so nothing would empty the namespace on its own: each kind is
    /// deleted here, and the namespace is finalized by hand.
    pub(super) async fn delete_all(&self) -> anyhow::Result<()> {
        let all = ListParams::default();
        let everything = DeleteParams::default();
        for r in [
            gameservers(),
            forwarders(),
            routes(),
            endpoint_slices(),
            leases(),
        ] {
            self.api(&r)
                .delete_collection(&everything, &all)
                .await
                .with_context(|| format!("deleting every {}", r.kind))?;
        }
        // A 1.20 API server cannot delete a collection of Services.
        let api = self.api(&services());
        for s in api.list_metadata(&all).await?.items {
            if let Some(name) = s.metadata.name {
                api.delete(&name, &everything).await?;
            }
        }
        let namespaces = Api::<DynamicObject>::all_with(
            self.client.clone(),
            &resource("", "v1", "Namespace", "namespaces"),
        );
        namespaces.delete(&self.namespace, &everything).await?;
        let finalized = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": self.namespace}, "spec": {"finalizers": []}});
        namespaces
            .replace_subresource(
                "finalize",
                &self.namespace,
                &PostParams::default(),
                &finalized,
            )
            .await?;
        Ok(())
    }
}

/// Creates `object`; one that already exists (a rerun on a kept namespace) is left as it is.
pub(super) async fn create(api: &Api<DynamicObject>, object: Value) -> anyhow::Result<()> {
    let object: DynamicObject = serde_json::from_value(object)?;
    let name = object.metadata.name.clone().unwrap_or_default();
    with_retries(&format!("creating {name}"), || async {
        match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            result => result.map(drop),
        }
    })
    .await
}

/// Creates `object` or makes an existing one (a rerun on a kept namespace) say what it says:
/// a server-side apply. For what points at this run's echo server, whose port is new each run.
async fn apply(api: &Api<DynamicObject>, object: Value) -> anyhow::Result<()> {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let params = PatchParams::apply("udp-director-perf").force();
    with_retries(&format!("applying {name}"), || async {
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(drop)
    })
    .await
}

/// A merge patch of `name`'s status.
async fn patch_status(api: &Api<DynamicObject>, name: &str, status: Value) -> anyhow::Result<()> {
    with_retries(&format!("patching the status of {name}"), || async {
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map(drop)
    })
    .await
}

/// Runs `call`, again after a pause when it fails (an API server this busy may refuse for a
/// moment), up to five more times.
async fn with_retries<F, Fut>(what: &str, call: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                if attempt == 1 {
                    eprintln!("churn: {what}: retrying after: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => return Err(e).context(what.to_owned()),
        }
    }
}

fn gameserver(ns: &str, i: usize, fleets: usize) -> Value {
    json!({"apiVersion": "agones.dev/v1", "kind": "GameServer",
        "metadata": {"name": format!("gs-{i}"), "namespace": ns,
            "labels": {"agones.dev/fleet": format!("fleet-{}", i % fleets)}},
        "spec": {"ports": [{"name": "default", "containerPort": 7777}]}})
}

/// A Ready GameServer's status: an address of its own (10.x.y.z) and one port.
fn gameserver_status(i: usize) -> Value {
    let address = format!("10.{}.{}.{}", 1 + i / 65_536, i / 256 % 256, i % 256);
    json!({"status": {"state": "Ready", "address": address,
        "ports": [{"name": "default", "port": 7777}]}})
}

/// A UDP forwarder on `port` to the echo server; `labels` for one the window creates.
pub(super) fn forwarder(ns: &str, name: &str, port: u16, echo: SocketAddr, labels: Value) -> Value {
    json!({"apiVersion": "udp-director.dev/v1alpha1", "kind": "Forwarder",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"udp": {"listenPort": port, "targetHost": echo.ip().to_string(),
            "targetPort": echo.port()}}})
}

fn service(ns: &str, i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": ns},
        "spec": {"ports": [{"name": "echo", "port": 5000, "protocol": "UDP"}]}})
}

fn slice(ns: &str, i: usize, echo: SocketAddr) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": ns,
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "echo", "port": echo.port(), "protocol": "UDP"}],
        "endpoints": [{"addresses": [echo.ip().to_string()], "conditions": {"ready": true}}]})
}

/// Route `i` takes the clients of its own /24 (10.a.b.0/24), so no route hides another.
fn route(ns: &str, i: usize) -> Value {
    let cidr = format!("10.{}.{}.0/24", i / 256 % 256, i % 256);
    json!({"apiVersion": "udp-director.dev/v1alpha1", "kind": "Route",
        "metadata": {"name": format!("route-{i}"), "namespace": ns},
        "spec": {"entryPoint": ENTRY_POINT, "rules": [{"match": {"sourceCidrs": [cidr]},
            "backends": [{"service": format!("svc-{i}"), "port": "echo"}]}]}})
}
