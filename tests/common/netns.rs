//! A network namespace joined to this host by a veth pair, so a test has a client that is not
//! on loopback: the proxy sees it arrive from the namespace's address. Traffic stays between
//! this host and the namespace the test made; the namespace is deleted on drop.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use testkit::ip;

/// A namespace `name` with `ns_ip`, reached from the host at `host_ip` (a /30 between them).
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    /// Distinguishes this namespace's extra address blocks from other tests' and processes'.
    block: u8,
    /// This host's end of the veth pair.
    pub host_ip: IpAddr,
    /// The namespace's end: the address its clients come from.
    pub ns_ip: IpAddr,
}

impl NetNs {
    /// Makes the namespace, or says why it cannot (not root, no iproute2).
    pub fn create() -> Result<Self, String> {
        static N: AtomicU8 = AtomicU8::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let name = format!("udt-{tag}");
        let (host_if, ns_if) = (format!("vh{tag}"), format!("vn{tag}"));
        let octet = (std::process::id() % 64) as u8 * 4;
        let host = Ipv4Addr::new(10, 251, n, octet + 1);
        let ns = Ipv4Addr::new(10, 251, n, octet + 2);
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        let made = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            block: ((std::process::id() % 32) as u8) * 8 + (n % 8),
            host_ip: host.into(),
            ns_ip: ns.into(),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{ns}/30"), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(made)
    }

    /// This host's end of the pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Runs `command` inside the namespace and returns its standard output.
    pub fn exec(&self, command: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .output()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Turns checksum offload off on both ends of the pair (`ethtool`), so every UDP checksum
    /// is computed by the sender's stack and checked by the receiver's: a datagram with a
    /// wrong one is dropped and counted in the namespace's `Udp: InCsumErrors`.
    pub fn plain_checksums(&self) -> Result<(), String> {
        let off = ["tx", "off", "rx", "off"];
        let host = Command::new("ethtool")
            .args(["-K", &self.host_if])
            .args(off)
            .output()
            .map_err(|e| format!("ethtool: {e}"))?;
        if !host.status.success() {
            return Err(String::from_utf8_lossy(&host.stderr).into_owned());
        }
        let mut inside = vec!["ethtool", "-K", &self.ns_if];
        inside.extend(off);
        self.exec(&inside).map(drop)
    }

    /// UDP datagrams the namespace's stack dropped for a bad checksum (`/proc/net/snmp`).
    pub fn udp_checksum_errors(&self) -> u64 {
        let snmp = self.exec(&["cat", "/proc/net/snmp"]).unwrap();
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "InCsumErrors")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }

    /// Runs `ip` inside the namespace.
    fn inside(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Gives this host a second address on its end of the pair (a secondary IP, as on a
    /// multi-homed node), reachable from the namespace.
    pub fn add_host_address(&self) -> Result<IpAddr, String> {
        let second = Ipv4Addr::new(10, 252, self.block, 1);
        ip(&["addr", "add", &format!("{second}/32"), "dev", &self.host_if])?;
        self.inside(&["route", "add", &format!("{second}/32"), "dev", &self.ns_if])?;
        Ok(second.into())
    }

    /// IPv6 on the pair: (this host's address, the namespace's, a second host address routed
    /// from the namespace), without duplicate address detection so they work at once.
    pub fn add_ipv6(&self) -> Result<(IpAddr, IpAddr, IpAddr), String> {
        let b = self.block;
        let host = format!("fd00:251:{b:x}::1");
        let ns = format!("fd00:251:{b:x}::2");
        let second = format!("fd00:252:{b:x}::1");
        ip(&[
            "addr",
            "add",
            &format!("{host}/64"),
            "dev",
            &self.host_if,
            "nodad",
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{second}/128"),
            "dev",
            &self.host_if,
            "nodad",
        ])?;
        self.inside(&[
            "addr",
            "add",
            &format!("{ns}/64"),
            "dev",
            &self.ns_if,
            "nodad",
        ])?;
        self.inside(&["route", "add", &format!("{second}/128"), "dev", &self.ns_if])?;
        let parse = |a: &str| a.parse::<IpAddr>().map_err(|e| e.to_string());
        Ok((parse(&host)?, parse(&ns)?, parse(&second)?))
    }

    /// Gives the namespace `count` (at most 250) more addresses, routed from this host: many
    /// clients from one namespace.
    pub fn add_ns_addresses(&self, count: u8) -> Result<Vec<IpAddr>, String> {
        let block = format!("10.253.{}.0/24", self.block);
        let mut all = Vec::new();
        for i in 1..=count.min(250) {
            let a = Ipv4Addr::new(10, 253, self.block, i);
            self.inside(&["addr", "add", &format!("{a}/32"), "dev", &self.ns_if])?;
            all.push(a.into());
        }
        ip(&["route", "add", &block, "via", &self.ns_ip.to_string()])?;
        Ok(all)
    }

    /// Runs `f` on a thread that has joined the namespace: sockets it opens live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap();
                // SAFETY: setns(2) with a namespace fd we hold open; it moves only this thread,
                // which the scope joins before the fd is dropped.
                let r = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair, this host's
        // addresses on it and the routes through it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
