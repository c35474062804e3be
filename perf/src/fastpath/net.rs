//! The topology of `fastpath`: a client and a server network namespace, each joined to this
//! host by a veth pair, routed through this host; threads that join a namespace; and the
//! clean-up that removes what a run made however it ends (drop, Ctrl-C, panic, or at the next
//! start when the run was killed). Touches only interfaces and namespaces it named itself.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use anyhow::{Context, bail};

/// Names of what a run makes start with these, followed by its pid.
const NS_PREFIX: &str = "udfp-";
const LINK_PREFIXES: [&str; 2] = ["udfc", "udfs"];

/// The two namespaces around this host, with this run's scratch directory; removed on drop.
#[derive(Debug)]
pub(super) struct Topology {
    pub(super) client_ns: String,
    pub(super) server_ns: String,
    /// This host's ends of the pairs (where the fast path attaches).
    pub(super) client_link: String,
    pub(super) server_link: String,
    pub(super) client_ip: Ipv4Addr,
    pub(super) client_host_ip: Ipv4Addr,
    pub(super) server_ip: Ipv4Addr,
    pub(super) server_host_ip: Ipv4Addr,
    pub(super) scratch: PathBuf,
    keep_scratch: bool,
}

impl Topology {
    /// Makes both namespaces and pairs, routes between them through this host, and turns
    /// forwarding on for the two host ends only.
    pub(super) fn create(
        prefix: &str,
        plain_checksums: bool,
        keep_scratch: bool,
    ) -> anyhow::Result<Self> {
        let octets: Vec<u8> = prefix
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()
            .filter(|o: &Vec<u8>| o.len() == 2)
            .with_context(|| format!("--prefix {prefix:?} is not two octets (like 10.77)"))?;
        let net = |third: u8, last: u8| Ipv4Addr::new(octets[0], octets[1], third, last);
        for third in [1, 2] {
            let subnet = format!("{}/24", net(third, 0));
            let used = output("ip", &["-o", "-4", "addr", "show", "to", &subnet])?;
            if !used.trim().is_empty() {
                bail!(
                    "{subnet} is already on this host (another perf fastpath running?); pass another --prefix:\n{used}"
                );
            }
        }
        let pid = std::process::id();
        let scratch = std::env::temp_dir().join(format!("udp-director-perf-fastpath-{pid}"));
        let t = Self {
            client_ns: format!("{NS_PREFIX}{pid}-c"),
            server_ns: format!("{NS_PREFIX}{pid}-s"),
            client_link: format!("{}{pid}", LINK_PREFIXES[0]),
            server_link: format!("{}{pid}", LINK_PREFIXES[1]),
            client_ip: net(1, 2),
            client_host_ip: net(1, 1),
            server_ip: net(2, 2),
            server_host_ip: net(2, 1),
            scratch,
            keep_scratch,
        };
        std::fs::create_dir_all(&t.scratch)?;
        {
            let mut l = leftovers();
            l.namespaces
                .extend([t.client_ns.clone(), t.server_ns.clone()]);
            l.links
                .extend([t.client_link.clone(), t.server_link.clone()]);
            if !keep_scratch {
                l.dirs.push(t.scratch.clone());
            }
        }
        t.join(
            &t.client_ns,
            &t.client_link,
            t.client_host_ip,
            t.client_ip,
            net(2, 0),
        )?;
        t.join(
            &t.server_ns,
            &t.server_link,
            t.server_host_ip,
            t.server_ip,
            net(1, 0),
        )?;
        if plain_checksums {
            for (ns, link) in [
                (&t.client_ns, &t.client_link),
                (&t.server_ns, &t.server_link),
            ] {
                run_cmd("ethtool", &["-K", link, "tx", "off", "rx", "off"])?;
                let inner = format!("{link}n");
                run_cmd(
                    "ip",
                    &[
                        "netns", "exec", ns, "ethtool", "-K", &inner, "tx", "off", "rx", "off",
                    ],
                )?;
            }
        }
        Ok(t)
    }

