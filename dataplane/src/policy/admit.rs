//! Admission (sans-io): what the first datagram of an unknown client on a listener leads to.
//! The worker classifies the datagram, asks [`admit`], and only then does I/O (a socket, a
//! session) around the answer. Nothing here reads a clock or touches a socket; the grant lookup
//! comes in as a function.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::listener::ListenerKind;
use crate::metrics::{DropReason, TokenRejectReason};
use crate::policy::grant::{BackendId, Grant};
use crate::policy::packet::{Classified, Presented};
use crate::policy::proxy_protocol::ProxyMode;

/// What a new client's first datagram leads to.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// A session to the grant's target on this port; the datagram (the token) is consumed.
    /// The token is spent only once the session's slot and socket exist.
    Token {
        /// The presented token's grant, found redeemable.
        grant: Arc<Grant>,
        /// Where the session goes.
        target: SocketAddr,
    },
    /// A session to the default backend; the datagram is forwarded.
    Default {
        /// The default backend.
        backend: BackendId,
        /// Its address on this port.
        target: SocketAddr,
        /// Its PROXY protocol mode.
        proxy: ProxyMode,
        /// A token that was presented and refused, for the counters.
        refused: Option<(Presented<'a>, TokenRejectReason)>,
    },
    /// A route entry point: the worker picks the endpoint from the listener's table (its
    /// rotation state is the worker's); the datagram is forwarded.
    Route,
    /// A forwarder's session to its target; the datagram is forwarded.
    Forward {
        /// The forwarder.
        backend: BackendId,
        /// Its target.
        target: SocketAddr,
        /// Its PROXY protocol mode.
        proxy: ProxyMode,
    },
    /// No session: dropped and counted with this reason.
    Drop {
        /// Why.
        reason: DropReason,
        /// A token that was presented and refused, for the counters.
        refused: Option<(Presented<'a>, TokenRejectReason)>,
    },
}

/// Logs (at trace) a token that was presented and refused on the way to an admission.
pub(crate) fn trace_refused(
    client: SocketAddr,
    refused: Option<(Presented<'_>, TokenRejectReason)>,
) {
    if let Some((token, why)) = refused {
        log::trace!("{client}: token {token} rejected: {}", why.as_str());
    }
}

/// What admission needs of a listener's kind (a route's table stays with the worker).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    /// A token port.
    TokenPort,
    /// A forwarder to `target`.
    Forward {
        /// Where its sessions go.
        target: SocketAddr,
        /// The forwarder's identity.
        backend: BackendId,
        /// PROXY protocol headers to the target.
        proxy: ProxyMode,
    },
    /// A route entry point.
    Route,
}

impl From<&ListenerKind> for Role {
    fn from(kind: &ListenerKind) -> Self {
        match kind {
            ListenerKind::TokenPort => Self::TokenPort,
            ListenerKind::Forward {
                target,
                backend,
                proxy,
            } => Self::Forward {
                target: *target,
                backend: *backend,
                proxy: *proxy,
            },
            ListenerKind::Route { .. } => Self::Route,
        }
    }
}

/// Everything [`admit`] decides on besides the datagram.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdmitContext {
    /// The listener's role.
    pub(crate) listener: Role,
    /// The listener is closing or the proxy draining: no new sessions.
    pub(crate) closed: bool,
    /// The default backend, its address on this port and its PROXY protocol mode, if any.
    pub(crate) default: Option<(BackendId, SocketAddr, ProxyMode)>,
}

