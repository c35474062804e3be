//! Admission: from policy to sessions. It owns what decides whether a new client gets a
//! session and where it goes: the grants published by control (and their channel), the keys
//! that open sealed tokens with the replica's ledger of those redeemed, the default backend,
//! the flood and new-session rate limiter, the RESET magic and the drain flag.
//!
//! Every listener role, over UDP and TCP alike, is admitted the same way: [`Admission::decide`]
//! asks the sans-io [`admit`] about the client's first bytes, and [`Admission::resolve`] turns
//! the answer into one [`Admitted`] (a route entry point picks its endpoint there). It opens
//! no socket and holds no session: the paths do that with its answer. A token is only looked
//! at here; it is spent by whoever opens the session, once nothing else can fail. The one
//! exception is [`reset_session`], a control packet on a live session: its token moves the
//! session through `sessions.rs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ahash::AHashMap;
use crossbeam_channel::Receiver;

use crate::config::{DataPlaneConfig, LiveSettings};
use crate::ctl::WorkerEvent;
use crate::metrics::{DropReason, TokenRejectReason};
use crate::policy::admit::{self, AdmitContext, Role, admit, trace_refused};
use crate::policy::grant::{Backend, BackendId, Grant, NonceLedger, TokenId};
use crate::policy::packet::{Classified, Presented, classify, control_body, parse_token};
use crate::policy::proxy_protocol::ProxyMode;
use crate::policy::ratelimit::RateLimiter;
use crate::policy::route::{Pick, RouteTable};
use crate::policy::seal::{KeyRing, OpenError};
use crate::policy::session::{SessionId, SessionKey, SessionKind};

use super::listeners::Listeners;
use super::proxy_header::ProxyState;
use super::sessions::NewSession;
use super::{Outbox, Parts};

/// Where an admitted client goes: one answer for every listener role and transport.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) target: SocketAddr,
    pub(super) backend: BackendId,
    pub(super) kind: SessionKind,
    /// A token's grant, found redeemable: spent once the session's slot and socket exist.
    pub(super) grant: Option<Arc<Grant>>,
    /// PROXY protocol v2 headers to the backend.
    pub(super) proxy: ProxyMode,
    /// A route entry point's pick and its table: the rule's idle timeout, and the Service
    /// whose count the session adds to once it exists.
    route: Option<(Pick, Arc<RouteTable>)>,
}

impl Admitted {
    /// The session it opens for `key`: replies go to `reply_to` (from `local`, the address the
    /// client sent to, on a wildcard UDP listener).
    pub(super) fn session(
        &self,
        key: SessionKey,
        reply_to: SocketAddr,
        local: Option<IpAddr>,
    ) -> NewSession {
        NewSession {
            key,
            reply_to,
            target: self.target,
            backend: self.backend,
            kind: self.kind,
            idle_timeout: self.route.as_ref().map(|(pick, _)| pick.idle_timeout),
            local,
        }
    }

    /// The session exists: a route session counts on its Service, and control hears of it.
    pub(super) fn opened(&self, out: &Outbox) {
        if let Some((pick, table)) = &self.route {
            table.rules[pick.rule].backends[pick.backend].sessions.inc();
        }
        out.report(
            self.kind,
            WorkerEvent::SessionOpened {
                backend: self.backend,
                kind: self.kind,
                token: self.grant.as_ref().map(|g| g.token),
            },
        );
    }
}

/// What admits new clients in this worker.
pub(super) struct Admission {
    grant_rx: Receiver<Arc<Grant>>,
    grants: AHashMap<TokenId, Arc<Grant>>,
    /// The keys that open sealed tokens, and the replica's record of those redeemed.
    token_keys: Option<Arc<KeyRing>>,
    ledger: Arc<NonceLedger>,
    default_backend: Option<Arc<Backend>>,
    control_magic: Box<[u8]>,
    /// Per-source buckets for datagrams without a session and new sessions (`rateLimit`).
    rate_limiter: Option<Box<RateLimiter>>,
    /// The proxy drains: no new sessions anywhere.
    draining: bool,
}

