//! The stand-in's listener: a TCP socket in a network namespace of its own, joined to this host
//! by a veth pair, since the API server will not dial loopback Endpoints. Needs root and `ip`.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;

use crate::ip;

/// A TCP listener on an address of a network namespace made for it, reached from this host
/// over a veth pair. The namespace lives as long as the listener (its sockets hold it); with it
/// go the pair and this host's end.
pub(super) fn listen_in_own_netns() -> Result<TcpListener, String> {
    let pid = std::process::id();
    // A /30 per process in 10.254.0.0/16, away from the suite's other namespaces.
    let base = u32::from(Ipv4Addr::new(10, 254, 0, 0)) + (pid % 16_384) * 4;
    let (host, inner) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
    let host_if = format!("agsi{pid}");
    let (tid_tx, tid_rx) = mpsc::channel::<Result<libc::pid_t, String>>();
    let (link_tx, link_rx) = mpsc::channel::<bool>();
    let inside = std::thread::Builder::new()
        .name("agones-netns".into())
        .spawn(move || -> Result<TcpListener, String> {
            // SAFETY: unshare(2) with CLONE_NEWNET only moves the calling thread (this one,
            // which does nothing else) into a new network namespace; no memory is involved.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
                let _ = tid_tx.send(Err(e.clone()));
                return Err(e);
            }
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() };
            let _ = tid_tx.send(Ok(tid));
            if !link_rx.recv().unwrap_or(false) {
                return Err("no veth pair".into());
            }
            // Children inherit this thread's namespace: these `ip` commands configure it.
            ip(&["addr", "add", &format!("{inner}/30"), "dev", "eth0"])?;
            ip(&["link", "set", "eth0", "up"])?;
            ip(&["link", "set", "lo", "up"])?;
            TcpListener::bind((inner, 0)).map_err(|e| format!("bind {inner}: {e}"))
        })
        .map_err(|e| e.to_string())?;
    let tid = tid_rx.recv().map_err(|e| e.to_string())??;
    let linked = (|| {
        let _ = ip(&["link", "del", &host_if]);
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &tid.to_string(),
        ])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])
    })();
    let _ = link_tx.send(linked.is_ok());
    linked?;
    inside
        .join()
        .map_err(|_panic| "the namespace's thread panicked".to_string())?
}