/// Decides on a first datagram, already classified. `find_grant` looks a token up and says
/// whether it is redeemable on this port, without spending it.
pub(crate) fn admit<'a>(
    first: Classified<'a>,
    ctx: AdmitContext,
    find_grant: impl FnOnce(Presented<'a>) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason>,
) -> Admission<'a> {
    if ctx.closed {
        return Admission::Drop {
            reason: DropReason::Draining,
            refused: None,
        };
    }
    let (refused, dropped_as) = match ctx.listener {
        // Whatever comes first, token-shaped or not, is the client's traffic.
        Role::Forward {
            target,
            backend,
            proxy,
        } => {
            return Admission::Forward {
                backend,
                target,
                proxy,
            };
        }
        // Token magic means nothing on an entry point either.
        Role::Route => return Admission::Route,
        Role::TokenPort => match first {
            Classified::Token(token) | Classified::Control(token) => match find_grant(token) {
                Ok((grant, target)) => return Admission::Token { grant, target },
                Err(reason) => (Some((token, reason)), DropReason::TokenRejected),
            },
            Classified::BadControl => (None, DropReason::MalformedControl),
            Classified::Payload => (None, DropReason::NoSession),
        },
    };
    match ctx.default {
        Some((backend, target, proxy)) => Admission::Default {
            backend,
            target,
            proxy,
            refused,
        },
        None => Admission::Drop {
            reason: dropped_as,
            refused,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::grant::{Backend, TokenId};
    use std::time::{Duration, Instant};

    const GAME: &str = "10.0.0.1:7000";
    const FALLBACK: &str = "10.0.0.9:7000";

    fn ctx(default: bool) -> AdmitContext {
        AdmitContext {
            listener: Role::TokenPort,
            closed: false,
            default: default.then(|| (BackendId(9), FALLBACK.parse().unwrap(), ProxyMode::V2)),
        }
    }

    fn grant() -> Arc<Grant> {
        let backend = Backend {
            id: BackendId(1),
            addrs: vec![Some(GAME.parse().unwrap())].into(),
            proxy: Default::default(),
        };
        Arc::new(Grant::new(
            TokenId(7),
            backend,
            Instant::now() + Duration::from_secs(30),
        ))
    }

    fn known(token: Presented<'_>) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason> {
        if token == Presented::Uuid(TokenId(7)) {
            Ok((grant(), GAME.parse().unwrap()))
        } else {
            Err(TokenRejectReason::Unknown)
        }
    }

    fn never(_: Presented<'_>) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason> {
        panic!("no token to look up")
    }

    #[test]
    fn a_valid_token_or_control_packet_opens_its_grant() {
        for first in [
            Classified::Token(Presented::Uuid(TokenId(7))),
            Classified::Control(Presented::Uuid(TokenId(7))),
        ] {
            for default in [false, true] {
                let a = admit(first, ctx(default), known);
                assert!(
                    matches!(&a, Admission::Token { grant, target }
                        if grant.token == TokenId(7) && *target == GAME.parse().unwrap()),
                    "{a:?}"
                );
            }
        }
    }

    #[test]
    fn a_refused_token_falls_back_to_the_default_or_is_dropped() {
        let a = admit(
            Classified::Token(Presented::Uuid(TokenId(8))),
            ctx(true),
            known,
        );
        assert!(
            matches!(
                a,
                Admission::Default {
                    backend: BackendId(9),
                    refused: Some((Presented::Uuid(TokenId(8)), TokenRejectReason::Unknown)),
                    ..
                }
            ),
            "{a:?}"
        );
        let a = admit(
            Classified::Token(Presented::Uuid(TokenId(8))),
            ctx(false),
            known,
        );
        assert!(
            matches!(
                a,
                Admission::Drop {
                    reason: DropReason::TokenRejected,
                    refused: Some((Presented::Uuid(TokenId(8)), TokenRejectReason::Unknown))
                }
            ),
            "{a:?}"
        );
    }

    #[test]
    fn garbage_never_makes_a_session_without_a_default() {
        let a = admit(Classified::Payload, ctx(false), never);
        assert!(
            matches!(
                a,
                Admission::Drop {
                    reason: DropReason::NoSession,
                    refused: None
                }
            ),
            "{a:?}"
        );
        let a = admit(Classified::BadControl, ctx(false), never);
        assert!(
            matches!(
                a,
                Admission::Drop {
                    reason: DropReason::MalformedControl,
                    ..
                }
            ),
            "{a:?}"
        );
        for first in [Classified::Payload, Classified::BadControl] {
            let a = admit(first, ctx(true), never);
            assert!(
                matches!(a, Admission::Default { refused: None, .. }),
                "{a:?}"
            );
        }
    }

    #[test]
    fn a_forwarder_takes_every_first_datagram_token_or_not_and_never_a_grant() {
        let target: SocketAddr = "10.0.0.5:27015".parse().unwrap();
        let forward = AdmitContext {
            listener: Role::Forward {
                target,
                backend: BackendId(42),
                proxy: ProxyMode::V2First,
            },
            ..ctx(true)
        };
        for first in [
            Classified::Payload,
            Classified::Token(Presented::Uuid(TokenId(7))),
            Classified::Control(Presented::Uuid(TokenId(7))),
            Classified::BadControl,
        ] {
            let a = admit(first, forward, never);
            assert!(
                matches!(a, Admission::Forward { backend: BackendId(42), target: t, proxy: ProxyMode::V2First } if t == target),
                "{a:?}"
            );
        }
        let closed = AdmitContext {
            closed: true,
            ..forward
        };
        assert!(matches!(
            admit(Classified::Payload, closed, never),
            Admission::Drop {
                reason: DropReason::Draining,
                ..
            }
        ));
    }

    #[test]
    fn a_closed_listener_admits_nothing() {
        let closed = AdmitContext {
            closed: true,
            ..ctx(true)
        };
        let a = admit(
            Classified::Token(Presented::Uuid(TokenId(7))),
            closed,
            never,
        );
        assert!(
            matches!(
                a,
                Admission::Drop {
                    reason: DropReason::Draining,
                    ..
                }
            ),
            "{a:?}"
        );
    }
}
