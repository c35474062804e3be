//! `GET /sessions`: one page of the live sessions, filtered, in a stable order.
//!
//! Paging mirrors Kubernetes list paging: `limit` sessions per page, and an opaque `continue`
//! token in every page but the last that names where the next one starts. Pages follow
//! [`SessionOrder`] (client address, listener, worker) and the token holds the last session's
//! place, so a table that changes between calls neither repeats nor skips a session that lived
//! throughout. Each worker answers with its own first `limit` matching sessions after the
//! token, in order; they are merged here and cut to `limit`, so a call never holds more than
//! `limit` sessions per worker, however many there are.

use std::collections::BinaryHeap;
use std::net::IpAddr;

use dataplane::SessionInfo;
use dataplane::ctl::{ClientMatch, SessionOrder, SessionPage, SessionQuery};
use http_body_util::Full;
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Bytes;
use serde_json::json;

use super::{ask_workers, json_reply, parse_client, worker_silent};
use crate::query::director::Director;

/// Sessions per page when the request names no `limit`.
pub const DEFAULT_LIMIT: usize = 500;
/// The largest `limit` a request may ask for.
pub const MAX_LIMIT: usize = 5000;
/// First byte of a continue token: its layout, so a later one can change it.
const TOKEN_VERSION: u8 = 1;

/// What a `GET /sessions` request asks for, read from its query string.
#[derive(Debug, Eq, PartialEq)]
struct Request {
    limit: usize,
    after: Option<SessionOrder>,
    /// A data port's name or a listener's owner, as the listing shows them.
    listener: Option<String>,
    client: Option<ClientMatch>,
    backend: Option<ClientMatch>,
}

/// A query parameter the request got wrong.
#[derive(Debug, Eq, PartialEq)]
struct BadParameter {
    name: String,
    message: String,
}

impl BadParameter {
    fn new(name: &str, message: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            message: message.into(),
        }
    }
}

/// `GET /sessions?…`: the page the query string asks for, or 400 naming the parameter.
pub(super) async fn list(director: &Director, query: Option<&str>) -> Response<Full<Bytes>> {
    let request = match parse_request(query.unwrap_or("")) {
        Ok(r) => r,
        Err(bad) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                &json!({
                    "error": format!("query parameter `{}`: {}", bad.name, bad.message),
                    "parameter": bad.name,
                }),
            );
        }
    };
    let controller = director.controller();
    let owners = controller.listener_owners();
    let config = director.config();
    let listeners = request.listener.as_deref().map(|wanted| {
        let data_ports = config
            .data_ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.name == wanted)
            .filter_map(|(i, _)| u16::try_from(i).ok());
        let owned = owners
            .iter()
            .filter(|(_, owner)| owner == wanted)
            .map(|(id, _)| id.0);
        let mut ids: Vec<u16> = data_ports.chain(owned).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    });
    let query = SessionQuery {
        after: request.after,
        limit: request.limit,
        listeners,
        client: request.client,
        backend: request.backend,
    };
    let Some(pages) = ask_workers(|reply| controller.list_session_page(query.clone(), reply)).await
    else {
        return worker_silent();
    };
    let page = merge(pages, request.limit);
    // By listener id: a page looks each session's up once.
    let mut owner_by_id: Vec<&str> = Vec::new();
    for (id, owner) in &owners {
        let id = usize::from(id.0);
        if owner_by_id.len() <= id {
            owner_by_id.resize(id + 1, "?");
        }
        owner_by_id[id] = owner;
    }
    let owner_of = |id: usize| owner_by_id.get(id).copied().unwrap_or("?");
    let sessions: Vec<serde_json::Value> = page
        .sessions
        .iter()
        .map(|s| {
            json!({
                "client": s.client.to_string(),
                "dataPort": director.data_port_name(s.data_port),
                "listener": owner_of(s.data_port),
                "protocol": s.protocol.as_str(),
                "target": s.target.to_string(),
                "origin": s.kind.as_str(),
                "worker": s.worker,
                "ageSeconds": s.age.as_secs_f64(),
                "idleSeconds": s.idle.as_secs_f64(),
                "packetsUpstream": s.stats.packets_upstream,
                "bytesUpstream": s.stats.bytes_upstream,
                "packetsDownstream": s.stats.packets_downstream,
                "bytesDownstream": s.stats.bytes_downstream,
                "offloaded": s.offloaded,
            })
        })
        .collect();
    let remaining = page.matched.saturating_sub(page.sessions.len());
    let mut body = json!({ "sessions": sessions, "remaining": remaining });
    if remaining > 0
        && let Some(last) = page.sessions.last()
    {
        body["continue"] = encode_token(last.order()).into();
    }
    json_reply(StatusCode::OK, &body)
}

