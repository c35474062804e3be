//! Config reload through the real binary (SPEC §8): a changed default endpoint and timeout
//! apply under traffic without losing a session or a datagram; a port change and an invalid
//! file are refused with the key named, and the running config stays; SIGHUP, a ConfigMap-style
//! symlink swap, and a rotated `tokenSecret` file all reload; a config swapped for `/dev/zero`
//! or grown past the cap is refused without being read, while probes keep answering.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const READY: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#;
const ALLOCATED: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Allocated"}}"#;

fn reloads(p: &Proxy, result: &str) -> f64 {
    p.metric(&format!(
        r#"udp_director_config_reloads_total{{result="{result}"}}"#
    ))
}

/// Sends SIGHUP to the proxy.
fn hangup(p: &Proxy) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) }, 0);
}

/// The proxy's resident memory, in bytes.
fn rss(p: &Proxy) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// Replaces a file the way an editor or `kubectl cp` would: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A client that keeps one round trip in flight through its session and counts answers and
/// losses, until stopped.
struct Traffic {
    answered: std::sync::Arc<AtomicU64>,
    lost: std::sync::Arc<AtomicU64>,
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(c: UdpSocket, to: std::net::SocketAddr) -> Self {
        let answered = std::sync::Arc::new(AtomicU64::new(0));
        let lost = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let (answered, lost, stop) = (answered.clone(), lost.clone(), stop.clone());
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut buf = [0u8; 64];
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    c.send_to(&n.to_be_bytes(), to).unwrap();
                    match c.recv_from(&mut buf) {
                        Ok((len, _)) if buf[len - 4..len] == n.to_be_bytes() => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            answered,
            lost,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.answered.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn live_changes_apply_under_traffic_and_restart_changes_are_refused() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let inventory =
        gameserver("gs-a", "Ready", a.addr, "") + &gameserver("gs-b", "Allocated", b.addr, "");
    let before = base_config(&format!("defaultEndpoint: {READY}\n"));
    let proxy = Proxy::start(&before, &inventory);
    let data = proxy.data_addr();
    let config = proxy.dir.join("config.yaml");

    // Under traffic: a token session and a default-endpoint session.
    let token_client = client();
    token_client
        .send_to(proxy.token(ALLOCATED).as_bytes(), data)
        .unwrap();
    let token_addr = token_client.local_addr().unwrap().to_string();
    let tokens = Traffic::start(token_client, data);
    let default_client = client();
    proxy.eventually("the default endpoint applies", |_| {
        default_client.send_to(b"hi", data).unwrap();
        datagram_within(&default_client, Duration::from_millis(100)).is_some_and(|r| r == b"Ahi")
    });
    let default_addr = default_client.local_addr().unwrap().to_string();
    let defaults = Traffic::start(default_client, data);
    // An idle session, to see the new idle timeout reach the sessions already open.
    let idle = client();
    idle.send_to(b"once", data).unwrap();
    proxy.eventually("the idle client's session", |p| p.sessions().len() == 3);

    // Live: the default endpoint moves to gs-b, and sessions idle out after 1 s.
    replace(
        &config,
        &base_config(&format!(
            "defaultEndpoint: {ALLOCATED}\nsessionTimeoutSeconds: 1\nmaxQueryConnections: 50\n"
        )),
    );
    proxy.eventually("reloaded", |p| reloads(p, "applied") == 1.0);
    // A new client each try: "applied" counts the reload when control takes the new config,
    // and the new default reaches the workers a moment later; a datagram read before that opens
    // its session on gs-a (sessions keep their backend), which a client that kept trying from
    // the same port would never leave.
    proxy.eventually("new tokenless clients reach gs-b", |_| {
        let newcomer = client();
        newcomer.send_to(b"hi", data).unwrap();
        datagram_within(&newcomer, Duration::from_millis(100)).is_some_and(|r| r == b"Bhi")
    });
    // The session opened under the old 300 s timeout ends after 1 s idle now.
    let idle_addr = idle.local_addr().unwrap().to_string();
    let has = |p: &Proxy, addr: &str| p.sessions().iter().any(|s| s["client"] == addr);
    proxy.eventually_within(Duration::from_secs(4), "the idle session timed out", |p| {
        !has(p, &idle_addr)
    });
    let (tok_ok, tok_lost) = tokens.finish();
    let (def_ok, def_lost) = defaults.finish();
    assert!(tok_ok > 50 && def_ok > 50, "{tok_ok} {def_ok}");
    assert_eq!(
        (tok_lost, def_lost),
        (0, 0),
        "no datagram lost across the reload"
    );
    assert!(
        has(&proxy, &token_addr) && has(&proxy, &default_addr),
        "both sessions live on"
    );

    // A port change: refused, named, and the proxy keeps serving on the old port.
    let live = base_config(&format!(
        "defaultEndpoint: {ALLOCATED}\nsessionTimeoutSeconds: 1\n"
    ));
    replace(&config, &live.replace("dataPort: 0", "dataPort: 7999"));
    proxy.eventually("refused", |p| reloads(p, "refused") == 1.0);
    assert!(proxy.log().contains("`dataPorts`"), "{}", proxy.log());
    let c = client();
    c.send_to(b"still", data).unwrap();
    assert_eq!(expect_datagram(&c), b"Bstill");

    // An invalid file: refused, the running config stays.
    replace(
        &config,
        &live.replace("sessionTimeoutSeconds: 1", "sessionTimeoutSeconds: -1"),
    );
    proxy.eventually("invalid", |p| reloads(p, "invalid") == 1.0);
    assert!(
        proxy.log().contains("sessionTimeoutSeconds"),
        "{}",
        proxy.log()
    );
    c.send_to(b"again", data).unwrap();
    assert_eq!(expect_datagram(&c), b"Bagain");
    assert_eq!(proxy.http("GET", "/readyz").0, 200);
}

#[test]
fn sighup_and_a_configmap_symlink_swap_reload() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let inventory =
        gameserver("gs-a", "Ready", a.addr, "") + &gameserver("gs-b", "Allocated", b.addr, "");
    let proxy = Proxy::start(
        &base_config(&format!("defaultEndpoint: {READY}\n")),
        &inventory,
    );
    let data = proxy.data_addr();
    let dir = &proxy.dir;

    // SIGHUP with the file unchanged: a reload all the same.
    hangup(&proxy);
    proxy.eventually("SIGHUP reloaded", |p| reloads(p, "applied") == 1.0);

    // A ConfigMap mount: config.yaml -> ..data/config.yaml, ..data -> a timestamped folder,
    // and an update swaps ..data in one rename.
    let publish = |name: &str, text: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("config.yaml"), text).unwrap();
        std::fs::write(
            dir.join(name).join("inventory.yaml"),
            std::fs::read(dir.join("inventory.yaml")).unwrap(),
        )
        .unwrap();
        let link = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(name, &link).unwrap();
        std::fs::rename(&link, dir.join("..data")).unwrap();
    };
    publish(
        "..2026_12_02_1",
        &base_config(&format!("defaultEndpoint: {READY}\n")),
    );
    let link = dir.join("config.yaml.link");
    std::os::unix::fs::symlink("..data/config.yaml", &link).unwrap();
    std::fs::rename(&link, dir.join("config.yaml")).unwrap();
    proxy.eventually("the symlinked file loaded", |p| {
        reloads(p, "applied") == 2.0
    });
    publish(
        "..2026_12_02_2",
        &base_config(&format!("defaultEndpoint: {ALLOCATED}\n")),
    );
    proxy.eventually("the swap reloaded", |p| reloads(p, "applied") == 3.0);
    let c = client();
    proxy.eventually("the new default endpoint", |_| {
        c.send_to(b"x", data).unwrap();
        datagram_within(&c, Duration::from_millis(100)).is_some_and(|r| r == b"Bx")
    });
    assert_eq!(reloads(&proxy, "refused") + reloads(&proxy, "invalid"), 0.0);
}

