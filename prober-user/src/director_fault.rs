//! When to fail open: only when the evidence points at the director's own
//! path, not at the real servers. A real server that dies goes to weight 0
//! (keepalived's and HAProxy's behaviour); keeping weights is right only
//! when the director itself has lost the network: its interface has no
//! carrier, or every probe that was answering stopped being answered at
//! once across several hosts *and* the neighbours it asks (ARP) do not
//! answer either. When they do answer, the director's path works and the
//! silence is the real servers': every one of them goes to weight 0, as
//! when they all die. Pure: the controller feeds it each probe's result,
//! the ARP replies the datapath saw, and asks it once per tick.
//!
//! A refusal (RST) or an ICMP unreachable is an answer for this purpose:
//! something on the far side spoke, so the director's path works.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::probe::ProbeSpec;

/// Fewest distinct real-server hosts whose probes must all go silent
/// together before the director is suspected: one or two hosts dying at
/// once is an ordinary failure and goes to weight 0.
pub const MIN_SILENT_HOSTS: usize = 3;

/// How long the director asks its neighbours (ARP) after every probe went
/// silent before it suspects its own path. A working path answers within
/// milliseconds; weights are held meanwhile.
pub const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

/// Why the director's own path is suspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suspicion {
    /// The probing interface has no carrier (or is administratively
    /// down), or has not carried an answer since it came back.
    LinkDown,
    /// Every probe that was answering went unanswered since the last
    /// answer: `probes` probes of `hosts` hosts, and no neighbour answered
    /// ARP either.
    AllSilent { probes: usize, hosts: usize },
}

impl std::fmt::Display for Suspicion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Suspicion::LinkDown => write!(f, "the probing interface has no carrier"),
            Suspicion::AllSilent { probes, hosts } => write!(
                f,
                "all {probes} probes of {hosts} real server hosts went unanswered at once, and no neighbour answered ARP"
            ),
        }
    }
}

/// A change of the verdict, to log and alert once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Suspected(Suspicion),
    Cleared,
    /// Every answering probe went silent but neighbours answer ARP: the
    /// real servers are silent, not the director (said once per silence).
    ServersSilent {
        probes: usize,
        hosts: usize,
    },
}

#[derive(Debug, Default)]
pub struct DirectorPath {
    /// Probes that were up when the last answer came (the ones that
    /// must all fall silent).
    up_at_last_answer: usize,
    /// Whether any probe has been answered in this run: silence from the
    /// start says nothing about the director.
    answered_ever: bool,
    /// Probes, and their hosts, that went unanswered since the last answer.
    silent: HashSet<ProbeSpec>,
    silent_hosts: HashSet<IpAddr>,
    answered_this_tick: bool,
    /// A neighbour answered ARP since the last probe answer.
    neighbour_answered: bool,
    /// Since when every answering probe is silent with no neighbour heard:
    /// the neighbours are being asked, and weights held.
    asking_since: Option<Instant>,
    /// The silence was put down to the real servers (and said).
    servers_silent: bool,
    /// The link went down: suspected until a probe is answered after it
    /// is back (neighbours are resolved again meanwhile).
    awaiting_answer: bool,
    suspicion: Option<Suspicion>,
}

impl DirectorPath {
    pub fn new() -> Self {
        Self::default()
    }

    /// One probe's settled result: `replied` when anything answered it
    /// (SYN-ACK, RST, echo reply, ICMP error), false for a timeout.
    pub fn probe_result(&mut self, probe: ProbeSpec, host: IpAddr, replied: bool) {
        if replied {
            self.answered_this_tick = true;
        } else if self.silent.insert(probe) {
            self.silent_hosts.insert(host);
        }
    }

    /// Something answered a probe this tick (the datapath's count of
    /// matched replies moved): the path works.
    pub fn answered(&mut self) {
        self.answered_this_tick = true;
    }

    /// A neighbour answered ARP (the datapath's count of ARP replies
    /// moved): the director's own path works.
    pub fn neighbour_answered(&mut self) {
        self.neighbour_answered = true;
    }

