//! Admin HTTP (SPEC section 8): `/metrics`, `/healthz`, `/readyz`, `GET /sessions` and
//! `DELETE /sessions/{client}`, on hyper's HTTP/1 server.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::director::Director;
use crate::metrics::Metrics;
use dataplane::ctl::ClientMatch;

/// How long a session listing waits for the workers.
const WORKER_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves admin requests until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    director: Arc<Director>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let director = Arc::clone(&director);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let director = Arc::clone(&director);
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(route(req, &director, &metrics).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("admin connection: {e}");
            }
        });
    }
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

async fn route(
    req: Request<Incoming>,
    director: &Director,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
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
        (&Method::GET, "/sessions") => list_sessions(director).await,
        (&Method::DELETE, p) if p.starts_with("/sessions/") => {
            kill_sessions(director, &p["/sessions/".len()..]).await
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/sessions") => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed"}),
        ),
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

fn worker_silent() -> Response<Full<Bytes>> {
    json_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "a data-plane worker did not answer"}),
    )
}

async fn list_sessions(director: &Director) -> Response<Full<Bytes>> {
    let Some(lists) = ask_workers(|reply| director.controller().list_sessions(reply)).await else {
        return worker_silent();
    };
    let mut sessions: Vec<_> = lists.into_iter().flatten().collect();
    sessions.sort_by_key(|s| (s.client, s.data_port));
    let body: Vec<serde_json::Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "client": s.client.to_string(),
                "dataPort": director.data_port_name(s.data_port),
                "target": s.target.to_string(),
                "kind": s.kind.as_str(),
                "worker": s.worker,
                "ageSeconds": s.age.as_secs_f64(),
                "idleSeconds": s.idle.as_secs_f64(),
                "packetsUpstream": s.stats.packets_upstream,
                "bytesUpstream": s.stats.bytes_upstream,
                "packetsDownstream": s.stats.packets_downstream,
                "bytesDownstream": s.stats.bytes_downstream,
            })
        })
        .collect();
    json_reply(StatusCode::OK, &serde_json::Value::Array(body))
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
    if let Ok(addr) = decoded.parse::<SocketAddr>() {
        return Some(ClientMatch::Addr(addr));
    }
    decoded
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(ClientMatch::Ip)
}

async fn kill_sessions(director: &Director, client: &str) -> Response<Full<Bytes>> {
    let Some(matcher) = parse_client(client) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("`{client}` is not IP:PORT or IP")}),
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
    }
}
