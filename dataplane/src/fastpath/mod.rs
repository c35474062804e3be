//! The kernel fast path for established UDP sessions (SPEC §11, `fastPath: {kind: tc}`).
//!
//! A tc ingress program (`dataplane/bpf/fastpath.bpf.c`, embedded from the checked-in object
//! that `scripts/build-bpf.sh` builds) on the proxy's interfaces rewrites the datagrams of
//! offloaded sessions and redirects them out, both ways, without waking a worker. User space
//! stays the authority: a session, its upstream socket (which keeps its source port reserved)
//! and its timers stay where they are, and the program's map is a cache the owning worker
//! writes when the session is established (its first reply), and deletes when the session
//! ends or moves. A miss goes up unchanged, so everything not offloaded works as before.
//!
//! [`FastPath`] loads and attaches the program once (or says why it cannot, once, and the
//! proxy runs in user space); each worker gets a [`WorkerMap`] of its own on the same map.
//! What to offload is decided in [`decide`], the entries are built in [`abi`], and the route
//! each direction leaves by is read in [`route`], once per peer address.

pub(crate) mod abi;
pub(crate) mod decide;
pub(crate) mod route;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::tc::{self, NlOptions, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, SchedClassifier};

use abi::{Config, Counter, Key, Value};

/// The program object, built by `scripts/build-bpf.sh` from `dataplane/bpf/fastpath.bpf.c`
/// and checked in, so the default build needs no BPF tool chain.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/fastpath.bpf.o");

/// The program's name in the object.
const PROGRAM: &str = "udp_director_fastpath";

/// `fastPath` in the config: where the program is attached.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct FastPathConfig {
    /// Interface names; empty: every interface with an address that is not loopback.
    pub interfaces: Vec<String>,
}

/// Why the fast path is off (said once at start; the proxy runs in user space).
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// The kernel refused the program or a map (no BPF, no BTF, or no CAP_BPF).
    #[error("the kernel refused the BPF program (needs CAP_BPF and CAP_NET_ADMIN, BTF): {0}")]
    Load(String),
    /// An interface could not take the program.
    #[error("cannot attach to interface {interface} (needs CAP_NET_ADMIN): {reason}")]
    Attach {
        /// The interface.
        interface: String,
        /// Why.
        reason: String,
    },
    /// None of the configured interfaces exists, or the host has none but loopback.
    #[error("no interface to attach to: {0}")]
    NoInterface(String),
    /// The control magic is longer than the program compares.
    #[error("controlPacketMagicBytes is longer than {} bytes", abi::MAGIC_MAX)]
    MagicTooLong,
}

/// The loaded, attached program and its maps.
pub struct FastPath {
    /// Holds the program and its attachments: dropped, they are detached.
    _ebpf: aya::Ebpf,
    sessions: MapData,
    counters: PerCpuArray<MapData, Counter>,
    interfaces: Vec<String>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

/// What the kernel forwarded, all sessions together.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct FastPathTotals {
    /// Datagrams client to backend.
    pub packets_upstream: u64,
    /// Datagrams backend to client.
    pub packets_downstream: u64,
    /// Payload bytes client to backend.
    pub bytes_upstream: u64,
    /// Payload bytes backend to client.
    pub bytes_downstream: u64,
}