impl Admission {
    /// Whether `ip` is over its flood limit now (no limit: never). Looks only.
    pub(super) fn over_rate_limit(&self, ip: std::net::IpAddr, now: Instant) -> bool {
        self.rate_limiter
            .as_ref()
            .is_some_and(|r| r.over_limit(ip, now))
    }

    /// No grant yet, with the config's keys, magic and rate limit.
    pub(super) fn new(
        grants: Receiver<Arc<Grant>>,
        config: &DataPlaneConfig,
        ledger: Arc<NonceLedger>,
        now: Instant,
    ) -> Self {
        Self {
            grant_rx: grants,
            grants: AHashMap::new(),
            token_keys: config.token_keys.clone(),
            ledger,
            default_backend: None,
            control_magic: config.control_magic.clone().into_boxed_slice(),
            rate_limiter: config
                .rate_limit
                .map(|l| Box::new(RateLimiter::new(l, now))),
            draining: false,
        }
    }

    /// Takes every grant published so far.
    pub(super) fn drain_grants(&mut self) {
        while let Ok(grant) = self.grant_rx.try_recv() {
            self.grants.insert(grant.token, grant);
        }
    }

    pub(super) fn set_default(&mut self, backend: Option<Arc<Backend>>) {
        self.default_backend = backend;
    }

    /// The backend of clients without a token, for the successor.
    pub(super) fn default_backend(&self) -> Option<&Backend> {
        self.default_backend.as_deref()
    }

    /// Takes over the predecessor's grants (before this worker reads anything).
    pub(super) fn adopt_grants(&mut self, grants: &[Arc<Grant>]) {
        for grant in grants {
            self.grants
                .entry(grant.token)
                .or_insert_with(|| Arc::clone(grant));
        }
    }

    /// From now on no new session opens on any listener.
    pub(super) fn drain(&mut self) {
        self.draining = true;
    }

    /// New keys, and a changed flood limit with fresh buckets.
    pub(super) fn reconfigure(&mut self, live: &LiveSettings, now: Instant) {
        self.token_keys.clone_from(&live.token_keys);
        let same_limit = self.rate_limiter.as_ref().map(|r| r.limit()) == live.rate_limit;
        if !same_limit {
            self.rate_limiter = live.rate_limit.map(|l| Box::new(RateLimiter::new(l, now)));
        }
    }

    /// The published grants a player may still redeem, for the successor (SPEC §12). A
    /// sealed token's grant is not among them: the token carries it, the ledger its uses.
    pub(super) fn export_grants(&mut self, now: Instant) -> Vec<crate::handoff::wire::WireGrant> {
        self.drain_grants();
        self.grants
            .values()
            .filter(|g| !g.is_spent(now))
            .filter_map(|g| {
                Some(crate::handoff::wire::WireGrant {
                    token: g.token.0,
                    backend: crate::handoff::wire_backend(&g.backend),
                    expires_in_ms: u64::try_from(
                        g.expires_at.saturating_duration_since(now).as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                    client: g.client,
                    sealed: false,
                    redeemed: g.redeemed_ports()?,
                })
            })
            .collect()
    }

    /// Drops the grants that can no longer be redeemed.
    pub(super) fn sweep_grants(&mut self, now: Instant) {
        self.grants.retain(|_, g| !g.is_spent(now));
    }

    /// Whether a grant is held (so a later sweep has something to drop).
    pub(super) fn has_grants(&self) -> bool {
        !self.grants.is_empty()
    }

    /// The body of a RESET control packet, when `datagram` is one.
    #[inline]
    pub(super) fn control_body<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        control_body(datagram, &self.control_magic)
    }

