//! Who may use the sessions API (SPEC section 8). It shows player addresses and ends sessions,
//! so by default only loopback callers get it; with `sessionsApi: {auth: kubernetes}` a remote
//! caller presents a bearer token, the API server's TokenReview says who it is and a
//! SubjectAccessReview whether that user may `list` / `delete` `sessions` in group
//! `udp-director.dev`. Decisions are cached briefly, so a dashboard polling every second costs
//! the API server two reviews per token per [`DECISION_TTL`], not two per request.
//!
//! [`gate`] is the sans-io decision; [`Authorizer`] adds the reviews around it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;

use crate::config::SessionsApiAuth;

/// API group and resource a SubjectAccessReview asks about.
pub const SESSIONS_GROUP: &str = "udp-director.dev";
/// See [`SESSIONS_GROUP`].
pub const SESSIONS_RESOURCE: &str = "sessions";
/// How long a review's answer is reused for the same token and verb.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Cached decisions at most; the cache is cleared when full (a flood of made-up tokens must not
/// grow memory).
const DECISION_CACHE_ENTRIES: usize = 1024;
/// How long one review may take before the caller gets 503.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// What a sessions API request wants to do.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Verb {
    /// `GET /sessions`.
    List,
    /// `DELETE /sessions/{client}`.
    Delete,
}

impl Verb {
    /// The RBAC verb.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Delete => "delete",
        }
    }
}

/// The answer for one request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// 401: no usable credentials (or they are not accepted).
    Unauthorized(&'static str),
    /// 403: known caller, not allowed (or remote callers are not served at all).
    Forbidden(String),
    /// 503: the API server could not be asked.
    Unavailable(String),
}

/// What to do with a request before any review: loopback passes, remote callers need the
/// Kubernetes mode and a bearer token. `Ok(token)` means "review this token".
pub fn gate(
    mode: SessionsApiAuth,
    peer: IpAddr,
    authorization: Option<&str>,
) -> Result<&str, Decision> {
    if peer.to_canonical().is_loopback() {
        return Err(Decision::Allow);
    }
    match mode {
        SessionsApiAuth::Loopback => Err(Decision::Forbidden(
            "the sessions API answers loopback callers only (set sessionsApi.auth: kubernetes \
             to serve remote callers with a Kubernetes token)"
                .into(),
        )),
        SessionsApiAuth::Kubernetes => authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(Decision::Unauthorized(
                "a bearer token is required (Authorization: Bearer <token>)",
            )),
    }
}

/// The sessions API's access check.
pub struct Authorizer {
    mode: SessionsApiAuth,
    audiences: Vec<String>,
    client: Option<kube::Client>,
    cache: Mutex<AHashMap<(String, Verb), (Decision, Instant)>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("mode", &self.mode)
            .field("cached", &self.cache.lock().len())
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// An authorizer in `mode`; the Kubernetes mode needs `client`, and accepts tokens issued
    /// for one of `audiences` (empty: the API server's own).
    pub fn new(
        mode: SessionsApiAuth,
        audiences: Vec<String>,
        client: Option<kube::Client>,
    ) -> Self {
        Self {
            mode,
            audiences,
            client,
            cache: Mutex::new(AHashMap::new()),
        }
    }

    /// Decides one request from `peer` with its `Authorization` header.
    pub async fn check(&self, peer: IpAddr, authorization: Option<&str>, verb: Verb) -> Decision {
        let token = match gate(self.mode, peer, authorization) {
            Ok(token) => token,
            Err(decision) => return decision,
        };
        let Some(client) = &self.client else {
            return Decision::Unavailable("no Kubernetes client".into());
        };
        let key = (token.to_string(), verb);
        let now = Instant::now();
        if let Some((decision, at)) = self.cache.lock().get(&key)
            && now.saturating_duration_since(*at) < DECISION_TTL
        {
            return decision.clone();
        }
        let reviewed = review(client, token, &self.audiences, verb);
        let decision = match tokio::time::timeout(REVIEW_TIMEOUT, reviewed).await {
            Ok(decision) => decision,
            Err(_) => Decision::Unavailable("the API server did not answer the review".into()),
        };
        // An outage is not remembered: the next request asks again.
        if !matches!(decision, Decision::Unavailable(_)) {
            let mut cache = self.cache.lock();
            if cache.len() >= DECISION_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, (decision.clone(), now));
        }
        decision
    }
}