impl FastPath {
    /// Loads the program with the control magic `magic` and attaches it to the configured
    /// interfaces' ingress (tcx where the kernel has it, a clsact filter otherwise).
    pub fn start(config: &FastPathConfig, magic: &[u8]) -> Result<Self, FastPathError> {
        let settings = Config::new(magic).ok_or(FastPathError::MagicTooLong)?;
        let interfaces = if config.interfaces.is_empty() {
            default_interfaces()?
        } else {
            config.interfaces.clone()
        };
        let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| FastPathError::Load(e.to_string()))?;
        let mut settings_map: Array<_, Config> = ebpf
            .map_mut("config")
            .ok_or_else(|| FastPathError::Load("no map `config` in the object".into()))?
            .try_into()
            .map_err(|e: aya::maps::MapError| FastPathError::Load(e.to_string()))?;
        settings_map
            .set(0, settings, 0)
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| FastPathError::Load(format!("no program {PROGRAM} in the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| FastPathError::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| FastPathError::Load(describe(&e)))?;
        for interface in &interfaces {
            attach(program, interface)?;
        }
        let sessions = take(&mut ebpf, "sessions")?;
        let counters = match ebpf.take_map("counters") {
            Some(map) => {
                PerCpuArray::try_from(map).map_err(|e| FastPathError::Load(e.to_string()))?
            }
            None => {
                return Err(FastPathError::Load(
                    "no map `counters` in the object".into(),
                ));
            }
        };
        let aya::maps::Map::HashMap(sessions) = sessions else {
            return Err(FastPathError::Load("map `sessions` is not a hash".into()));
        };
        Ok(Self {
            _ebpf: ebpf,
            sessions,
            counters,
            interfaces,
        })
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// A worker's handle on the session map (its own descriptor).
    pub(crate) fn worker_map(&self) -> Result<WorkerMap, FastPathError> {
        let fd = self
            .sessions
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        let data = MapData::from_fd(fd).map_err(|e| FastPathError::Load(e.to_string()))?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        Ok(WorkerMap {
            map,
            routes: route::Routes::default(),
        })
    }

    /// What the kernel forwarded so far (summed over the CPUs).
    pub fn totals(&self) -> FastPathTotals {
        let sum = |direction: abi::Direction| -> Counter {
            self.counters
                .get(&(direction as u32), 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                    })
                })
                .unwrap_or_default()
        };
        let (up, down) = (
            sum(abi::Direction::Upstream),
            sum(abi::Direction::Downstream),
        );
        FastPathTotals {
            packets_upstream: up.packets,
            packets_downstream: down.packets,
            bytes_upstream: up.bytes,
            bytes_downstream: down.bytes,
        }
    }
}

fn take(ebpf: &mut aya::Ebpf, name: &str) -> Result<aya::maps::Map, FastPathError> {
    ebpf.take_map(name)
        .ok_or_else(|| FastPathError::Load(format!("no map `{name}` in the object")))
}

/// Attaches `program` to `interface`'s ingress: tcx on kernels that have it, else a filter
/// on a clsact qdisc (added if missing).
fn attach(program: &mut SchedClassifier, interface: &str) -> Result<(), FastPathError> {
    // A clsact filter outlives a proxy that died (a tcx link goes with its process): one left
    // by an earlier run would see traffic first with a map nobody keeps any more.
    let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, PROGRAM);
    let tcx = program.attach_with_options(
        interface,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    );
    if tcx.is_ok() {
        return Ok(());
    }
    // An existing clsact qdisc is fine.
    let _ = tc::qdisc_add_clsact(interface);
    program
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map(drop)
        .map_err(|e| FastPathError::Attach {
            interface: interface.to_owned(),
            reason: describe(&e),
        })
}

/// An error with its causes, as one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The default interfaces: every Ethernet-type interface (the program reads an Ethernet header)
/// with an address that is not link-local: the ones holding the node's addresses, the default
/// route's among them. Pod veths (a link-local address at most), tunnels and WireGuard
/// devices are left out; name them to have them.
fn default_interfaces() -> Result<Vec<String>, FastPathError> {
    let mut names: Vec<String> = crate::io::own_addrs::interfaces()
        .map_err(|e| FastPathError::NoInterface(e.to_string()))?
        .into_iter()
        .filter(|i| !i.loopback && !link_local(i.ip) && ethernet(&i.name))
        .map(|i| i.name)
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(FastPathError::NoInterface(
            "no Ethernet interface with an address (name them in fastPath.interfaces)".into(),
        ));
    }
    Ok(names)
}

fn link_local(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Whether `name` is an Ethernet-type device (`ARPHRD_ETHER` in sysfs).
fn ethernet(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/type")).is_ok_and(|t| t.trim() == "1")
}

/// The two entries of one offloaded session.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Offloaded {
    keys: [Key; 2],
}