    /// The verdict after a tick's results; `up_probes` is how many probes
    /// are up now, `link_up` whether the interface has carrier.
    pub fn end_tick(&mut self, up_probes: usize, link_up: bool, now: Instant) -> Option<Change> {
        if std::mem::take(&mut self.answered_this_tick) {
            self.answered_ever = true;
            self.up_at_last_answer = up_probes;
            self.silent.clear();
            self.silent_hosts.clear();
            self.neighbour_answered = false;
            self.servers_silent = false;
            if link_up {
                self.awaiting_answer = false;
            }
        }
        let all_silent = self.answered_ever
            && self.up_at_last_answer > 0
            && self.silent.len() >= self.up_at_last_answer
            && self.silent_hosts.len() >= MIN_SILENT_HOSTS;
        if !all_silent || self.neighbour_answered {
            self.asking_since = None;
        }
        let verdict = if !link_up {
            self.awaiting_answer = true;
            Some(Suspicion::LinkDown)
        } else if self.awaiting_answer {
            Some(Suspicion::LinkDown)
        } else if all_silent && !self.neighbour_answered {
            let since = *self.asking_since.get_or_insert(now);
            (now.saturating_duration_since(since) >= NEIGHBOUR_WAIT).then_some(
                Suspicion::AllSilent {
                    probes: self.silent.len(),
                    hosts: self.silent_hosts.len(),
                },
            )
        } else {
            None
        };
        let change = match (&self.suspicion, &verdict) {
            (None, Some(s)) => {
                self.suspicion = verdict.clone();
                Some(Change::Suspected(s.clone()))
            }
            (Some(_), None) => {
                self.suspicion = None;
                Some(Change::Cleared)
            }
            // A suspicion that changes reason stays one suspicion.
            _ => None,
        };
        if change.is_none()
            && self.suspicion.is_none()
            && all_silent
            && self.neighbour_answered
            && !std::mem::replace(&mut self.servers_silent, true)
        {
            return Some(Change::ServersSilent {
                probes: self.silent.len(),
                hosts: self.silent_hosts.len(),
            });
        }
        change
    }

    /// The director's own path is suspected: weights are kept (fail
    /// open) and one alert stands for every server.
    pub fn suspected(&self) -> Option<&Suspicion> {
        self.suspicion.as_ref()
    }

    /// Whether weights are held now: suspected, or still asking the
    /// neighbours whether the silence is the director's.
    pub fn holding(&self) -> bool {
        self.suspicion.is_some() || self.asking_since.is_some()
    }

    /// Whether neighbours should be asked (ARP) now: every answering probe
    /// is silent and none has answered yet.
    pub fn asking_neighbours(&self) -> bool {
        self.asking_since.is_some()
    }

    /// The probes that went silent since the last answer.
    pub fn silent_probes(&self) -> impl Iterator<Item = &ProbeSpec> {
        self.silent.iter()
    }

    /// Probes that left the plan no longer count.
    pub fn retain(&mut self, keep: impl Fn(&ProbeSpec) -> bool) {
        self.silent.retain(|p| keep(p));
        self.silent_hosts = self.silent.iter().map(|p| p.real_server()).collect();
    }
}

