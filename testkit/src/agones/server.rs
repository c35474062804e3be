//! The stand-in's HTTPS server: TLS that admits only the API server's aggregator, the
//! discovery documents, and the create of GameServerAllocations, allocated over the real
//! GameServer objects through the API server as its admin. Runs on a thread and a
//! current-thread runtime of its own; never panics on a request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use serde_json::{Map, Value, json};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::allocation::{GameServerAllocation, allocated_status, rfc3339};
use super::{AllocationRecord, GROUP, StandInError, VERSION, client_for};

/// Request bodies beyond this are refused unread.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What the server thread shares with the stand-in's owner.
#[derive(Debug, Default)]
pub(super) struct Shared {
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

impl Shared {
    pub(super) fn set_race_window(&self, namespace: &str, window: Duration) {
        lock(&self.race_windows).insert(namespace.to_string(), window);
    }

    /// The create requests served for `namespace`, oldest first.
    pub(super) fn requests(&self, namespace: &str) -> Vec<AllocationRecord> {
        lock(&self.log)
            .iter()
            .filter(|r| r.namespace == namespace)
            .cloned()
            .collect()
    }

    fn race_window(&self, namespace: &str) -> Duration {
        lock(&self.race_windows)
            .get(namespace)
            .copied()
            .unwrap_or_default()
    }
}

/// A lock whose holder never panics midway (each critical section is one map or vector
/// operation), so a poisoned one is as good as any.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// TLS for the listener: a fresh self-signed certificate (the `APIService` skips verifying
/// it), and client certificates required from the front-proxy CA in `run`, so only the API
/// server's aggregator, which vouches for the caller in `X-Remote-User`, is served.
pub(super) fn tls_config(
    run: &Path,
    ip: IpAddr,
) -> Result<Arc<rustls::ServerConfig>, StandInError> {
    let front_proxy_ca = run.join("front-proxy-ca.crt");
    if !front_proxy_ca.exists() {
        return Err(StandInError::NoAggregationLayer { ca: front_proxy_ca });
    }
    let failed = |reason: String| StandInError::Failed { reason };
    let dir = std::env::temp_dir().join(format!("udp-director-standin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
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
        .map_err(|e| StandInError::Unavailable {
            reason: format!("openssl: {e}"),
        })?;
    if !made.status.success() {
        return Err(failed(format!(
            "openssl req: {}",
            String::from_utf8_lossy(&made.stderr)
        )));
    }
    let pem_certs = |path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, StandInError> {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| failed(format!("{}: {e}", path.display())))
    };
    let tls = |e: rustls::Error| failed(format!("the stand-in's TLS: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs(&front_proxy_ca)? {
        roots.add(ca).map_err(tls)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| failed(format!("the stand-in's client verifier: {e}")))?;
    let private_key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| failed(format!("{}: {e}", key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&cert)?, private_key)
        .map_err(tls)?;
    // Read into memory: the files are not needed again.
    let _ = std::fs::remove_dir_all(&dir);
    // HTTP/1.1 only: the aggregator would otherwise speak HTTP/2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server thread: a runtime of its own, an admin client, then TLS connections served
/// until the process ends. Says on `ready` whether the client could be made.
pub(super) fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    kubeconfig: &Path,
    ready: &mpsc::Sender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(format!("a runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let client = match client_for(kubeconfig).await {
            Ok(client) => client,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(format!("the listener: {e}")));
                return;
            }
        };
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
                    lock(&self.shared.log).push(record);
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
        let window = self.shared.race_window(namespace);
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
        .insert("content-type", HeaderValue::from_static("application/json"));
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