#[test]
fn a_rotated_token_secret_applies_without_a_restart() {
    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "HxwdHhscGRoXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";
    let echo = Echo::tagged(b'A');
    let inventory = gameserver("gs-a", "Ready", echo.addr, "");
    let keys = scratch_dir();
    let start = |name: &str, key: &str| {
        let file = keys.join(name);
        std::fs::write(&file, format!("{key}\n")).unwrap();
        let config = base_config(&format!(
            "tokenSecret: {{file: {}}}\nmaxSessions: 100\n",
            file.display()
        ));
        (Proxy::start(&config, &inventory), file)
    };
    let (old, old_keys) = start("old", K1);
    let (new, _) = start("new", K2);
    let redeem = |token: &str, p: &Proxy| {
        let c = client();
        c.send_to(token.as_bytes(), p.data_addr()).unwrap();
        c.send_to(b"ping", p.data_addr()).unwrap();
        datagram_within(&c, Duration::from_millis(500))
    };
    assert_eq!(
        redeem(&new.token(READY), &old),
        None,
        "a key it does not hold"
    );
    // The Secret is updated: the new key first, the old one still opening.
    replace(&old_keys, &format!("{K2}\n{K1}\n"));
    old.eventually("the key file reloaded", |p| reloads(p, "applied") == 1.0);
    assert_eq!(
        redeem(&new.token(READY), &old).as_deref(),
        Some(&b"Aping"[..])
    );
    // It seals with the new key now, which `new` opens.
    assert_eq!(
        redeem(&old.token(READY), &new).as_deref(),
        Some(&b"Aping"[..])
    );
}

#[test]
fn a_config_swapped_for_dev_zero_or_grown_past_the_cap_is_refused_unread() {
    let echo = Echo::tagged(b'A');
    let config = base_config("");
    let proxy = Proxy::start(&config, &gameserver("gs-a", "Ready", echo.addr, ""));
    let path = proxy.dir.join("config.yaml");
    let before = rss(&proxy);
    let answers = |p: &Proxy| {
        assert_eq!(p.http("GET", "/healthz").0, 200);
        assert!(p.query(READY).get("token").is_some());
    };

    // A symlink to /dev/zero swapped in (as a ConfigMap update swaps one), then SIGHUP.
    let link = proxy.dir.join("config.yaml.link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    hangup(&proxy);
    proxy.eventually("the swap refused", |p| {
        answers(p);
        reloads(p, "invalid") >= 1.0
    });
    let log = proxy.log();
    assert!(
        log.contains(&path.display().to_string()) && log.contains("not a regular file"),
        "{log}"
    );
    // Probes and queries keep answering, and nothing was read into memory.
    for _ in 0..10 {
        answers(&proxy);
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown = rss(&proxy).saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");

    // A regular file past the cap (1 MiB): refused, naming the cap.
    let refused = reloads(&proxy, "invalid");
    replace(&path, &format!("{config}{}\n", "#".repeat(2 << 20)));
    hangup(&proxy);
    proxy.eventually("the big file refused", |p| reloads(p, "invalid") > refused);
    assert!(
        proxy.log().contains("larger than 1048576 bytes"),
        "{}",
        proxy.log()
    );
    answers(&proxy);
    assert_eq!(reloads(&proxy, "applied"), 0.0, "the running config stays");

    // Restored: read and applied again.
    replace(&path, &config);
    hangup(&proxy);
    proxy.eventually("restored", |p| reloads(p, "applied") >= 1.0);
    let grown = rss(&proxy).saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");
}