/// Whether interface `name` is up with carrier (IFF_UP and IFF_RUNNING),
/// asked of the kernel in this network namespace (sysfs may show another
/// namespace's interfaces when /sys was not remounted, as under
/// `nsenter`). A failed question says nothing: up.
pub fn link_up(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return true;
    }
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return true;
    }
    // SAFETY: an all-zero ifreq is valid; the name fits with its NUL.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `request`.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut request) };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return true;
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
    flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Forwarding, ProbeKind};

    fn probe(host: u8) -> ProbeSpec {
        ProbeSpec {
            kind: ProbeKind::TcpSyn { port: 80 },
            destination: IpAddr::from([192, 0, 2, host]),
            forwarding: Forwarding::Direct,
        }
    }

    /// A director path with a clock: each tick comes `step` after the
    /// last.
    struct Bed {
        path: DirectorPath,
        now: Instant,
        step: Duration,
    }

    impl Bed {
        fn new() -> Self {
            Self {
                path: DirectorPath::new(),
                now: Instant::now(),
                step: Duration::from_millis(400),
            }
        }

        /// One tick: `answers` hosts reply, `silent` hosts time out.
        fn tick(&mut self, answers: &[u8], silent: &[u8], up: usize, link: bool) -> Option<Change> {
            for &h in answers {
                self.path
                    .probe_result(probe(h), probe(h).real_server(), true);
            }
            for &h in silent {
                self.path
                    .probe_result(probe(h), probe(h).real_server(), false);
            }
            self.now += self.step;
            self.path.end_tick(up, link, self.now)
        }

        /// Ticks with nothing new until `NEIGHBOUR_WAIT` has passed since
        /// the silence: what the last of them said.
        fn wait_for_neighbours(&mut self, up: usize) -> Option<Change> {
            let mut said = None;
            for _ in 0..NEIGHBOUR_WAIT.as_millis().div_ceil(self.step.as_millis()) {
                said = said.or(self.tick(&[], &[], up, true));
            }
            said
        }
    }

    #[test]
    fn servers_dying_while_others_answer_are_no_director_fault() {
        let mut bed = Bed::new();
        assert_eq!(bed.tick(&[1, 2, 3, 4], &[], 4, true), None);
        for _ in 0..5 {
            assert_eq!(bed.tick(&[4], &[1, 2, 3], 4, true), None);
        }
        assert_eq!(bed.path.suspected(), None);
        assert!(!bed.path.holding());
    }

    #[test]
    fn one_or_two_hosts_going_silent_together_are_no_director_fault() {
        for pool in [1u8, 2] {
            let hosts: Vec<u8> = (1..=pool).collect();
            let mut bed = Bed::new();
            bed.tick(&hosts, &[], hosts.len(), true);
            for _ in 0..5 {
                assert_eq!(bed.tick(&[], &hosts, hosts.len(), true), None);
                assert!(!bed.path.holding());
            }
        }
    }

    #[test]
    fn every_answering_probe_silent_with_no_neighbour_answering_is_suspected_and_clears_on_an_answer(
    ) {
        let mut bed = Bed::new();
        bed.tick(&[1, 2, 3, 4], &[], 4, true);
        // The neighbours are asked first; weights are held meanwhile.
        assert_eq!(bed.tick(&[], &[1, 2, 3, 4], 4, true), None);
        assert!(bed.path.holding() && bed.path.asking_neighbours());
        assert_eq!(bed.path.suspected(), None);
        assert_eq!(
            bed.wait_for_neighbours(4),
            Some(Change::Suspected(Suspicion::AllSilent {
                probes: 4,
                hosts: 4
            }))
        );
        assert_eq!(bed.tick(&[], &[1, 2, 3, 4], 4, true), None, "once");
        assert!(bed.path.suspected().is_some() && bed.path.asking_neighbours());
        assert_eq!(bed.tick(&[2], &[1, 3, 4], 4, true), Some(Change::Cleared));
        assert!(!bed.path.holding());
    }

    #[test]
    fn every_probe_silent_while_a_neighbour_answers_is_the_servers_not_the_director() {
        let mut bed = Bed::new();
        bed.tick(&[1, 2, 3, 4], &[], 4, true);
        assert_eq!(bed.tick(&[], &[1, 2, 3, 4], 4, true), None);
        assert!(bed.path.holding());
        bed.path.neighbour_answered();
        assert_eq!(
            bed.tick(&[], &[], 4, true),
            Some(Change::ServersSilent {
                probes: 4,
                hosts: 4
            })
        );
        assert!(!bed.path.holding() && !bed.path.asking_neighbours());
        assert_eq!(
            bed.wait_for_neighbours(4),
            None,
            "said once, never suspected"
        );
        assert_eq!(bed.path.suspected(), None);
        // Once probes are answered again a new silence asks again.
        bed.tick(&[1, 2, 3, 4], &[], 4, true);
        assert_eq!(bed.tick(&[], &[1, 2, 3, 4], 4, true), None);
        assert!(bed.path.asking_neighbours());
    }

    #[test]
    fn a_neighbour_answering_after_the_suspicion_clears_it() {
        let mut bed = Bed::new();
        bed.tick(&[1, 2, 3], &[], 3, true);
        bed.tick(&[], &[1, 2, 3], 3, true);
        assert!(matches!(
            bed.wait_for_neighbours(3),
            Some(Change::Suspected(_))
        ));
        bed.path.neighbour_answered();
        assert_eq!(bed.tick(&[], &[], 3, true), Some(Change::Cleared));
        assert_eq!(
            bed.tick(&[], &[], 3, true),
            Some(Change::ServersSilent {
                probes: 3,
                hosts: 3
            })
        );
        assert!(!bed.path.holding());
    }

    #[test]
    fn silence_spread_over_ticks_counts_until_an_answer() {
        let mut bed = Bed::new();
        bed.tick(&[1, 2, 3], &[], 3, true);
        assert_eq!(bed.tick(&[], &[1, 2], 3, true), None);
        assert!(!bed.path.holding());
        assert_eq!(bed.tick(&[], &[3], 3, true), None);
        assert!(bed.path.holding());
        assert!(matches!(
            bed.wait_for_neighbours(3),
            Some(Change::Suspected(_))
        ));
    }

    #[test]
    fn silence_from_the_start_says_nothing() {
        let mut bed = Bed::new();
        for _ in 0..6 {
            assert_eq!(bed.tick(&[], &[1, 2, 3, 4], 4, true), None);
            assert!(!bed.path.holding());
        }
    }

    #[test]
    fn loopback_is_up_and_a_missing_interface_says_nothing() {
        assert!(link_up("lo"));
        assert!(link_up("no-such-if0"));
    }

    #[test]
    fn a_link_without_carrier_is_suspected_at_once() {
        let mut bed = Bed::new();
        assert_eq!(
            bed.tick(&[1], &[], 1, false),
            Some(Change::Suspected(Suspicion::LinkDown))
        );
        assert_eq!(bed.tick(&[1], &[], 1, true), Some(Change::Cleared));
        // Back up but nothing answered yet (neighbours being resolved
        // again): still the director's fault.
        bed.tick(&[], &[], 1, false);
        assert_eq!(bed.tick(&[], &[1], 1, true), None);
        assert!(bed.path.suspected().is_some());
        assert_eq!(bed.tick(&[1], &[], 1, true), Some(Change::Cleared));
    }
}
