//! The API server goes away and comes back: the proxy keeps answering from its caches, says they
//! are stale, re-lists when the server returns and follows changes again. A test binary of its
//! own, because it stops the suite's API server (test binaries run one after another).

mod common;

use std::time::Duration;

use common::Echo;
use common::cluster::{cluster, gs_status, ready_query, served_by};

#[test]
fn caches_survive_an_api_server_restart() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("restart");
    let (a, b) = (Echo::tagged(1), Echo::tagged(2));
    c.gameserver(&ns, "gs-a", "", "Ready", a.addr);
    c.gameserver(&ns, "gs-b", "", "Allocated", b.addr);
    let p = c.launch_proxy(&ns, "");
    let long = Duration::from_secs(60);
    p.eventually_within(long, "ready", |p| p.http("GET", "/readyz").0 == 200);
    let ready = ready_query("gameserver", &ns);
    assert_eq!(served_by(&p, &ready), Ok(1));
    let stale = r#"udp_director_inventory_stale{resource="gameservers.agones.dev"}"#;

    c.script("apiserver-stop");
    p.eventually_within(long, "the cache is reported stale", |p| {
        p.metric(stale) == 1.0
    });
    // Still answering, from the last state, and still ready: game servers keep getting players.
    assert_eq!(served_by(&p, &ready), Ok(1));
    assert_eq!(p.http("GET", "/readyz").0, 200);

    c.script("apiserver-start");
    p.eventually_within(long, "re-listed after the restart", |p| {
        p.metric(stale) == 0.0
    });
    c.patch_status(&ns, "gameservers", "gs-a", &gs_status("Allocated", a.addr));
    c.patch_status(&ns, "gameservers", "gs-b", &gs_status("Ready", b.addr));
    p.eventually("changes after the restart are seen", |p| {
        served_by(p, &ready) == Ok(2)
    });
}
