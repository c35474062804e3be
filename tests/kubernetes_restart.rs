//! The API server goes away and comes back: the proxy keeps answering from its caches, says they
//! are stale, re-lists when the server returns and follows changes again. A test binary of its
//! own, because it stops the suite's API server (test binaries run one after another).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::{PROXY_CONFIG, cluster};
use common::*;

fn gs_status(state: &str, addr: SocketAddr) -> String {
    format!(
        r#"{{"status":{{"state":"{state}","address":"{}","ports":[{{"name":"default","port":{}}}]}}}}"#,
        addr.ip(),
        addr.port()
    )
}

fn served_by(p: &Proxy, query: &str) -> Option<u8> {
    let token = p.query(query)["token"].as_str()?.to_string();
    let c = client();
    c.send_to(token.as_bytes(), p.data_addr()).unwrap();
    c.send_to(b"ping", p.data_addr()).unwrap();
    Some(expect_datagram(&c)[0])
}

#[test]
fn caches_survive_an_api_server_restart() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("restart");
    let (a, b) = (Echo::tagged(1), Echo::tagged(2));
    for (name, state, addr) in [("gs-a", "Ready", a.addr), ("gs-b", "Allocated", b.addr)] {
        c.apply(&format!(
            "apiVersion: agones.dev/v1\nkind: GameServer\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{}}\n"
        ));
        c.patch_status(&ns, "gameservers", name, &gs_status(state, addr));
    }
    let kubeconfig = c.proxy_kubeconfig();
    let p = Proxy::launch(
        &PROXY_CONFIG.replace("NAMESPACE", &ns),
        "",
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    let long = Duration::from_secs(60);
    p.eventually_within(long, "ready", |p| p.http("GET", "/readyz").0 == 200);
    let ready = format!(
        r#"{{"resourceType":"gameserver","namespace":"{ns}","statusQuery":{{"jsonPath":"status.state","expectedValue":"Ready"}}}}"#
    );
    assert_eq!(served_by(&p, &ready), Some(1));
    let stale = r#"udp_director_inventory_stale{resource="gameservers.agones.dev"}"#;

    c.script("apiserver-stop");
    p.eventually_within(long, "the cache is reported stale", |p| {
        p.metric(stale) == 1.0
    });
    // Still answering, from the last state, and still ready: game servers keep getting players.
    assert_eq!(served_by(&p, &ready), Some(1));
    assert_eq!(p.http("GET", "/readyz").0, 200);

    c.script("apiserver-start");
    p.eventually_within(long, "re-listed after the restart", |p| {
        p.metric(stale) == 0.0
    });
    c.patch_status(&ns, "gameservers", "gs-a", &gs_status("Allocated", a.addr));
    c.patch_status(&ns, "gameservers", "gs-b", &gs_status("Ready", b.addr));
    p.eventually("changes after the restart are seen", |p| {
        served_by(p, &ready) == Some(2)
    });
}
