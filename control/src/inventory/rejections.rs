//! What the inventory sources refuse, counted: objects skipped (a watch event that cannot be
//! read, an object of a refused file) by kind, and whole files refused by reason. A refusal is
//! logged once per change, which an operator may miss; the counters show it on `/metrics` and
//! let a test see that the source looked, not only that nothing changed.
//!
//! Label values are bounded: a reason is one of [`FileRefusal::ALL`], and a kind is one the
//! config watches or maps (else `other`), never a string an inventory file made up.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::Mapping;

/// Why a file inventory was not applied as a whole.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum FileRefusal {
    /// Empty, or nothing but comments and document markers.
    Empty,
    /// Over `inventory.maxBytes`.
    TooLarge,
    /// Still being written: it changed again before a poll found it still, or while it was
    /// read. The version after it is read once the file is still.
    Unsettled,
    /// Not a regular file (a directory, a device, a FIFO).
    NotRegular,
    /// At least one object broke the rules (missing metadata, a name past Kubernetes' limits, a
    /// Forwarder or Route that does not check).
    InvalidObject,
    /// Not YAML.
    ParseError,
    /// Missing or unreadable.
    ReadError,
}

impl FileRefusal {
    /// Every reason, for series shown at zero from the start.
    pub const ALL: [Self; 7] = [
        Self::Empty,
        Self::TooLarge,
        Self::Unsettled,
        Self::NotRegular,
        Self::InvalidObject,
        Self::ParseError,
        Self::ReadError,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge => "too_large",
            Self::Unsettled => "unsettled",
            Self::NotRegular => "not_regular",
            Self::InvalidObject => "invalid_object",
            Self::ParseError => "parse_error",
            Self::ReadError => "read_error",
        }
    }
}

/// The `kind` label of an object not known to the config.
pub const OTHER_KIND: &str = "other";

/// Kinds the proxy knows whatever the config: the ones it watches for its own features.
const FIXED_KINDS: [&str; 9] = [
    "Service",
    "EndpointSlice",
    crate::crd::forwarder::KIND,
    crate::crd::route::KIND,
    "GatewayClass",
    "Gateway",
    "UDPRoute",
    "TCPRoute",
    "ReferenceGrant",
];

type KindLabel = [(&'static str, String); 1];
type ReasonLabel = [(&'static str, &'static str); 1];

/// The inventory's refusal counters, shared (cheap clones) between a source and the metrics.
#[derive(Clone, Debug, Default)]
pub struct Rejections {
    objects: Family<KindLabel, Counter>,
    files: Family<ReasonLabel, Counter>,
}

impl Rejections {
    /// Registers both counters on `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "udp_director_inventory_rejected_objects",
            "Inventory objects skipped or refused, by kind (a known kind, else other): a watch \
             event that cannot be read, or an invalid object of a refused inventory file",
            self.objects.clone(),
        );
        registry.register(
            "udp_director_inventory_file_refusals",
            "File inventory versions not applied, by reason; the last good inventory stays",
            self.files.clone(),
        );
    }

    /// Shows every file refusal reason at zero (a file inventory's counters, from the start).
    pub fn show_file_reasons(&self) {
        for reason in FileRefusal::ALL {
            let _ = self.files.get_or_create(&[("reason", reason.as_str())]);
        }
    }

    /// Counts one skipped object; `kind` is a bounded label ([`kind_label`], a watch's kind).
    pub fn count_object(&self, kind: &str) {
        self.objects
            .get_or_create(&[("kind", kind.to_owned())])
            .inc();
    }

    /// Counts one refused file.
    pub fn count_file(&self, reason: FileRefusal) {
        self.files
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// Objects skipped of `kind` so far.
    pub fn objects(&self, kind: &str) -> u64 {
        self.objects
            .get_or_create(&[("kind", kind.to_owned())])
            .get()
    }

    /// Files refused for `reason` so far.
    pub fn files(&self, reason: FileRefusal) -> u64 {
        self.files
            .get_or_create(&[("reason", reason.as_str())])
            .get()
    }
}

/// The `kind` label of an object of an inventory file: its kind when the proxy knows it (as
/// the Kubernetes inventory names it: a mapping's `kind`, or its resource name when the
/// mapping gives no kind), else [`OTHER_KIND`].
pub fn kind_label(kind: Option<&str>, mappings: &BTreeMap<String, Mapping>) -> String {
    let Some(kind) = kind else {
        return OTHER_KIND.to_owned();
    };
    if FIXED_KINDS.contains(&kind) {
        return kind.to_owned();
    }
    mappings
        .values()
        .find(|m| m.matches_kind(kind))
        .map_or_else(
            || OTHER_KIND.to_owned(),
            |m| m.kind.clone().unwrap_or_else(|| m.resource.clone()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn kinds_are_bounded_by_the_config() {
        let config = Config::from_yaml(
            "inventory: {kind: file, path: x.yaml}\n\
             resourceQueryMapping:\n  \
               gs: {group: agones.dev, version: v1, resource: gameservers, addressPath: a, portName: p}\n  \
               arena: {group: example.com, version: v2, resource: arenas, kind: BattleArena, addressPath: a, portPath: p}\n",
        )
        .unwrap();
        let label = |k: Option<&str>| kind_label(k, &config.mappings);
        assert_eq!(label(Some("Service")), "Service");
        assert_eq!(label(Some("Forwarder")), "Forwarder");
        assert_eq!(label(Some("BattleArena")), "BattleArena");
        // A mapping without `kind` is named by its resource, whatever case the file wrote.
        assert_eq!(label(Some("GameServer")), "gameservers");
        assert_eq!(label(Some("GAMESERVER")), "gameservers");
        assert_eq!(label(Some("service")), "other");
        assert_eq!(label(Some(&"K".repeat(10_000))), "other");
        assert_eq!(label(None), "other");
    }

    #[test]
    fn counters_show_on_a_registry() {
        let r = Rejections::default();
        let mut registry = Registry::default();
        r.register(&mut registry);
        r.show_file_reasons();
        r.count_file(FileRefusal::TooLarge);
        r.count_object("Service");
        r.count_object("Service");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("udp_director_inventory_file_refusals_total{reason=\"too_large\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("udp_director_inventory_file_refusals_total{reason=\"empty\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("udp_director_inventory_rejected_objects_total{kind=\"Service\"} 2\n"),
            "{text}"
        );
        assert_eq!(r.objects("Service"), 2);
        assert_eq!(r.files(FileRefusal::TooLarge), 1);
    }
}
