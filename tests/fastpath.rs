//! The kernel fast path (SPEC §11) across real network paths: a client namespace and a server
//! namespace, each joined to this host by a veth pair, with the proxy on this host and its tc
//! program on both host ends, so every datagram crosses an interface the program is attached
//! to. Checksum offload is off on every end, so each receiving stack checks every UDP checksum
//! (a bad one is dropped and counted in `InCsumErrors`, which must stay 0).
//!
//! Token, forwarder and route sessions are forwarded by the kernel once established (the
//! user-space counters stand nearly still while the fast-path counters move), over IPv4 and
//! IPv6; a control packet still reaches user space and moves an offloaded session; the idle
//! timer counts kernel-forwarded traffic; deleting a forwarder removes its entries; a proxy
//! without the capabilities runs in user space and says so. Root only: skipped loudly
//! elsewhere, required under `CI=true`.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;

const ROUNDS: u64 = 200;

/// A client namespace and a server namespace around this host, with plain checksums.
struct Topology {
    client: NetNs,
    server: NetNs,
}

fn topology() -> Option<Topology> {
    let made = NetNs::create().and_then(|client| {
        let server = NetNs::create()?;
        client.plain_checksums()?;
        server.plain_checksums()?;
        Ok(Topology { client, server })
    });
    match made {
        Ok(t) => Some(t),
        Err(e) => {
            skip_test(&format!(
                "cannot make the namespaces of the fast-path topology: {e}"
            ));
            None
        }
    }
}

impl Topology {
    /// `fastPath` naming both host ends.
    fn fast_path(&self) -> String {
        format!(
            "fastPath: {{kind: tc, interfaces: [{}, {}]}}\n",
            self.client.host_if(),
            self.server.host_if()
        )
    }

    /// A tagged echo in the server namespace, on `ip`.
    fn echo(&self, ip: IpAddr, tag: u8) -> Echo {
        let bind = SocketAddr::new(ip, 0).to_string();
        self.server.run(move || Echo::spawn(&bind, Some(tag)))
    }