    /// What a new client's first datagram is: a token, a control packet or payload.
    pub(super) fn classify<'a>(&self, datagram: &'a [u8]) -> Classified<'a> {
        classify(datagram, &self.control_magic)
    }

    /// Whether `client` may have one more packet looked at without a session (the flood
    /// limit); a flood from one address costs a table lookup, nothing more.
    #[inline]
    pub(super) fn admit_packet(&mut self, client: IpAddr, now: Instant) -> bool {
        self.rate_limiter
            .as_mut()
            .is_none_or(|rl| rl.admit_packet(client, now))
    }

    /// Whether `client` may open a session now under `rateLimit`'s new-session rate (taken
    /// only once a session is about to open); the refusal is the caller's to count.
    pub(super) fn admit_session(&mut self, client: IpAddr, now: Instant) -> bool {
        self.rate_limiter
            .as_mut()
            .is_none_or(|rl| rl.admit_session(client, now))
    }

    /// What admission needs to know of listener `port` and this worker's state.
    pub(super) fn context(&self, port: usize, listeners: &Listeners) -> AdmitContext {
        let listener = listeners.get(port);
        AdmitContext {
            listener: listener.map_or(Role::TokenPort, |l| Role::from(l.kind())),
            closed: self.draining || listener.is_none_or(|l| l.is_closing()),
            default: self.default_for(port, None),
        }
    }

    /// The default backend on `port` (its id, address there and PROXY protocol mode), unless
    /// it is `except`.
    pub(super) fn default_for(
        &self,
        port: usize,
        except: Option<BackendId>,
    ) -> Option<(BackendId, SocketAddr, ProxyMode)> {
        self.default_backend
            .as_ref()
            .filter(|d| Some(d.id) != except)
            .and_then(|d| Some((d.id, d.addr_for(port)?, d.proxy)))
    }

    /// Decides on the first bytes of a new client of listener `port`: a redeemable token (or
    /// control packet) leads to its grant's backend, anything else to the listener's target,
    /// the default backend, or nowhere.
    pub(super) fn decide<'a>(
        &mut self,
        first: Classified<'a>,
        port: usize,
        client: IpAddr,
        listeners: &Listeners,
        out: &Outbox,
        now: Instant,
    ) -> admit::Admission<'a> {
        let ctx = self.context(port, listeners);
        admit(first, ctx, |token| {
            self.find_grant(token, port, client, out, now)
        })
    }

    /// Where a decision sends `client` of listener `port`; a route entry point picks the
    /// endpoint now, with this worker's rotation. The reason when it goes nowhere (a refused
    /// token is logged at trace).
    pub(super) fn resolve(
        decision: admit::Admission<'_>,
        port: usize,
        client: SocketAddr,
        listeners: &mut Listeners,
    ) -> Result<Admitted, DropReason> {
        let admitted = |target, backend, kind, proxy| Admitted {
            target,
            backend,
            kind,
            grant: None,
            proxy,
            route: None,
        };
        Ok(match decision {
            admit::Admission::Token { grant, target } => Admitted {
                target,
                backend: grant.backend.id,
                kind: SessionKind::Token,
                proxy: grant.backend.proxy,
                grant: Some(grant),
                route: None,
            },
            admit::Admission::Drop { reason, refused } => {
                trace_refused(client, refused);
                return Err(reason);
            }
            admit::Admission::Default {
                backend,
                target,
                proxy,
                refused,
            } => {
                trace_refused(client, refused);
                admitted(target, backend, SessionKind::Default, proxy)
            }
            admit::Admission::Forward {
                backend,
                target,
                proxy,
            } => admitted(target, backend, SessionKind::Forwarder, proxy),
            admit::Admission::Route => {
                let (pick, table) = listeners
                    .pick_route(port, client)
                    .ok_or(DropReason::NoRoute)?;
                Admitted {
                    route: Some((pick, table)),
                    ..admitted(
                        pick.endpoint,
                        BackendId(pick.key),
                        SessionKind::Route,
                        pick.proxy,
                    )
                }
            }
        })
    }

    /// Looks a token up (a UUID's published grant) or opens it (a sealed token) and checks it
    /// is redeemable on `port` by `client`, without spending it; counts a rejection. A grant
    /// published just before the client got its token may still sit in the grant channel, so
    /// a miss drains that channel (and nothing else) once.
    pub(super) fn find_grant(
        &mut self,
        token: Presented<'_>,
        port: usize,
        client: IpAddr,
        out: &Outbox,
        now: Instant,
    ) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason> {
        let grant = match token {
            Presented::Uuid(id) => {
                if !self.grants.contains_key(&id) {
                    self.drain_grants();
                }
                self.grants
                    .get(&id)
                    .map(Arc::clone)
                    .ok_or(TokenRejectReason::Unknown)
            }
            Presented::Sealed(text) => self.open_sealed(text, now),
        };
        let result = grant.and_then(|grant| {
            let target = grant.check(port, client, now)?;
            Ok((grant, target))
        });
        if let Err(reason) = result {
            out.counters().reject(reason);
        }
        result
    }

    /// Opens a sealed token with this replica's keys into a grant whose redemptions go to the
    /// replica's ledger. Without keys, no sealed token opens.
    fn open_sealed(&self, text: &[u8], now: Instant) -> Result<Arc<Grant>, TokenRejectReason> {
        let keys = self.token_keys.as_ref().ok_or(TokenRejectReason::Invalid)?;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        match keys.open(text, unix) {
            Ok(opened) => Ok(Arc::new(Grant::sealed(
                opened.id,
                opened.backend,
                now + opened.remaining,
                opened.client,
                Arc::clone(&self.ledger),
            ))),
            Err(OpenError::Expired) => Err(TokenRejectReason::Expired),
            Err(OpenError::Malformed | OpenError::Forged) => Err(TokenRejectReason::Invalid),
        }
    }
}