/// What the kernel forwarded for one session.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct KernelCounts {
    /// Datagrams and payload bytes client to backend.
    pub(crate) packets_upstream: u64,
    pub(crate) bytes_upstream: u64,
    /// Datagrams and payload bytes backend to client.
    pub(crate) packets_downstream: u64,
    pub(crate) bytes_downstream: u64,
    /// When the kernel last forwarded one, either way.
    pub(crate) last: Option<Instant>,
}

/// A worker's handle on the session map, with its routes.
pub(crate) struct WorkerMap {
    map: HashMap<MapData, Key, Value>,
    routes: route::Routes,
}

impl std::fmt::Debug for WorkerMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMap").finish_non_exhaustive()
    }
}

/// Why one session was not offloaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OffloadError {
    /// The decision kept it in user space.
    #[error("kept in user space: {0:?}")]
    Kept(decide::Kept),
    /// No route the program can use to one side.
    #[error("{0}")]
    Route(#[from] route::RouteError),
    /// The map refused the entries (full).
    #[error("the session map refused the entry: {0}")]
    Map(String),
}

impl WorkerMap {
    /// Writes the entries of session `c`, whose upstream socket is bound to port
    /// `upstream_port`, when the decision allows it.
    pub(crate) fn offload(
        &mut self,
        c: &decide::Candidate,
        upstream_port: u16,
        now: Instant,
    ) -> Result<Offloaded, OffloadError> {
        let listener_ip = decide::decide(c).map_err(OffloadError::Kept)?;
        if upstream_port == 0 || c.listener_port == 0 {
            return Err(OffloadError::Kept(decide::Kept::Local));
        }
        let to_target = self.routes.to(c.target.ip(), now)?;
        let to_client = self.routes.to(c.client.ip(), now)?;
        let path = abi::Path {
            client: c.client,
            listener: std::net::SocketAddr::new(listener_ip, c.listener_port),
            upstream: std::net::SocketAddr::new(to_target.source, upstream_port),
            target: c.target,
            to_target_ifindex: to_target.ifindex,
            to_client_ifindex: to_client.ifindex,
        };
        let [up, down] =
            abi::entries(&path).ok_or(OffloadError::Kept(decide::Kept::CrossFamily))?;
        self.map
            .insert(up.0, up.1, 0)
            .map_err(|e| OffloadError::Map(e.to_string()))?;
        if let Err(e) = self.map.insert(down.0, down.1, 0) {
            let _ = self.map.remove(&up.0);
            return Err(OffloadError::Map(e.to_string()));
        }
        Ok(Offloaded {
            keys: [up.0, down.0],
        })
    }

    /// What the kernel forwarded under `entries` so far.
    pub(crate) fn read(&self, entries: &Offloaded) -> KernelCounts {
        let [up, down] = entries
            .keys
            .map(|k| self.map.get(&k, 0).unwrap_or_default());
        let last_ns = up.last_ns.max(down.last_ns);
        KernelCounts {
            packets_upstream: up.packets,
            bytes_upstream: up.bytes,
            packets_downstream: down.packets,
            bytes_downstream: down.bytes,
            last: (last_ns > 0).then(|| monotonic_instant(last_ns)),
        }
    }

    /// Deletes `entries`, returning what the kernel forwarded under them.
    pub(crate) fn remove(&mut self, entries: &Offloaded) -> KernelCounts {
        let counts = self.read(entries);
        for key in &entries.keys {
            let _ = self.map.remove(key);
        }
        counts
    }
}

/// The `Instant` of a `CLOCK_MONOTONIC` reading in nanoseconds (`bpf_ktime_get_ns`): Rust's
/// `Instant` is that clock on Linux, but opaque, so the age is taken against a fresh reading.
fn monotonic_instant(ns: u64) -> Instant {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` into the valid `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let instant = Instant::now();
    let now_ns = (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64);
    let age = Duration::from_nanos(now_ns.saturating_sub(ns));
    instant.checked_sub(age).unwrap_or(instant)
}
