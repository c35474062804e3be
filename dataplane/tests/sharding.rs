//! Several workers: exactly-once redemption across them and no cross-talk between many clients.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[test]
fn one_token_raced_from_many_clients_redeems_once() {
    let proxy = Proxy::start(4, |_| {});
    let echo = Echo::plain();
    // Every round's clients stay open: a port freed by an earlier round's client could be
    // handed to a new one, whose datagrams would then join the old session.
    let mut earlier = Vec::new();
    for _ in 0..10 {
        let token = proxy.grant_one(1, echo.addr);
        let clients: Vec<_> = (0..16).map(|_| client()).collect();
        for c in &clients {
            c.send_to(token.as_bytes(), proxy.addr()).unwrap();
        }
        for c in &clients {
            c.send_to(b"who", proxy.addr()).unwrap();
        }
        // Every reply has had ample time to arrive; then count without waiting.
        std::thread::sleep(Duration::from_millis(200));
        let mut winners = 0;
        for c in &clients {
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            if c.recv_from(&mut buf).is_ok() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "exactly one client wins the token");
        earlier.push(clients);
    }
    // The clients' sessions landed on more than one worker over the rounds.
    let workers: HashSet<usize> = proxy.sessions().iter().map(|s| s.worker).collect();
    assert!(workers.len() >= 2, "sessions on workers {workers:?}");
    assert_eq!(proxy.ctl.counters().tokens_redeemed, 10);
}

#[test]
fn many_clients_on_several_workers_get_only_their_own_replies() {
    const CLIENTS: usize = 600;
    let proxy = Proxy::start(3, |_| {});
    let echoes = [Echo::plain(), Echo::plain()];
    let clients: Vec<_> = (0..CLIENTS).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        let token = proxy.grant_one(i as u64 % 2, echoes[i % 2].addr);
        c.send_to(token.as_bytes(), proxy.addr()).unwrap();
    }
    proxy.eventually("all sessions open", |p| {
        p.ctl.counters().sessions_active == CLIENTS as u64
    });
    // In waves of 50, so the single-threaded echo servers' socket buffers never overflow.
    for round in 0..3u32 {
        for wave in clients.chunks(50).enumerate() {
            let (w, chunk) = wave;
            for (j, c) in chunk.iter().enumerate() {
                let mut msg = ((w * 50 + j) as u32).to_be_bytes().to_vec();
                msg.extend_from_slice(&round.to_be_bytes());
                c.send_to(&msg, proxy.addr()).unwrap();
            }
            for (j, c) in chunk.iter().enumerate() {
                let i = w * 50 + j;
                let reply = expect_datagram(c);
                assert_eq!(
                    &reply[..4],
                    (i as u32).to_be_bytes(),
                    "client {i} got another's reply"
                );
                assert_eq!(&reply[4..], round.to_be_bytes());
            }
        }
    }
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), CLIENTS);
    let workers: HashSet<usize> = sessions.iter().map(|s| s.worker).collect();
    assert!(workers.len() >= 2, "sessions on workers {workers:?}");
}
