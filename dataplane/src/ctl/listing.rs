//! The admin API's session listing, sans-io: which sessions one listing asks for
//! ([`SessionQuery`]: filters, a page size and the place the previous page ended), the order that
//! pages follow ([`SessionOrder`]), and the choice of one worker's page (`Smallest`) without
//! sorting or copying the whole session table.
//!
//! Each worker answers with its own first `limit` matching sessions after the place the
//! previous page ended, in order, and how many matched in all; control merges the workers'
//! pages and keeps the first `limit`. Paging is by key, not by offset, so a table that changes
//! between pages neither repeats nor skips a session that lived throughout.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};

use super::{ClientMatch, SessionInfo};

/// A session's place in the listing: by client address (IP, then port), then listener, then
/// worker. Unique per session (a worker keys its sessions by client and listener), and total,
/// so a page can start strictly after the last session of the previous one.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct SessionOrder {
    /// Client IP (canonical: an IPv4 client on a dual-stack socket is its IPv4 address).
    pub ip: IpAddr,
    /// Client port.
    pub port: u16,
    /// Listener id (the data ports first, in config order).
    pub listener: u16,
    /// Worker that owns the session.
    pub worker: u32,
}

impl SessionOrder {
    /// The place of `client`'s session on `listener`, owned by `worker`.
    pub fn new(client: SocketAddr, listener: u16, worker: usize) -> Self {
        Self {
            ip: client.ip().to_canonical(),
            port: client.port(),
            listener,
            worker: u32::try_from(worker).unwrap_or(u32::MAX),
        }
    }
}

impl SessionInfo {
    /// This session's place in the listing.
    pub fn order(&self) -> SessionOrder {
        SessionOrder::new(
            self.client,
            u16::try_from(self.data_port).unwrap_or(u16::MAX),
            self.worker,
        )
    }
}

/// Which sessions one listing asks each worker for. Every filter given must match.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SessionQuery {
    /// Only sessions after this place (the last session of the previous page).
    pub after: Option<SessionOrder>,
    /// At most this many from each worker.
    pub limit: usize,
    /// Only sessions on one of these listeners (ids).
    pub listeners: Option<Vec<u16>>,
    /// Only sessions of these clients.
    pub client: Option<ClientMatch>,
    /// Only sessions to this backend address (or to any port at this IP).
    pub backend: Option<ClientMatch>,
}

impl Default for SessionQuery {
    /// Every session.
    fn default() -> Self {
        Self {
            after: None,
            limit: usize::MAX,
            listeners: None,
            client: None,
            backend: None,
        }
    }
}

impl SessionQuery {
    /// Whether the session at `at` (of `client`, to `target`) belongs in the listing.
    pub fn admits(&self, at: SessionOrder, client: SocketAddr, target: SocketAddr) -> bool {
        self.after.is_none_or(|after| at > after)
            && self
                .listeners
                .as_ref()
                .is_none_or(|ids| ids.contains(&at.listener))
            && self.client.is_none_or(|c| c.matches(canonical(client)))
            && self.backend.is_none_or(|b| b.matches(canonical(target)))
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One worker's answer to a [`SessionQuery`].
#[derive(Clone, Debug, Default)]
pub struct SessionPage {
    /// Its first `limit` matching sessions, in [`SessionOrder`].
    pub sessions: Vec<SessionInfo>,
    /// How many of its sessions matched (those after the page too).
    pub matched: usize,
}

/// The `limit` smallest of the entries offered, by [`SessionOrder`], and how many were offered:
/// memory in `limit`, not in the number offered.
#[derive(Debug)]
pub(crate) struct Smallest<V> {
    limit: usize,
    /// A max-heap: its top is the largest kept, the first to go.
    kept: BinaryHeap<Entry<V>>,
    offered: usize,
}

impl<V> Smallest<V> {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            kept: BinaryHeap::new(),
            offered: 0,
        }
    }

    pub(crate) fn offer(&mut self, at: SessionOrder, value: V) {
        self.offered += 1;
        if self.kept.len() < self.limit {
            self.kept.push(Entry(at, value));
        } else if let Some(mut largest) = self.kept.peek_mut()
            && at < largest.0
        {
            *largest = Entry(at, value);
        }
    }

    /// The kept entries in order, and how many were offered.
    pub(crate) fn finish(self) -> (Vec<(SessionOrder, V)>, usize) {
        let kept = self
            .kept
            .into_sorted_vec()
            .into_iter()
            .map(|Entry(at, v)| (at, v))
            .collect();
        (kept, self.offered)
    }
}

