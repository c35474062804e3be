//! Admin HTTP (SPEC section 8): `/metrics`, `/healthz` (every thread beating, see [`health`]),
//! `/readyz`, `GET /sessions` (paged and filtered, see [`sessions`]) and
//! `DELETE /sessions/{client}`, on hyper's HTTP/1 server.
//!
//! Health and metrics are read-only and answer anyone (probes, Prometheus). The sessions API
//! shows player addresses and ends sessions, so [`auth`] decides who gets it. Like the query
//! server, the admin server bounds what a client can hold: a header-read timeout, a cap on
//! connections in total and per source address, and a bounded read buffer per connection.

pub mod auth;
pub mod health;
pub mod sessions;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::WarnGate;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::MAX_ADMIN_CONNECTIONS;
use crate::metrics::Metrics;
use crate::query::conn_limit::ConnectionSlots;
use crate::query::director::Director;
use auth::{Authorizer, Decision, Verb};
use dataplane::ctl::ClientMatch;

/// How long a session listing waits for the workers.
const WORKER_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// A client must send a request's headers within this long (also between keep-alive requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`MAX_ADMIN_CONNECTIONS`] (a config-level limit: the descriptor budget counts it).
pub const MAX_ADMIN_CONNECTIONS_PER_IP: usize = 32;
/// Read buffer of one connection (hyper's minimum is 8 KiB): requests here are a line and a few
/// headers.
const MAX_BUF_BYTES: usize = 16 * 1024;
/// A connection ends after this long whatever it does, so a client that pipelines requests and
/// never reads the answers cannot keep its slot.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections over the caps still get `/healthz` and `/readyz` answered (so a flood of stalled
/// clients cannot make the kubelet kill a healthy proxy), by a bounded number of short-lived
/// responders: each reads one request line for at most [`OVER_CAP_DEADLINE`].
const OVER_CAP_RESPONDERS: usize = 256;
const OVER_CAP_DEADLINE: Duration = Duration::from_secs(1);

/// What the admin handlers share.
#[derive(Debug)]
pub struct Admin {
    /// Control state.
    pub director: Arc<Director>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Sessions API access.
    pub authorizer: Authorizer,
    /// This instance's forwarders, when enabled.
    pub forwarders: Option<crate::reconcile::forwarder::ForwarderTable>,
    /// This instance's routes, when entry points are configured.
    pub routes: Option<crate::reconcile::route::RouteViews>,
    /// Heartbeats of the workers and the control thread, for `/healthz`.
    pub liveness: Arc<dataplane::liveness::Liveness>,
}

impl Admin {
    /// `/healthz`: `Ok` while every thread beats under the running config's watchdog, else
    /// the body naming the stopped ones.
    fn health(&self) -> Result<(), health::Unhealthy> {
        health::verdict(&self.liveness, self.director.config().watchdog)
    }
}