/// TokenReview (for `audiences`), then SubjectAccessReview for the user it names.
async fn review(client: &kube::Client, token: &str, audiences: &[String], verb: Verb) -> Decision {
    let tokens: Api<TokenReview> = Api::all(client.clone());
    let asked = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..TokenReview::default()
    };
    let reviewed = match tokens.create(&PostParams::default(), &asked).await {
        Ok(r) => r,
        Err(e) => return Decision::Unavailable(format!("TokenReview failed: {e}")),
    };
    let status = reviewed.status.unwrap_or_default();
    let (Some(true), Some(user)) = (status.authenticated, status.user) else {
        return Decision::Unauthorized("the token is not valid (for this audience)");
    };
    // The API server only authenticates a token for an audience it was asked about; check
    // that it said so rather than trust an authenticator that ignores audiences.
    let granted = status.audiences.unwrap_or_default();
    if !audiences.is_empty() && !granted.iter().any(|a| audiences.contains(a)) {
        return Decision::Unauthorized("the token is not issued for this proxy's audience");
    }
    let access: Api<SubjectAccessReview> = Api::all(client.clone());
    let asked = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            resource_attributes: Some(ResourceAttributes {
                group: Some(SESSIONS_GROUP.into()),
                resource: Some(SESSIONS_RESOURCE.into()),
                verb: Some(verb.as_str().into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    match access.create(&PostParams::default(), &asked).await {
        Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Decision::Allow,
        Ok(_) => Decision::Forbidden(format!(
            "{} may not {} {SESSIONS_RESOURCE}.{SESSIONS_GROUP}",
            user.username.as_deref().unwrap_or("this user"),
            verb.as_str()
        )),
        Err(e) => Decision::Unavailable(format!("SubjectAccessReview failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    #[test]
    fn loopback_always_passes() {
        for peer in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            let peer: IpAddr = peer.parse().unwrap();
            for mode in [SessionsApiAuth::Loopback, SessionsApiAuth::Kubernetes] {
                assert_eq!(gate(mode, peer, None), Err(Decision::Allow), "{peer}");
            }
        }
    }

    #[test]
    fn remote_callers_by_mode() {
        assert!(matches!(
            gate(SessionsApiAuth::Loopback, REMOTE, Some("Bearer abc")),
            Err(Decision::Forbidden(_))
        ));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(matches!(
            gate(SessionsApiAuth::Loopback, mapped, None),
            Err(Decision::Forbidden(_))
        ));
        assert!(matches!(
            gate(SessionsApiAuth::Kubernetes, REMOTE, None),
            Err(Decision::Unauthorized(_))
        ));
        assert!(matches!(
            gate(
                SessionsApiAuth::Kubernetes,
                REMOTE,
                Some("Basic dXNlcjpwdw==")
            ),
            Err(Decision::Unauthorized(_))
        ));
        assert!(matches!(
            gate(SessionsApiAuth::Kubernetes, REMOTE, Some("Bearer  ")),
            Err(Decision::Unauthorized(_))
        ));
        assert_eq!(
            gate(SessionsApiAuth::Kubernetes, REMOTE, Some("Bearer abc.def")),
            Ok("abc.def")
        );
        // The scheme is case-insensitive (RFC 7235).
        assert_eq!(
            gate(SessionsApiAuth::Kubernetes, REMOTE, Some("bearer abc")),
            Ok("abc")
        );
    }
}
