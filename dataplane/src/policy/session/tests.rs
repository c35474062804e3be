//! Session table and idle wheel, driven with an injected clock.

use super::*;

fn key(n: u16) -> SessionKey {
    SessionKey {
        client: SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 40000 + n)),
        port: 0,
    }
}

/// A session with the 10 s idle timeout most tests use.
fn session(n: u16, now: Instant) -> Session<()> {
    session_idle(n, now, Duration::from_secs(10))
}

fn session_idle(n: u16, now: Instant, idle_timeout: Duration) -> Session<()> {
    Session {
        key: key(n),
        client_sockaddr: key(n).client.into(),
        upstream: (),
        target: "10.1.0.1:7000".parse().unwrap(),
        backend: BackendId(1),
        kind: SessionKind::Token,
        created: now,
        last_active: now,
        idle_timeout,
        stats: SessionStats::default(),
        local: None,
    }
}

#[test]
fn insert_find_remove_and_slot_reuse() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    assert_eq!(table.next_slot(), 0);
    let a = table.insert(session(1, t0));
    assert_eq!((a.slot(), table.next_slot()), (0, 1));
    let b = table.insert(session(2, t0));
    assert_eq!(table.find(&key(1)), Some(a));
    assert_eq!(table.find(&key(2)), Some(b));
    assert_eq!(table.len(), 2);
    assert!(table.remove(a).is_some());
    assert!(table.remove(a).is_none(), "double remove is a no-op");
    assert_eq!(table.find(&key(1)), None);
    assert_eq!(table.next_slot(), a.slot(), "the freed slot is next");
    let c = table.insert(session(3, t0));
    assert_eq!(c.slot(), a.slot(), "slot reused");
    assert!(
        table.get_mut(a).is_none(),
        "stale id does not reach the new session"
    );
    assert_eq!(table.get_mut(c).unwrap().key, key(3));
}

#[test]
fn idle_sessions_expire_busy_ones_stay() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut table = SessionTable::new(t0);
    let idle = table.insert(session_idle(1, t0, timeout));
    let busy = table.insert(session_idle(2, t0, timeout));
    let mut expired = Vec::new();
    // Traffic on `busy` every second for 30 s.
    for s in 1..=30 {
        let now = t0 + Duration::from_secs(s);
        table.get_mut(busy).unwrap().last_active = now;
        table.expire_idle(now, &mut expired);
        if s < 10 {
            assert!(
                expired.is_empty(),
                "nothing expires before the timeout (t={s})"
            );
        }
    }
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].key, key(1));
    assert!(table.get_mut(idle).is_none());
    assert!(table.get_mut(busy).is_some());
    // Busy stops; it expires one timeout after its last traffic, within a tick.
    expired.clear();
    table.expire_idle(t0 + Duration::from_secs(39), &mut expired);
    assert!(expired.is_empty());
    table.expire_idle(t0 + Duration::from_secs(40) + 2 * timer::TICK, &mut expired);
    assert_eq!(expired.len(), 1);
    assert!(table.is_empty());
}

#[test]
fn expiry_is_never_early_and_at_most_a_tick_late() {
    let t0 = Instant::now();
    let timeout = Duration::from_millis(1500);
    let mut table = SessionTable::new(t0);
    let mut expired = Vec::new();
    for n in 0..100u16 {
        table.insert(session_idle(
            n,
            t0 + Duration::from_millis(u64::from(n) * 7),
            timeout,
        ));
    }
    let mut now = t0;
    while !table.is_empty() {
        now += Duration::from_millis(10);
        table.expire_idle(now, &mut expired);
        for s in expired.drain(..) {
            let idle_for = now - s.last_active;
            assert!(idle_for >= timeout, "expired early: {idle_for:?}");
            assert!(
                idle_for <= timeout + 2 * timer::TICK,
                "expired late: {idle_for:?}"
            );
        }
        assert!(now < t0 + Duration::from_secs(5));
    }
}

#[test]
fn timeouts_longer_than_a_wheel_revolution() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(300);
    let mut table = SessionTable::new(t0);
    table.insert(session_idle(1, t0, timeout));
    let mut expired = Vec::new();
    let mut now = t0;
    while now < t0 + Duration::from_secs(299) {
        now += Duration::from_secs(1);
        table.expire_idle(now, &mut expired);
    }
    assert!(expired.is_empty());
    table.expire_idle(t0 + Duration::from_secs(301), &mut expired);
    assert_eq!(expired.len(), 1);
}