/// Serves admin requests until `stop` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let slots = ConnectionSlots::new(MAX_ADMIN_CONNECTIONS, MAX_ADMIN_CONNECTIONS_PER_IP);
    let responders = Arc::new(tokio::sync::Semaphore::new(OVER_CAP_RESPONDERS));
    let mut refusal_log = WarnGate::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let slot = match slots.try_acquire(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                if let Some(note) = refusal_log.admit(Instant::now()) {
                    log::warn!("admin server: refusing {peer}: {refusal}{note}");
                }
                if let Ok(permit) = Arc::clone(&responders).try_acquire_owned() {
                    let admin = Arc::clone(&admin);
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(OVER_CAP_DEADLINE, answer_probe(stream, &admin))
                                .await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(route(req, peer.ip(), &admin).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(MAX_CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => log::debug!("admin connection {peer}: {e}"),
                Err(_) => log::debug!("admin connection {peer}: lifetime over, closed"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

/// The over-cap path: one request line, and an answer only for the probes (503 otherwise).
async fn answer_probe(stream: tokio::net::TcpStream, admin: &Admin) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut line = Vec::with_capacity(64);
    let mut reader = tokio::io::BufReader::new(read.take(1024));
    if reader.read_until(b'\n', &mut line).await.is_err() {
        return;
    }
    let (status, body) = if line.starts_with(b"GET /healthz ") {
        match admin.health() {
            Ok(()) => ("200 OK", "ok\n".to_string()),
            Err(unhealthy) => ("503 Service Unavailable", format!("{unhealthy}\n")),
        }
    } else if line.starts_with(b"GET /readyz ") && admin.director.is_ready() {
        ("200 OK", "ready\n".to_string())
    } else if line.starts_with(b"GET /readyz ") {
        ("503 Service Unavailable", "not ready\n".to_string())
    } else {
        (
            "503 Service Unavailable",
            "too many admin connections; retry later\n".to_string(),
        )
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = write.write_all(answer.as_bytes()).await;
    let _ = write.shutdown().await;
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", value.to_string())
}

/// `GET /forwarders`: this instance's view of each forwarder (what its status entry says, and
/// where each open listener forwards to). Read-only, with no player addresses.
fn list_forwarders(
    table: Option<&crate::reconcile::forwarder::ForwarderTable>,
) -> Response<Full<Bytes>> {
    let Some(table) = table else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "forwarders are not enabled (config key `forwarders`)"}),
        );
    };
    let list: Vec<serde_json::Value> = table
        .lock()
        .iter()
        .filter(|(_, v)| v.present)
        .map(|(name, v)| {
            json!({
                "name": name,
                "namespace": v.namespace,
                "ready": v.ready,
                "listening": v.listening,
                "message": v.message,
                "targets": v.targets,
            })
        })
        .collect();
    json_reply(StatusCode::OK, &serde_json::Value::Array(list))
}

/// `GET /routes`: this instance's view of each route (ready, ready endpoints, what is wrong,
/// sessions per Service). Read-only, with no player addresses.
fn list_routes(views: Option<&crate::reconcile::route::RouteViews>) -> Response<Full<Bytes>> {
    let Some(views) = views else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "routes are not enabled (config key `entryPoints`)"}),
        );
    };
    let list: Vec<serde_json::Value> = views
        .lock()
        .iter()
        .map(|((namespace, name), v)| {
            let sessions: serde_json::Map<String, serde_json::Value> = v
                .sessions
                .iter()
                .map(|(service, c)| (service.clone(), c.get().into()))
                .collect();
            json!({
                "namespace": namespace,
                "name": name,
                "entryPoint": v.entry_point,
                "ready": v.ready,
                "readyEndpoints": v.ready_endpoints,
                "message": v.message,
                "sessions": sessions,
                "rehomed": v.rehomed.iter().map(|c| c.get()).sum::<u64>(),
            })
        })
        .collect();
    json_reply(StatusCode::OK, &serde_json::Value::Array(list))
}