/// Reads `limit`, `continue`, `listener`, `backend` and `client`; anything else, a parameter
/// given twice or a value that does not parse is refused, naming the parameter.
fn parse_request(query: &str) -> Result<Request, BadParameter> {
    let mut request = Request {
        limit: DEFAULT_LIMIT,
        after: None,
        listener: None,
        client: None,
        backend: None,
    };
    let mut seen: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(raw_name)
            .ok_or_else(|| BadParameter::new(raw_name, "not valid percent-encoded UTF-8"))?;
        let name = name.as_str();
        let value = decode_component(raw_value)
            .ok_or_else(|| BadParameter::new(name, "not valid percent-encoded UTF-8"))?;
        if seen.iter().any(|s| s == name) {
            return Err(BadParameter::new(name, "given more than once"));
        }
        match name {
            "limit" => {
                request.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        BadParameter::new(name, format!("must be a whole number 1 to {MAX_LIMIT}"))
                    })?;
            }
            "continue" => {
                request.after = Some(decode_token(&value).ok_or_else(|| {
                    BadParameter::new(name, "not a token from a previous page's `continue`")
                })?);
            }
            "listener" => {
                if value.is_empty() {
                    return Err(BadParameter::new(name, "empty"));
                }
                request.listener = Some(value);
            }
            "client" | "backend" => {
                let matcher = parse_client(&value)
                    .ok_or_else(|| BadParameter::new(name, "must be IP:PORT or IP"))?;
                if name == "client" {
                    request.client = Some(matcher);
                } else {
                    request.backend = Some(matcher);
                }
            }
            _ => {
                return Err(BadParameter::new(
                    name,
                    "unknown (known: limit, continue, listener, backend, client)",
                ));
            }
        }
        seen.push(name.to_string());
    }
    Ok(request)
}