/// A control packet on live UDP session `id`: the token in its `body` moves the session to
/// its grant's backend, and is spent once the new place on an upstream socket exists.
pub(super) fn reset_session(p: &mut Parts<'_>, id: SessionId, body: &[u8], now: Instant) {
    let Some(session) = p.sessions.get(id) else {
        return;
    };
    let client = session.key.client;
    let port = usize::from(session.key.port);
    let local = session.local;
    let Some(token) = parse_token(body) else {
        if let Some(note) = p.out.warn(now) {
            log::warn!("{client}: control packet without a valid token; session unchanged{note}");
        }
        p.out.counters().drop(DropReason::MalformedControl, 1);
        return;
    };
    let found = p.admission.find_grant(token, port, client.ip(), p.out, now);
    let (grant, target) = match found {
        Ok(found) => found,
        Err(reason) => {
            if let Some(note) = p.out.warn(now) {
                log::warn!(
                    "{client}: control packet with {} token; session unchanged{note}",
                    reason.as_str()
                );
            }
            p.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
    };
    // The new socket first, the token after: a socket that cannot be made leaves both the
    // session and the token as they were.
    let mut upstream = match p.sessions.open_upstream(target, id, p.registry, p.out, now) {
        Ok(upstream) => upstream,
        Err(e) => {
            if let Some(note) = p.out.warn(now) {
                log::warn!(
                    "{client}: cannot move the session to {target}: {e}; session unchanged{note}"
                );
            }
            p.out.counters().drop(DropReason::UpstreamSetup, 1);
            return;
        }
    };
    upstream.proxy = ProxyState::for_path(p.listeners, grant.backend.proxy, client, port, local);
    if let Err(reason) = grant.redeem(port, client.ip(), now) {
        p.sessions.leave_place(&upstream, now);
        p.out.counters().reject(reason);
        p.out.counters().drop(DropReason::TokenRejected, 1);
        return;
    }
    let to = grant.backend.id;
    let moved = p
        .sessions
        .retarget(id, to, target, upstream, SessionKind::Token, p.out, now);
    let Some(from) = moved else {
        return;
    };
    let c = p.out.counters();
    c.sessions_reset.add(1);
    c.tokens_redeemed.add(1);
    log::debug!("{client}: session moved to {target}");
    p.out.send(WorkerEvent::SessionMoved {
        from,
        to,
        token: Some(grant.token),
    });
}