/// Ordered by its place alone.
#[derive(Debug)]
struct Entry<V>(SessionOrder, V);

impl<V> PartialEq for Entry<V> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<V> Eq for Entry<V> {}

impl<V> PartialOrd for Entry<V> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<V> Ord for Entry<V> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(client: &str, listener: u16, worker: usize) -> SessionOrder {
        SessionOrder::new(client.parse().unwrap(), listener, worker)
    }

    #[test]
    fn the_order_is_client_ip_then_port_then_listener_then_worker() {
        let sorted = [
            at("10.0.0.2:9", 3, 1),
            at("10.0.0.10:1", 0, 0),
            at("10.0.0.10:2", 0, 0),
            at("10.0.0.10:2", 1, 0),
            at("10.0.0.10:2", 1, 1),
            at("[::1]:1", 0, 0),
        ];
        assert!(sorted.windows(2).all(|w| w[0] < w[1]), "{sorted:?}");
        assert_eq!(
            at("[::ffff:10.0.0.2]:9", 3, 1),
            sorted[0],
            "a mapped IPv4 client is its IPv4 address"
        );
    }

    #[test]
    fn a_query_admits_only_what_every_filter_matches() {
        let client: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let target: SocketAddr = "192.0.2.1:7777".parse().unwrap();
        let here = SessionOrder::new(client, 2, 0);
        let admits = |q: &SessionQuery| q.admits(here, client, target);
        assert!(admits(&SessionQuery::default()));

        let after = |a| SessionQuery {
            after: Some(a),
            ..SessionQuery::default()
        };
        assert!(admits(&after(at("10.0.0.1:4999", 9, 9))));
        assert!(!admits(&after(here)), "strictly after");
        assert!(!admits(&after(at("10.0.0.1:5000", 3, 0))));

        let on = |ids: Vec<u16>| SessionQuery {
            listeners: Some(ids),
            ..SessionQuery::default()
        };
        assert!(admits(&on(vec![0, 2])));
        assert!(!admits(&on(vec![0, 1])));
        assert!(!admits(&on(vec![])), "no listener by that name");

        let of = |c: &str| SessionQuery {
            client: Some(ClientMatch::Ip(c.parse().unwrap())),
            ..SessionQuery::default()
        };
        assert!(admits(&of("10.0.0.1")));
        assert!(!admits(&of("10.0.0.2")));

        let to = |b: ClientMatch| SessionQuery {
            backend: Some(b),
            ..SessionQuery::default()
        };
        assert!(admits(&to(ClientMatch::Addr(target))));
        assert!(admits(&to(ClientMatch::Ip(target.ip()))));
        assert!(!admits(&to(ClientMatch::Addr(
            "192.0.2.1:7778".parse().unwrap()
        ))));

        let all = SessionQuery {
            client: Some(ClientMatch::Addr(client)),
            backend: Some(ClientMatch::Addr(target)),
            listeners: Some(vec![2]),
            ..after(at("10.0.0.1:1", 0, 0))
        };
        assert!(admits(&all));
        assert!(
            !admits(&SessionQuery {
                listeners: Some(vec![1]),
                ..all
            }),
            "AND, not OR"
        );
    }

    #[test]
    fn smallest_keeps_the_first_limit_in_order_and_counts_all() {
        // A fixed shuffle of 0..100, as client ports.
        let ports: Vec<u16> = (0..100u16).map(|i| (i * 37) % 100).collect();
        let mut page = Smallest::new(10);
        for &p in &ports {
            page.offer(at(&format!("10.0.0.1:{p}"), 0, 0), p);
        }
        let (kept, offered) = page.finish();
        assert_eq!(offered, 100);
        let kept: Vec<u16> = kept.into_iter().map(|(_, p)| p).collect();
        assert_eq!(kept, (0..10).collect::<Vec<_>>());

        let mut none = Smallest::new(0);
        none.offer(at("10.0.0.1:1", 0, 0), ());
        assert_eq!(none.finish().0.len(), 0);

        let mut all = Smallest::new(usize::MAX);
        for &p in &ports {
            all.offer(at(&format!("10.0.0.1:{p}"), 0, 0), p);
        }
        let (kept, offered) = all.finish();
        assert_eq!((kept.len(), offered), (100, 100));
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