/// A query string component with `%XX` escapes and `+` (a space) decoded; `None` if an escape
/// is malformed or the bytes are not UTF-8.
fn decode_component(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match b {
            b'%' => {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// The continue token naming `at`: version, address family, IP, client port, listener and
/// worker, in hex. Opaque to clients; only [`decode_token`] reads it.
fn encode_token(at: SessionOrder) -> String {
    let mut bytes = vec![TOKEN_VERSION];
    match at.ip {
        IpAddr::V4(ip) => {
            bytes.push(4);
            bytes.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            bytes.push(6);
            bytes.extend_from_slice(&ip.octets());
        }
    }
    bytes.extend_from_slice(&at.port.to_be_bytes());
    bytes.extend_from_slice(&at.listener.to_be_bytes());
    bytes.extend_from_slice(&at.worker.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The place a token from [`encode_token`] names; `None` for anything else.
fn decode_token(token: &str) -> Option<SessionOrder> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect::<Option<_>>()?;
    let (&version, rest) = bytes.split_first()?;
    let (&family, rest) = rest.split_first()?;
    if version != TOKEN_VERSION {
        return None;
    }
    let (ip, rest): (IpAddr, &[u8]) = match family {
        4 if rest.len() == 4 + 8 => {
            let (ip, rest) = rest.split_at(4);
            (<[u8; 4]>::try_from(ip).ok()?.into(), rest)
        }
        6 if rest.len() == 16 + 8 => {
            let (ip, rest) = rest.split_at(16);
            (<[u8; 16]>::try_from(ip).ok()?.into(), rest)
        }
        _ => return None,
    };
    let port = u16::from_be_bytes(rest[0..2].try_into().ok()?);
    let listener = u16::from_be_bytes(rest[2..4].try_into().ok()?);
    let worker = u32::from_be_bytes(rest[4..8].try_into().ok()?);
    Some(SessionOrder {
        ip: ip.to_canonical(),
        port,
        listener,
        worker,
    })
}

/// The first `limit` sessions of the workers' pages (each in order) in order, and how many
/// matched on all workers together: a k-way merge that looks at no more than it keeps.
fn merge(pages: Vec<SessionPage>, limit: usize) -> SessionPage {
    let matched = pages.iter().map(|p| p.matched).sum();
    let mut pages: Vec<std::vec::IntoIter<SessionInfo>> =
        pages.into_iter().map(|p| p.sessions.into_iter()).collect();
    // Min-heap of each page's next session: (place, page).
    let mut heads = BinaryHeap::new();
    let mut next = vec![None; pages.len()];
    for (i, page) in pages.iter_mut().enumerate() {
        if let Some(s) = page.next() {
            heads.push(std::cmp::Reverse((s.order(), i)));
            next[i] = Some(s);
        }
    }
    let mut sessions = Vec::with_capacity(limit.min(matched));
    while sessions.len() < limit {
        let Some(std::cmp::Reverse((_, i))) = heads.pop() else {
            break;
        };
        if let Some(s) = next[i].take() {
            sessions.push(s);
        }
        if let Some(s) = pages[i].next() {
            heads.push(std::cmp::Reverse((s.order(), i)));
            next[i] = Some(s);
        }
    }
    SessionPage { sessions, matched }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::policy::session::SessionStats;
    use dataplane::{BackendId, SessionKind, Transport};
    use std::net::SocketAddr;
    use std::time::Duration;

    fn session(client: &str, listener: usize, worker: usize) -> SessionInfo {
        SessionInfo {
            worker,
            client: client.parse().unwrap(),
            data_port: listener,
            protocol: Transport::Udp,
            target: "192.0.2.1:7777".parse().unwrap(),
            backend: BackendId(1),
            kind: SessionKind::Token,
            age: Duration::ZERO,
            idle: Duration::ZERO,
            stats: SessionStats::default(),
            offloaded: false,
        }
    }

    fn page(sessions: Vec<SessionInfo>, matched: usize) -> SessionPage {
        SessionPage { sessions, matched }
    }

    #[test]
    fn tokens_round_trip_and_nothing_else_decodes() {
        for at in [
            SessionOrder::new("10.0.0.1:5000".parse().unwrap(), 3, 1),
            SessionOrder::new("[2001:db8::1]:65535".parse().unwrap(), u16::MAX, 0),
            SessionOrder::new("0.0.0.0:0".parse().unwrap(), 0, 31),
        ] {
            let token = encode_token(at);
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
            assert_eq!(decode_token(&token), Some(at));
        }
        let good = encode_token(SessionOrder::new("10.0.0.1:5000".parse().unwrap(), 3, 1));
        for bad in [
            "",
            "0",
            "zz",
            "01",
            &good[..good.len() - 2],
            &format!("{good}00"),
            &format!("02{}", &good[2..]),
            &format!("0105{}", &good[4..]),
            "é",
        ] {
            assert_eq!(decode_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn merge_interleaves_sorted_pages_and_cuts_to_the_limit() {
        let w0 = page(
            vec![
                session("10.0.0.1:1", 0, 0),
                session("10.0.0.1:4", 0, 0),
                session("10.0.0.2:1", 0, 0),
            ],
            5,
        );
        let w1 = page(
            vec![
                session("10.0.0.1:2", 0, 1),
                session("10.0.0.1:3", 0, 1),
                session("10.0.0.1:3", 1, 1),
            ],
            3,
        );
        let w2 = page(Vec::new(), 0);
        let merged = merge(vec![w0.clone(), w1.clone(), w2], 4);
        let clients: Vec<String> = merged
            .sessions
            .iter()
            .map(|s| format!("{}/{}", s.client, s.data_port))
            .collect();
        assert_eq!(
            clients,
            [
                "10.0.0.1:1/0",
                "10.0.0.1:2/0",
                "10.0.0.1:3/0",
                "10.0.0.1:3/1"
            ]
        );
        assert_eq!(merged.matched, 8);
        let all = merge(vec![w0, w1], 100);
        assert_eq!(all.sessions.len(), 6);
        assert!(all.sessions.windows(2).all(|w| w[0].order() < w[1].order()));
        assert_eq!(merge(Vec::new(), 10).sessions.len(), 0);
    }

    #[test]
    fn paging_by_key_neither_repeats_nor_skips_across_a_changing_table() {
        // Two workers' tables, paged three at a time; between pages sessions come and go.
        let mut tables: Vec<Vec<SessionInfo>> = vec![
            (0..10)
                .map(|p| session(&format!("10.0.0.1:{}", 2 * p), 0, 0))
                .collect(),
            (0..10)
                .map(|p| session(&format!("10.0.0.1:{}", 2 * p + 1), 0, 1))
                .collect(),
        ];
        let lived_throughout: Vec<String> = (0..20)
            .filter(|p| p % 5 != 0)
            .map(|p| format!("10.0.0.1:{p}/{}", p % 2))
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        for round in 0.. {
            let query = SessionQuery {
                after,
                limit: 3,
                ..SessionQuery::default()
            };
            let pages = tables
                .iter()
                .map(|t| {
                    let mut admitted: Vec<SessionInfo> = t
                        .iter()
                        .filter(|s| query.admits(s.order(), s.client, s.target))
                        .cloned()
                        .collect();
                    admitted.sort_by_key(SessionInfo::order);
                    let matched = admitted.len();
                    admitted.truncate(query.limit);
                    page(admitted, matched)
                })
                .collect();
            let merged = merge(pages, 3);
            seen.extend(
                merged
                    .sessions
                    .iter()
                    .map(|s| format!("{}/{}", s.client, s.worker)),
            );
            if merged.matched <= merged.sessions.len() {
                break;
            }
            after = Some(merged.sessions.last().unwrap().order());
            // Churn: every fifth port leaves, a new client arrives on both workers.
            for (worker, t) in tables.iter_mut().enumerate() {
                t.retain(|s| s.client.port() % 5 != 0);
                t.push(session(&format!("10.0.0.2:{round}"), 0, worker));
            }
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "no repeats: {seen:?}");
        for c in &lived_throughout {
            assert!(seen.contains(c), "{c} skipped: {seen:?}");
        }
    }

    #[test]
    fn parameters_parse_and_bad_ones_are_named() {
        let ok = |q: &str| parse_request(q).unwrap();
        let bad = |q: &str| parse_request(q).unwrap_err().name;
        assert_eq!(ok("").limit, DEFAULT_LIMIT);
        assert_eq!(ok("limit=100").limit, 100);
        assert_eq!(ok(&format!("limit={MAX_LIMIT}")).limit, MAX_LIMIT);
        for q in ["limit=0", "limit=-1", "limit=x", "limit=", "limit=5001"] {
            assert_eq!(bad(q), "limit", "{q}");
        }
        assert_eq!(bad("limit=1&limit=2"), "limit");
        assert_eq!(bad("continue=nope"), "continue");
        let token = encode_token(SessionOrder::new("10.0.0.1:5".parse().unwrap(), 0, 0));
        assert_eq!(ok(&format!("continue={token}")).after, decode_token(&token));
        assert_eq!(
            ok("listener=forwarder+games%2Ffw").listener.as_deref(),
            Some("forwarder games/fw")
        );
        assert_eq!(bad("listener="), "listener");
        assert_eq!(
            ok("client=10.0.0.1&backend=%5B%3A%3A1%5D%3A7777"),
            Request {
                limit: DEFAULT_LIMIT,
                after: None,
                listener: None,
                client: Some(ClientMatch::Ip("10.0.0.1".parse().unwrap())),
                backend: Some(ClientMatch::Addr("[::1]:7777".parse().unwrap())),
            }
        );
        assert_eq!(bad("client=nope"), "client");
        assert_eq!(bad("backend=10.0.0.1:99999"), "backend");
        assert_eq!(bad("limit=5&color=red"), "color");
        assert_eq!(bad("%ZZ=1"), "%ZZ");
        assert_eq!(bad("client=%FF"), "client");
        assert_eq!(ok("&&limit=7&").limit, 7, "empty pairs are ignored");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode_component("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(decode_component("%5b%3A%3a1%5D").as_deref(), Some("[::1]"));
        assert_eq!(decode_component("%"), None);
        assert_eq!(decode_component("%4"), None);
        assert_eq!(decode_component("%C3%A9").as_deref(), Some("é"));
        assert_eq!(decode_component("%C3"), None);
    }

    #[test]
    fn a_mapped_address_in_a_token_is_its_ipv4_address() {
        let v4 = SessionOrder::new("10.0.0.1:5".parse::<SocketAddr>().unwrap(), 0, 0);
        let mut token = String::from("0106");
        let mapped: std::net::Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        token.extend(mapped.octets().iter().map(|b| format!("{b:02x}")));
        token.push_str(&encode_token(v4)[12..]);
        assert_eq!(decode_token(&token), Some(v4));
    }
}
