use super::*;

const HOST: &str = "10.0.0.2";
const SECOND: Duration = Duration::from_secs(1);

fn host(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Three services on HOST; every subject the tests use exists.
fn alerts(settle_ms: u64) -> Alerts {
    let mut a = Alerts::new(
        AlertConfig::default(),
        Some(Duration::from_millis(settle_ms)),
    );
    let map = Topology::of(
        ["TCP 192.0.2.1:80", "TCP 192.0.2.1:443", "TCP 192.0.2.2:80"]
            .into_iter()
            .map(|s| (host(HOST), s))
            .chain([(host("10.0.0.9"), "s")]),
    );
    let subjects = [
        "l4 80", "l4 443", "l4 8080", "http", "x", "y", "slow", "dead",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    a.set_topology(map, &subjects);
    a
}

fn down(a: &mut Alerts, h: &str, subject: &str, at: Instant) {
    a.check_down(
        host(h),
        subject.into(),
        "L4",
        "no answer".into(),
        vec![format!("service of {subject}")],
        2 * SECOND,
        at,
    );
}

fn l7_down(a: &mut Alerts, subject: &str, at: Instant) {
    a.check_down(
        host(HOST),
        subject.into(),
        "L7",
        "HTTP 503".into(),
        vec![format!("service of {subject}")],
        2 * SECOND,
        at,
    );
}

const NONE_ALIVE: fn(IpAddr) -> bool = |_| false;

#[test]
fn a_dead_host_is_one_event_naming_every_service() {
    let mut a = alerts(1000);
    let t0 = Instant::now();
    a.host_answered(host(HOST), t0);
    for subject in ["l4 80", "l4 443", "l4 8080"] {
        down(&mut a, HOST, subject, t0);
    }
    let ms = |n| t0 + Duration::from_millis(n);
    assert!(a.poll(ms(300), NONE_ALIVE).is_empty(), "waits for L3");
    a.host_down(host(HOST), "no answer".into(), t0);
    let events = a.poll(ms(400), NONE_ALIVE);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, Kind::HostDown);
    assert_eq!(events[0].services.len(), 3);
    assert_eq!(
        events[0].message,
        "RS 10.0.0.2 down at L3 (no answer): 3 services affected \
         (TCP 192.0.2.1:443, TCP 192.0.2.1:80, TCP 192.0.2.2:80)"
    );
    assert!(a.poll(ms(5000), NONE_ALIVE).is_empty(), "nothing more");
}

#[test]
fn a_dead_service_on_a_live_host_is_its_own_event() {
    let mut a = alerts(1000);
    let t0 = Instant::now();
    a.check_down(
        host(HOST),
        "http".into(),
        "L7",
        "HTTP status 500, expected 200".into(),
        vec!["TCP 192.0.2.1:80".into(), "TCP 192.0.2.2:80".into()],
        SECOND,
        t0,
    );
    a.host_answered(host(HOST), t0 + Duration::from_millis(100));
    let events = a.poll(t0 + Duration::from_millis(100), NONE_ALIVE);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, Kind::CheckDown);
    assert_eq!(events[0].services.len(), 2);
    assert!(events[0].message.contains("status 500"));
    assert!(
        events[0].message.contains(", host up: 2 services"),
        "{}",
        events[0].message
    );
    a.check_up("http", t0 + 2 * SECOND);
    let events = a.poll(t0 + 2 * SECOND, NONE_ALIVE);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, Kind::CheckUp);
}

#[test]
fn l3_alone_does_not_make_a_host_dead() {
    // ICMP filtered from the start: L3 never answered, says nothing.
    let mut a = alerts(500);
    let t0 = Instant::now();
    down(&mut a, HOST, "l4 80", t0);
    a.host_down(host(HOST), "no answer".into(), t0);
    let events = a.poll(t0 + SECOND, NONE_ALIVE);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, Kind::CheckDown);
    assert!(
        events[0].message.contains("host never answered L3"),
        "{}",
        events[0].message
    );

    // ICMP lost while the host's L4 probes still answer: one failing
    // service is its own cause, not the host's.
    let mut a = alerts(500);
    a.host_answered(host(HOST), t0);
    down(&mut a, HOST, "l4 443", t0);
    a.host_down(host(HOST), "no answer".into(), t0);
    let events = a.poll(t0 + SECOND, |_| true);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, Kind::CheckDown);
    assert_eq!(events[0].subject, "l4 443");
    assert!(
        events[0].message.contains("host down at L3 but up at L4"),
        "{}",
        events[0].message
    );
}

#[test]
fn without_l3_answers_a_failure_is_reported_after_the_settle_time() {
    let mut a = alerts(500);
    let t0 = Instant::now();
    down(&mut a, "10.0.0.9", "x", t0);
    assert!(a
        .poll(t0 + Duration::from_millis(499), NONE_ALIVE)
        .is_empty());
    assert_eq!(a.poll(t0 + Duration::from_millis(500), NONE_ALIVE).len(), 1);
    // A blip never reported is never "up again" either.
    down(&mut a, "10.0.0.9", "y", t0);
    a.check_up("y", t0 + Duration::from_millis(100));
    assert!(a
        .poll(t0 + Duration::from_millis(600), NONE_ALIVE)
        .is_empty());
}