    /// A UDP socket in the client namespace.
    fn client_socket(&self, ipv6: bool) -> UdpSocket {
        self.client.run(move || {
            let s = UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
    }

    fn checksum_errors(&self) -> u64 {
        self.client.udp_checksum_errors() + self.server.udp_checksum_errors()
    }
}

/// Root, holding only the capabilities the fast-path overlay gives the DaemonSet.
const FAST_PATH_CAPABILITIES: [&str; 6] = [
    "setpriv",
    "--bounding-set",
    "-all,+bpf,+net_admin",
    "--inh-caps",
    "-all",
    "--",
];

/// The proxy on the dual-stack wildcard with the fast path on both host ends, holding only
/// CAP_BPF and CAP_NET_ADMIN; fails with the log when the program did not attach.
fn start_proxy(t: &Topology, extra: &str, inventory: &str) -> Proxy {
    let config = base_config(&format!("{}{extra}", t.fast_path()))
        .replace("bindAddress: 127.0.0.1", "bindAddress: \"::\"");
    let proxy = Proxy::launch_under(&FAST_PATH_CAPABILITIES, &config, inventory, &[]);
    proxy.eventually("ready", |p| p.http("GET", "/readyz").0 == 200);
    assert_eq!(
        proxy.metric("udp_director_fastpath_enabled"),
        1.0,
        "the fast path is on\n{}",
        proxy.log()
    );
    proxy
}

/// Sends `payload` to `to` and returns the reply, if one comes.
fn round_trip(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    c.send_to(payload, to).unwrap();
    let mut buf = [0u8; 2048];
    c.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

/// What user space and the kernel forwarded client to backend so far.
fn upstream_counts(p: &Proxy) -> (f64, f64) {
    counts(p, "upstream")
}

/// What user space and the kernel forwarded in `direction` so far.
fn counts(p: &Proxy, direction: &str) -> (f64, f64) {
    (
        p.metric(&format!(
            r#"udp_director_packets_total{{direction="{direction}",protocol="udp"}}"#
        )),
        p.metric(&format!(
            r#"udp_director_fastpath_packets_total{{direction="{direction}"}}"#
        )),
    )
}

/// Waits until the session of `client` says it is offloaded.
fn wait_offloaded(p: &Proxy, what: &str) {
    p.eventually(what, |p| {
        p.sessions().iter().any(|s| s["offloaded"] == true)
    });
}

/// `ROUNDS` round trips through `to`, each answered with `tag` + payload; then the
/// user-space counter moved by at most a few and the fast-path one by nearly all.
fn carried_by_the_kernel(t: &Topology, p: &Proxy, c: &UdpSocket, to: SocketAddr, tag: u8) {
    let (user_before, kernel_before) = upstream_counts(p);
    let (user_down_before, kernel_down_before) = counts(p, "downstream");
    for i in 0..ROUNDS {
        let payload = format!("round {i:04} {}", "x".repeat((i % 7 * 150) as usize));
        let reply = round_trip(c, to, payload.as_bytes())
            .unwrap_or_else(|| panic!("round {i} through {to} got no reply\n{}", p.log()));
        assert_eq!(reply[0], tag);
        assert_eq!(&reply[1..], payload.as_bytes());
    }
    // Both ways: the replies too, once the client's first datagram armed their entry.
    let (user_down, kernel_down) = counts(p, "downstream");
    assert!(
        user_down - user_down_before <= 3.0,
        "user space forwarded {} replies of {ROUNDS}",
        user_down - user_down_before
    );
    assert!(
        kernel_down - kernel_down_before >= (ROUNDS - 3) as f64,
        "the kernel forwarded {} replies of {ROUNDS}",
        kernel_down - kernel_down_before
    );
    let (user_after, kernel_after) = upstream_counts(p);
    assert!(
        user_after - user_before <= 3.0,
        "user space forwarded {} of {ROUNDS}",
        user_after - user_before
    );
    assert!(
        kernel_after - kernel_before >= (ROUNDS - 3) as f64,
        "the kernel forwarded {} of {ROUNDS}",
        kernel_after - kernel_before
    );
    assert_eq!(t.checksum_errors(), 0, "a receiver dropped a bad checksum");
}

#[test]
fn token_sessions_go_through_the_kernel_over_ipv4_and_ipv6_and_a_control_packet_moves_one() {
    let Some(t) = topology() else { return };
    let (_, server6, _) = t.server.add_ipv6().unwrap();
    let (host6, _, _) = t.client.add_ipv6().unwrap();
    let (a, b, six) = (
        t.echo(t.server.ns_ip, b'A'),
        t.echo(t.server.ns_ip, b'B'),
        t.echo(server6, b'6'),
    );
    let inventory = gameserver("gs-a", "Ready", a.addr, "")
        + &gameserver("gs-b", "Allocated", b.addr, "")
        + &gameserver("gs-6", "Reserved", six.addr, "");
    let p = start_proxy(&t, "", &inventory);
    let query = |state: &str| {
        format!(
            r#"{{"resourceType":"gameserver","namespace":"starx","statusQuery":{{"jsonPath":"status.state","expectedValue":"{state}"}}}}"#
        )
    };
    let port = p.data_addr().port();

    // IPv4: the token and the first exchange in user space, then the kernel.
    let to = SocketAddr::new(t.client.host_ip, port);
    let c = t.client_socket(false);
    c.send_to(p.token(&query("Ready")).as_bytes(), to).unwrap();
    assert_eq!(
        round_trip(&c, to, b"first").as_deref(),
        Some(&b"Afirst"[..])
    );
    wait_offloaded(&p, "the IPv4 session offloaded");
    carried_by_the_kernel(&t, &p, &c, to, b'A');
    assert_eq!(p.metric("udp_director_fastpath_sessions"), 1.0);
    // The backend saw one source for the player, the upstream socket's, either way.
    let session = &p.sessions()[0];
    assert_eq!(session["offloaded"], true);
    assert!(
        session["packetsUpstream"].as_u64().unwrap() > ROUNDS,
        "the kernel's counts are the session's: {session}"
    );

    // A control packet reaches user space while offloaded and moves the session; the
    // traffic follows to the new backend, offloaded again once it answers.
    c.send_to(&control_packet(&p.token(&query("Allocated"))), to)
        .unwrap();
    p.eventually("the session moved", |p| {
        p.sessions()
            .first()
            .is_some_and(|s| s["target"] == b.addr.to_string())
    });
    assert_eq!(
        round_trip(&c, to, b"moved").as_deref(),
        Some(&b"Bmoved"[..])
    );
    wait_offloaded(&p, "the moved session offloaded");
    carried_by_the_kernel(&t, &p, &c, to, b'B');

    // IPv6, the same way.
    let to6 = SocketAddr::new(host6, port);
    let c6 = t.client_socket(true);
    c6.send_to(p.token(&query("Reserved")).as_bytes(), to6)
        .unwrap();
    assert_eq!(
        round_trip(&c6, to6, b"first").as_deref(),
        Some(&b"6first"[..])
    );
    p.eventually("the IPv6 session offloaded", |p| {
        p.sessions()
            .iter()
            .any(|s| s["target"] == six.addr.to_string() && s["offloaded"] == true)
    });
    carried_by_the_kernel(&t, &p, &c6, to6, b'6');
    assert_eq!(p.metric("udp_director_fastpath_sessions"), 2.0);
}

#[test]
fn an_offloaded_session_lives_while_the_kernel_carries_its_traffic_and_expires_after() {
    let Some(t) = topology() else { return };
    let echo = t.echo(t.server.ns_ip, b'E');
    let p = start_proxy(
        &t,
        "sessionTimeoutSeconds: 2\n",
        &gameserver("gs", "Ready", echo.addr, ""),
    );
    let to = SocketAddr::new(t.client.host_ip, p.data_addr().port());
    let c = t.client_socket(false);
    c.send_to(
        p.token(r#"{"resourceType":"gameserver","namespace":"starx"}"#)
            .as_bytes(),
        to,
    )
    .unwrap();
    assert_eq!(round_trip(&c, to, b"hi").as_deref(), Some(&b"Ehi"[..]));
    wait_offloaded(&p, "offloaded");
    // Twice the idle timeout of traffic only the kernel sees: the session stays.
    let (user_before, _) = upstream_counts(&p);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(round_trip(&c, to, b"tick").as_deref(), Some(&b"Etick"[..]));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        upstream_counts(&p).0,
        user_before,
        "user space saw none of it"
    );
    assert_eq!(p.sessions().len(), 1, "alive while the kernel carries it");
    // Quiet: it expires, and its entries go with it.
    p.eventually_within(Duration::from_secs(8), "the session expired", |p| {
        p.sessions().is_empty() && p.metric("udp_director_fastpath_sessions") == 0.0
    });
    assert_eq!(p.metric("udp_director_sessions_expired_total"), 1.0);
    // Its entries are gone: a datagram now reaches user space, where it has no session.
    let (_, kernel) = upstream_counts(&p);
    assert_eq!(round_trip(&c, to, b"late"), None);
    assert_eq!(upstream_counts(&p).1, kernel);
    assert_eq!(t.checksum_errors(), 0);
}

/// A `Forwarder` list entry.
fn forwarder(name: &str, listen: u16, target: SocketAddr) -> String {
    format!(
        "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
         namespace: games, creationTimestamp: \"2025-01-01T00:00:00Z\"}}\n  spec: {{udp: \
         {{listenPort: {listen}, targetHost: \"{}\", targetPort: {}}}}}\n",
        target.ip(),
        target.port()
    )
}

#[test]
fn forwarder_and_route_sessions_go_through_the_kernel_and_a_deleted_forwarder_takes_its_entries() {
    let Some(t) = topology() else { return };
    let (fw_echo, voice) = (t.echo(t.server.ns_ip, b'F'), t.echo(t.server.ns_ip, b'V'));
    // This host forwards between the two pairs (as a Kubernetes node does): the program then
    // finds each datagram's way out by a FIB lookup rather than the interface user space read.
    for pair in [&t.client, &t.server] {
        let key = format!("net.ipv4.conf.{}.forwarding=1", pair.host_if());
        let done = std::process::Command::new("sysctl")
            .args(["-qw", &key])
            .status()
            .is_ok_and(|s| s.success());
        assert!(done, "sysctl -w {key}");
    }
    let fw_port = free_port();
    let inventory = forwarder("fw", fw_port, fw_echo.addr) + &route_to(voice.addr);
    let p = start_proxy(
        &t,
        "forwarders: {namespace: games}\nentryPoints: [{name: voice, port: 0}]\n",
        &inventory,
    );
    let fw = SocketAddr::new(t.client.host_ip, fw_port);
    let entry = SocketAddr::new(t.client.host_ip, p.entry_addr("voice").port());

    let c = t.client_socket(false);
    p.eventually("the forwarder answers", |_| {
        round_trip(&c, fw, b"hello").as_deref() == Some(&b"Fhello"[..])
    });
    wait_offloaded(&p, "the forwarder session offloaded");
    carried_by_the_kernel(&t, &p, &c, fw, b'F');

    let r = t.client_socket(false);
    p.eventually("the route answers", |_| {
        round_trip(&r, entry, b"hello").as_deref() == Some(&b"Vhello"[..])
    });
    p.eventually("both offloaded", |p| {
        p.metric("udp_director_fastpath_sessions") == 2.0
    });
    carried_by_the_kernel(&t, &p, &r, entry, b'V');

    // The forwarder goes: its listener closes, its session ends and its entries with it; the
    // route's stay.
    p.write_inventory(&route_to(voice.addr));
    p.eventually("the forwarder's entries gone", |p| {
        p.metric("udp_director_fastpath_sessions") == 1.0
    });
    let (_, kernel) = upstream_counts(&p);
    assert_eq!(round_trip(&c, fw, b"gone"), None);
    assert_eq!(upstream_counts(&p).1, kernel, "nothing forwarded for it");
    assert_eq!(
        round_trip(&r, entry, b"still").as_deref(),
        Some(&b"Vstill"[..])
    );
}

#[test]
fn without_the_capabilities_the_proxy_runs_in_user_space_and_says_so() {
    let Some(t) = topology() else { return };
    let echo = t.echo(t.server.ns_ip, b'E');
    let config =
        base_config(&t.fast_path()).replace("bindAddress: 127.0.0.1", "bindAddress: 0.0.0.0");
    // Root, but without CAP_BPF, CAP_SYS_ADMIN, CAP_PERFMON or CAP_NET_ADMIN.
    let p = Proxy::launch_under(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon,-net_admin",
            "--inh-caps",
            "-all",
            "--",
        ],
        &config,
        &gameserver("gs", "Ready", echo.addr, ""),
        &[],
    );
    p.eventually("ready", |p| p.http("GET", "/readyz").0 == 200);
    assert_eq!(p.metric("udp_director_fastpath_enabled"), 0.0);
    let log = p.log();
    assert_eq!(log.matches("fast path off").count(), 1, "said once: {log}");
    assert!(log.contains("CAP_BPF"), "{log}");
    // Served in user space all the same.
    let to = SocketAddr::new(t.client.host_ip, p.data_addr().port());
    let c = t.client_socket(false);
    c.send_to(
        p.token(r#"{"resourceType":"gameserver","namespace":"starx"}"#)
            .as_bytes(),
        to,
    )
    .unwrap();
    for _ in 0..20 {
        assert_eq!(round_trip(&c, to, b"x").as_deref(), Some(&b"Ex"[..]));
    }
    assert!(p.metric(r#"udp_director_packets_total{direction="upstream",protocol="udp"}"#) >= 20.0);
    assert_eq!(p.sessions()[0]["offloaded"], false);
}

#[test]
fn a_backend_on_one_of_the_hosts_own_addresses_stays_in_user_space_and_works() {
    let Some(t) = topology() else { return };
    // The echo is on this host, on its address toward the client namespace: a route to it is
    // local, so nothing is offloaded (the program could only send it out of an interface).
    let echo = Echo::spawn(
        &SocketAddr::new(t.client.host_ip, 0).to_string(),
        Some(b'H'),
    );
    let p = start_proxy(&t, "", &gameserver("gs", "Ready", echo.addr, ""));
    let to = SocketAddr::new(t.client.host_ip, p.data_addr().port());
    let c = t.client_socket(false);
    c.send_to(
        p.token(r#"{"resourceType":"gameserver","namespace":"starx"}"#)
            .as_bytes(),
        to,
    )
    .unwrap();
    for _ in 0..20 {
        assert_eq!(round_trip(&c, to, b"x").as_deref(), Some(&b"Hx"[..]));
    }
    assert_eq!(p.sessions()[0]["offloaded"], false);
    assert_eq!(p.metric("udp_director_fastpath_sessions"), 0.0);
    assert!(upstream_counts(&p).0 >= 20.0);
}

/// A hand-off (SPEC §12) with an offloaded session: the old proxy deletes its entries when the
/// new one has taken over, the session goes on without a break in the new proxy, which
/// offloads it again, and its traffic leaves user space once more.
#[test]
fn an_offloaded_session_survives_a_hand_off_and_is_offloaded_again() {
    let Some(t) = topology() else { return };
    let echo = t.echo(t.server.ns_ip, b'H');
    let fw_port = free_port();
    let socket = scratch_dir().join("handoff.sock");
    // Fixed data port: a port the kernel picked could not be named by the successor.
    let extra = format!(
        "forwarders: {{namespace: games}}\nhandoff: {{socketPath: {}}}\n",
        socket.display()
    );
    let config = base_config(&format!("{}{extra}", t.fast_path()))
        .replace("bindAddress: 127.0.0.1", "bindAddress: \"::\"")
        .replace("dataPort: 0", &format!("dataPort: {}", free_port()));
    let mut old = Proxy::launch_under(
        &FAST_PATH_CAPABILITIES,
        &config,
        &forwarder("fw", fw_port, echo.addr),
        &[],
    );
    old.eventually("ready", |p| p.http("GET", "/readyz").0 == 200);
    let fw = SocketAddr::new(t.client.host_ip, fw_port);
    let c = t.client_socket(false);
    old.eventually("the forwarder answers", |_| {
        round_trip(&c, fw, b"hello").as_deref() == Some(&b"Hhello"[..])
    });
    wait_offloaded(&old, "the session offloaded on the old proxy");

    let new = Proxy::spawn(
        &FAST_PATH_CAPABILITIES,
        scratch_dir(),
        &old.dir.join("config.yaml"),
        &[],
    );
    new.eventually("the new proxy took over", |p| {
        p.metric(r#"udp_director_handoff_total{result="took_over"}"#) == 1.0
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the old proxy did not exit\n{}",
            old.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        round_trip(&c, fw, b"after").as_deref(),
        Some(&b"Hafter"[..]),
        "{}",
        new.log()
    );
    assert_eq!(new.metric("udp_director_fastpath_enabled"), 1.0);
    wait_offloaded(&new, "the session offloaded again on the new proxy");
    carried_by_the_kernel(&t, &new, &c, fw, b'H');
}