async fn route(req: Request<Incoming>, peer: IpAddr, admin: &Admin) -> Response<Full<Bytes>> {
    let (director, metrics) = (&admin.director, &admin.metrics);
    let path = req.uri().path();
    let verb = match (req.method(), path) {
        (&Method::GET, "/sessions") => Some(Verb::List),
        (&Method::DELETE, p) if p.starts_with("/sessions/") => Some(Verb::Delete),
        _ => None,
    };
    if let Some(verb) = verb {
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(denied) = denied(admin.authorizer.check(peer, authorization, verb).await) {
            return denied;
        }
    }
    match (req.method(), path) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => match admin.health() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n"),
            Err(unhealthy) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{unhealthy}\n"),
            ),
        },
        (&Method::GET, "/readyz") => {
            if director.is_ready() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: inventory not loaded or draining\n",
                )
            }
        }
        (&Method::GET, "/sessions") => sessions::list(director, req.uri().query()).await,
        (&Method::GET, "/forwarders") => list_forwarders(admin.forwarders.as_ref()),
        (&Method::GET, "/routes") => list_routes(admin.routes.as_ref()),
        (&Method::DELETE, p) if p.starts_with("/sessions/") => {
            kill_sessions(director, &p["/sessions/".len()..]).await
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/sessions" | "/forwarders" | "/routes") => {
            json_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method not allowed"}),
            )
        }
        _ => json_reply(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

/// Asks every worker through `ask` (which hands the reply callback to the controller and returns
/// how many workers were asked) and collects one reply per worker; `None` if one does not answer
/// in time.
async fn ask_workers<T: Send + 'static>(
    ask: impl FnOnce(Arc<dyn Fn(T) + Send + Sync>) -> usize,
) -> Option<Vec<T>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let asked = ask(Arc::new(move |reply| {
        let _ = tx.send(reply);
    }));
    let mut replies = Vec::with_capacity(asked);
    for _ in 0..asked {
        match tokio::time::timeout(WORKER_REPLY_TIMEOUT, rx.recv()).await {
            Ok(Some(reply)) => replies.push(reply),
            _ => return None,
        }
    }
    Some(replies)
}

/// The reply for a refused sessions API request; `None` when allowed.
fn denied(decision: Decision) -> Option<Response<Full<Bytes>>> {
    let (status, message) = match decision {
        Decision::Allow => return None,
        Decision::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m.to_string()),
        Decision::Forbidden(m) => (StatusCode::FORBIDDEN, m),
        Decision::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
    };
    let mut response = json_reply(status, &json!({ "error": message }));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    Some(response)
}

fn worker_silent() -> Response<Full<Bytes>> {
    json_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "a data-plane worker did not answer"}),
    )
}

/// `client` is `IP:PORT` (one client) or `IP` (every client at that address); IPv6 as
/// `[::1]:5000` or `::1`, raw or percent-encoded.
fn parse_client(text: &str) -> Option<ClientMatch> {
    let decoded = text
        .replace("%5B", "[")
        .replace("%5b", "[")
        .replace("%5D", "]")
        .replace("%5d", "]")
        .replace("%3A", ":")
        .replace("%3a", ":");
    // Sessions are keyed by canonical addresses (an IPv4 client on a dual-stack socket is its
    // IPv4 address), so a `::ffff:a.b.c.d` given here means the same client.
    if let Ok(addr) = decoded.parse::<SocketAddr>() {
        return Some(ClientMatch::Addr(SocketAddr::new(
            addr.ip().to_canonical(),
            addr.port(),
        )));
    }
    decoded
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ClientMatch::Ip(ip.to_canonical()))
}

async fn kill_sessions(director: &Director, client: &str) -> Response<Full<Bytes>> {
    let Some(matcher) = parse_client(client) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("`{}` is not IP:PORT or IP", crate::quote::quote(client))}),
        );
    };
    let Some(counts) =
        ask_workers(|reply| director.controller().kill_sessions(matcher, reply)).await
    else {
        return worker_silent();
    };
    let killed: usize = counts.into_iter().sum();
    let status = if killed == 0 {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    json_reply(status, &json!({"killed": killed}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_forms() {
        assert_eq!(
            parse_client("10.0.0.1:5000"),
            Some(ClientMatch::Addr("10.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(
            parse_client("10.0.0.1"),
            Some(ClientMatch::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse_client("%5B::1%5D%3A5000"),
            Some(ClientMatch::Addr("[::1]:5000".parse().unwrap()))
        );
        assert_eq!(
            parse_client("::1"),
            Some(ClientMatch::Ip("::1".parse().unwrap()))
        );
        assert_eq!(parse_client("nope"), None);
        assert_eq!(
            parse_client("::ffff:10.0.0.1"),
            Some(ClientMatch::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse_client("[::ffff:10.0.0.1]:5000"),
            Some(ClientMatch::Addr("10.0.0.1:5000".parse().unwrap()))
        );
    }
}