#[test]
fn a_failed_check_waits_for_its_hosts_probes_however_late_the_director_is() {
    let mut a = alerts(800);
    a.set_settle_probes(4);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    a.host_answered(host(HOST), t0);
    a.host_probes_sent(host(HOST), [1, 1]);
    l7_down(&mut a, "http", t0);
    let mut waiting = Vec::new();
    a.hosts_awaiting_diagnosis(&mut waiting);
    assert_eq!(waiting, [host(HOST)]);
    // Long past the window, but the stalled director has settled no
    // probe of the host since: its L3 verdict may still come.
    assert!(a.poll(at(5000), NONE_ALIVE).is_empty());
    a.host_probes_sent(host(HOST), [5, 4]);
    assert!(
        a.poll(at(5100), NONE_ALIVE).is_empty(),
        "L4 has not had its chance"
    );
    a.host_probes_sent(host(HOST), [5, 5]);
    let events = a.poll(at(5200), NONE_ALIVE);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind, events[0].subject.as_str()),
        (Kind::CheckDown, "http")
    );

    // The same with the host dying meanwhile: one host event only.
    let mut a = alerts(800);
    a.set_settle_probes(4);
    a.host_answered(host(HOST), t0);
    a.host_probes_sent(host(HOST), [1, 0]);
    l7_down(&mut a, "http", t0);
    assert!(a.poll(at(5000), NONE_ALIVE).is_empty());
    a.host_probes_sent(host(HOST), [2, 0]);
    a.host_down(host(HOST), "no answer".into(), at(6000));
    let events = a.poll(at(6000), NONE_ALIVE);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, Kind::HostDown);
}

#[test]
fn checks_coming_back_with_their_host_are_not_reported() {
    let mut a = alerts(800);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    a.host_answered(host(HOST), t0);
    down(&mut a, HOST, "slow", at(10));
    a.host_down(host(HOST), "no answer".into(), at(100));
    assert_eq!(a.poll(at(200), NONE_ALIVE).len(), 1, "the host event");
    a.host_up(host(HOST), at(5000));
    assert_eq!(a.poll(at(5000), NONE_ALIVE).len(), 1, "the host's return");
    assert!(
        a.poll(at(6500), NONE_ALIVE).is_empty(),
        "within its recovery"
    );
    a.check_up("slow", at(6600));
    assert!(
        a.poll(at(9000), NONE_ALIVE).is_empty(),
        "came back: nothing to say"
    );
    // One that stays down past its recovery is its own cause.
    down(&mut a, HOST, "dead", at(9000));
    a.host_down(host(HOST), "no answer".into(), at(9100));
    a.poll(at(9100), NONE_ALIVE);
    a.host_up(host(HOST), at(10_000));
    a.poll(at(10_000), NONE_ALIVE);
    let events = a.poll(at(12_001), NONE_ALIVE);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, Kind::CheckDown);
}

#[test]
fn a_host_answering_l4_before_l3_is_coming_back_not_failing() {
    let mut a = alerts(800);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    a.host_answered(host(HOST), t0);
    down(&mut a, HOST, "l7", at(10));
    a.host_down(host(HOST), "no answer".into(), at(100));
    assert_eq!(a.poll(at(200), NONE_ALIVE).len(), 1, "the host event");
    // Plugged back: its L4 probe is up first, L3 and the L7 check
    // follow within their recovery time.
    assert!(a.poll(at(5000), |_| true).is_empty(), "no per-check event");
    assert!(a.poll(at(6000), |_| true).is_empty());
    a.host_up(host(HOST), at(6100));
    a.check_up("l7", at(6200));
    let kinds: Vec<Kind> = a
        .poll(at(6300), |_| true)
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [Kind::HostUp]);
}

#[test]
fn what_leaves_ipvs_is_forgotten() {
    let mut a = alerts(0);
    let t0 = Instant::now();
    down(&mut a, HOST, "l4 80", t0);
    a.service_health("TCP 192.0.2.1:80", 0, 1, t0);
    assert_eq!(a.poll(t0, NONE_ALIVE).len(), 2);
    a.set_topology(Topology::default(), &HashSet::new());
    assert!(a.checks.is_empty() && a.empty_services.is_empty());
}

#[test]
fn flapping_is_one_event_then_quiet_until_stable() {
    let mut a = alerts(0);
    let t0 = Instant::now();
    let mut kinds = Vec::new();
    for i in 0..10u64 {
        let t = t0 + Duration::from_secs(i);
        a.service_health("vs", (i % 2) as usize, 2, t);
        kinds.extend(a.poll(t, NONE_ALIVE).into_iter().map(|e| e.kind));
    }
    assert_eq!(
        kinds,
        [
            Kind::ServiceEmpty,
            Kind::ServiceRestored,
            Kind::ServiceEmpty,
            Kind::ServiceRestored,
            Kind::Flapping
        ]
    );
    let later = a.poll(t0 + Duration::from_secs(100), NONE_ALIVE);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].kind, Kind::Stable);
}