#[test]
fn a_long_sleep_expires_everything_due() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    for n in 0..10 {
        table.insert(session_idle(n, t0, Duration::from_secs(1)));
    }
    let mut expired = Vec::new();
    table.expire_idle(t0 + Duration::from_secs(3600), &mut expired);
    assert_eq!(expired.len(), 10);
}

#[test]
fn next_timeout_only_with_sessions() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    assert_eq!(table.next_timeout(t0), None);
    table.insert(session(1, t0));
    assert!(table.next_timeout(t0).unwrap() <= timer::TICK);
}

#[test]
fn each_session_expires_after_its_own_timeout() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    table.insert(session_idle(1, t0, Duration::from_secs(3)));
    table.insert(session_idle(2, t0, Duration::from_secs(30)));
    table.insert(session_idle(3, t0, Duration::from_millis(500)));
    let mut expired = Vec::new();
    let mut order = Vec::new();
    let mut now = t0;
    while !table.is_empty() {
        now += timer::TICK;
        table.expire_idle(now, &mut expired);
        for s in expired.drain(..) {
            let idle_for = now - s.last_active;
            assert!(idle_for >= s.idle_timeout, "early: {idle_for:?}");
            assert!(
                idle_for <= s.idle_timeout + 2 * timer::TICK,
                "late: {idle_for:?}"
            );
            order.push(s.key);
        }
    }
    assert_eq!(order, [key(3), key(1), key(2)]);
}

#[test]
fn a_shortened_timeout_takes_effect_on_time_and_a_longer_one_waits() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    let short = table.insert(session_idle(1, t0, Duration::from_secs(300)));
    let long = table.insert(session_idle(2, t0, Duration::from_secs(1)));
    table.set_idle_timeout(short, Duration::from_secs(1));
    table.set_idle_timeout(long, Duration::from_secs(5));
    let mut expired = Vec::new();
    let mut now = t0;
    let mut ended = Vec::new();
    while now < t0 + Duration::from_secs(6) {
        now += timer::TICK;
        table.expire_idle(now, &mut expired);
        ended.extend(expired.drain(..).map(|s| (s.key, now - t0)));
    }
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(ended[0].0, key(1));
    assert!(ended[0].1 < Duration::from_secs(2), "{ended:?}");
    assert_eq!(ended[1].0, key(2));
    assert!(ended[1].1 >= Duration::from_secs(5), "{ended:?}");
}

#[test]
fn a_timeout_of_any_size_never_overflows_a_deadline() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    // 2^63 seconds, as a Route's `sessionTimeoutSeconds` could say before it was bounded.
    let huge = Duration::from_secs(1 << 63);
    let id = table.insert(session_idle(1, t0, huge));
    table.set_idle_timeout(id, Duration::MAX);
    assert!(table.next_timeout(t0).is_some());
    let mut expired = Vec::new();
    table.expire_idle(t0 + Duration::from_secs(86_400), &mut expired);
    assert!(
        expired.is_empty(),
        "a day is well within the longest timeout"
    );
    assert_eq!(idle_deadline(t0, huge), t0 + MAX_IDLE_TIMEOUT);
}

#[test]
fn each_listener_knows_its_own_sessions() {
    let t0 = Instant::now();
    let mut table = SessionTable::new(t0);
    let on = |n: u16, port: u16| {
        let mut s = session(n, t0);
        s.key.port = port;
        s
    };
    let a: Vec<SessionId> = (0..5).map(|n| table.insert(on(n, 1))).collect();
    let b: Vec<SessionId> = (10..13).map(|n| table.insert(on(n, 2))).collect();
    let sorted = |mut v: Vec<SessionId>| {
        v.sort_by_key(|id| id.slot());
        v
    };
    assert_eq!(sorted(table.on_listener(1)), a);
    assert_eq!(sorted(table.on_listener(2)), b);
    assert!(table.on_listener(3).is_empty());
    // Removing from the middle and the end keeps the others listed, under live ids.
    table.remove(a[1]);
    table.remove(a[4]);
    assert_eq!(sorted(table.on_listener(1)), vec![a[0], a[2], a[3]]);
    // A slot reused by another listener's session is listed there, not here.
    let c = table.insert(on(20, 2));
    assert_eq!(c.slot(), a[4].slot());
    assert_eq!(sorted(table.on_listener(1)), vec![a[0], a[2], a[3]]);
    assert_eq!(table.on_listener(2).len(), 4);
    for id in table.on_listener(2) {
        table.remove(id);
    }
    assert!(table.on_listener(2).is_empty());
    assert_eq!(table.len(), 3);
}