    /// Namespace `ns` joined to this host by the pair `link` (this end) / `link`n, a /24 with
    /// this host at `host_ip` and the namespace at `ns_ip`, the namespace routing `far` (the
    /// other namespace's /24) through this host, which forwards on `link`.
    fn join(
        &self,
        ns: &str,
        link: &str,
        host_ip: Ipv4Addr,
        ns_ip: Ipv4Addr,
        far: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let inner = format!("{link}n");
        let _ = run_cmd("ip", &["netns", "del", ns]);
        let _ = run_cmd("ip", &["link", "del", link]);
        run_cmd("ip", &["netns", "add", ns])?;
        run_cmd(
            "ip",
            &["link", "add", link, "type", "veth", "peer", "name", &inner],
        )?;
        run_cmd("ip", &["link", "set", &inner, "netns", ns])?;
        run_cmd(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", link],
        )?;
        run_cmd("ip", &["link", "set", link, "up"])?;
        run_cmd(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                &inner,
            ],
        )?;
        run_cmd("ip", &["-n", ns, "link", "set", &inner, "up"])?;
        run_cmd("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run_cmd(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "add",
                &format!("{far}/24"),
                "via",
                &host_ip.to_string(),
            ],
        )?;
        // Forwarding on this pair's host end only: IPv4 forwards by the receiving interface's
        // setting, and these interfaces go with the run, so nothing needs restoring.
        let sysctl = format!("/proc/sys/net/ipv4/conf/{link}/forwarding");
        std::fs::write(&sysctl, "1").with_context(|| format!("writing {sysctl}"))?;
        Ok(())
    }

    /// Runs `f` on a thread that joined the client namespace: sockets it opens live there.
    pub(super) fn in_client<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        in_namespace(&self.client_ns, f)
    }

    /// Runs `f` on a thread that joined the server namespace.
    pub(super) fn in_server<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        in_namespace(&self.server_ns, f)
    }

    /// Waits (up to 5 s) until a datagram from the client namespace to `to` comes back.
    pub(super) fn probe(&self, to: SocketAddr) -> anyhow::Result<()> {
        self.in_client(|| {
            let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            probe.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = [0u8; 64];
            for _ in 0..100 {
                probe.send_to(b"ready?", to)?;
                if probe.recv_from(&mut buf).is_ok() {
                    return Ok(());
                }
            }
            bail!("no answer from {to} in the client namespace")
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting this host's end of a pair deletes the pair, with its addresses and routes.
        for link in [&self.client_link, &self.server_link] {
            let _ = run_cmd("ip", &["link", "del", link]);
        }
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = run_cmd("ip", &["netns", "del", ns]);
        }
        if !self.keep_scratch {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
        let mut l = leftovers();
        l.namespaces
            .retain(|n| *n != self.client_ns && *n != self.server_ns);
        l.links
            .retain(|n| *n != self.client_link && *n != self.server_link);
        l.dirs.retain(|d| *d != self.scratch);
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns`.
fn in_namespace<T: Send>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) with a namespace descriptor held open for the call; it moves
            // only this thread, which ends when `f` returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {ns}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a thread in {ns} panicked"))
    })
}

/// What this run made and must undo however it ends.
#[derive(Debug)]
pub(super) struct Leftovers {
    pub(super) pids: Vec<u32>,
    links: Vec<String>,
    namespaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    pids: Vec::new(),
    links: Vec::new(),
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

/// Set by SIGINT and SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What this run made so far.
pub(super) fn leftovers() -> MutexGuard<'static, Leftovers> {
    LEFTOVERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Undoes everything in [`LEFTOVERS`]: for a panic or a signal, where no drop runs.
fn clean_up() {
    let mut l = match LEFTOVERS.try_lock() {
        Ok(l) => l,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        // Held by a thread that is cleaning up already.
        Err(TryLockError::WouldBlock) => return,
    };
    for pid in l.pids.drain(..) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for link in l.links.drain(..) {
        let _ = run_cmd("ip", &["link", "del", &link]);
    }
    for ns in l.namespaces.drain(..) {
        let _ = run_cmd("ip", &["netns", "del", &ns]);
    }
    for dir in l.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// A panic hook and a SIGINT/SIGTERM handler that undo what the run made (a release build
/// aborts on panic, and a signal ends the process, without running drops).
pub(super) fn install_cleanup() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        clean_up();
    }));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            if INTERRUPTED.load(Ordering::Relaxed) {
                eprintln!("\ninterrupted: removing the namespaces and stopping the proxy");
                clean_up();
                std::process::exit(130);
            }
        }
    });
}

/// Removes what earlier runs that were killed left: namespaces and links named after a
/// process that is gone.
pub(super) fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing {name}, left by a run that is gone");
        for prefix in LINK_PREFIXES {
            let _ = run_cmd("ip", &["link", "del", &format!("{prefix}{pid}")]);
        }
        let _ = run_cmd("ip", &["netns", "del", &name]);
    }
}

/// Runs a command, failing with its standard error.
fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    output(program, args).map(drop)
}

/// Runs a command and returns its standard output, failing with its standard error.
fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
