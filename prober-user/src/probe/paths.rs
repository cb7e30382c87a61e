//! Following the kernel's routes and neighbours for every target: the
//! path a probe frame takes (interface, next hop, source), next hops kept
//! resolved while probes use them, resolution retried with a back-off.

use std::net::Ipv4Addr;

use super::*;

/// A pass over every next hop in use, marking each used in turn.
pub(super) struct NeighbourKeepalive {
    hops: Vec<(u32, IpAddr)>,
    cursor: usize,
    /// When the last slice was done, and when this pass began.
    at: Instant,
    pass_started: Option<Instant>,
    /// How long one whole pass takes.
    period: Duration,
}

impl NeighbourKeepalive {
    pub(super) fn new(interface: &str) -> Self {
        // A third of the time after which the kernel may collect an idle
        // entry (procfs shows this namespace's value).
        let stale = std::fs::read_to_string(format!(
            "/proc/sys/net/ipv4/neigh/{interface}/gc_stale_time"
        ))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(60);
        Self {
            hops: Vec::new(),
            cursor: 0,
            at: Instant::now(),
            pass_started: None, // the first pass is due at once
            period: Duration::from_secs(stale.max(3) / 3),
        }
    }
}

/// Least time between two resolution requests for one next hop: a dead
/// rack costs few ARP requests.
pub(super) const RESOLUTION_BACKOFF: Duration = Duration::from_secs(60);

/// Requests to the kernel about next hops, at most one per next hop per
/// backoff: 1 s, doubling up to `most` (1 s: no backoff), fresh again after
/// a quiet `most`.
pub(super) struct Nudges {
    most: Duration,
    next: HashMap<IpAddr, (Instant, Duration)>,
}

impl Nudges {
    const FIRST: Duration = Duration::from_secs(1);

    pub(super) fn new(most: Duration) -> Self {
        Self {
            most,
            next: HashMap::new(),
        }
    }

    /// Whether `hop` may be nudged now; if so, books the next time.
    pub(super) fn allow(&mut self, hop: IpAddr, now: Instant, targets: usize) -> bool {
        let backoff = match self.next.get(&hop) {
            Some((next, _)) if now < *next => return false,
            Some((next, backoff)) if now < *next + self.most => (*backoff * 2).min(self.most),
            _ => Self::FIRST,
        };
        if self.next.len() > 2 * targets + 1024 {
            let most = self.most;
            self.next.retain(|_, (next, _)| now < *next + most);
        }
        self.next.insert(hop, (now + backoff, backoff));
        true
    }

    pub(super) fn forget(&mut self, hop: &IpAddr) {
        self.next.remove(hop);
    }
}

/// The kernel's route to `real_server`, checked to leave by the probed
/// interface (replies are matched there) and to have a source address.
pub(super) fn route_for(
    routes: &mut RouteSocket,
    real_server: IpAddr,
    probe_ifindex: u32,
    interface: &str,
) -> Result<Path> {
    let route = routes.route_to(real_server)?;
    if route.ifindex != probe_ifindex {
        bail!(
            "the route to {real_server} leaves by interface index {}, not by {interface}, where replies are matched",
            route.ifindex
        );
    }
    let source = route
        .source
        .with_context(|| format!("no source address on the route to {real_server}"))?;
    Ok(Path {
        ifindex: route.ifindex,
        next_hop: route.next_hop(real_server),
        source,
    })
}

impl Prober {
    /// Lifts the back-off on neighbour resolution requests (the link just
    /// came back and the kernel forgot every neighbour).
    pub fn resolve_neighbours_now(&mut self) {
        self.resolutions = Nudges::new(RESOLUTION_BACKOFF);
    }

    /// Whether some target waits for its next hop's MAC.
    pub fn any_neighbour_unresolved(&self) -> bool {
        !self.unresolved.is_empty()
    }

    /// The targets whose next hop's MAC is not known (as of the last
    /// neighbour read): the datapath cannot send them.
    pub fn unresolved_targets(&self) -> &[u32] {
        &self.unresolved
    }

    /// Whether target `id` waits for its next hop's MAC.
    pub fn neighbour_unresolved(&self, id: u32) -> bool {
        self.targets
            .get(id as usize)
            .and_then(Option::as_ref)
            .is_some_and(|t| t.neighbour_unresolved)
    }

    /// Target `id`'s probe went unanswered: the real server may have a new
    /// MAC address that the kernel's neighbour entry does not know yet (our
    /// probes bypass the stack, so nothing else makes the kernel check).
    /// NTF_USE is a no-op while the entry is fresh; once it is stale the
    /// kernel probes it again, and a new MAC reaches the maps through the
    /// neighbour notification. At most once a second per next hop.
    pub fn revalidate_neighbour(&mut self, id: u32) -> Result<()> {
        let Some(Ok(path)) = self
            .targets
            .get(id as usize)
            .and_then(Option::as_ref)
            .map(|t| t.path.as_ref())
        else {
            return Ok(());
        };
        let (ifindex, next_hop) = (path.ifindex, path.next_hop);
        if !self
            .revalidations
            .allow(next_hop, Instant::now(), self.ids.len())
        {
            return Ok(());
        }
        self.routes.request_resolution(ifindex, next_hop)
    }

    /// Sends an ARP request (broadcast) to the next hops of up to `most`
    /// of these probes' targets, one per next hop: the replies, counted by
    /// the ingress program, show whether the director's own path works
    /// while every probe is silent. Targets without a path are skipped.
    pub fn ask_neighbours(
        &mut self,
        probes: impl Iterator<Item = ProbeSpec>,
        most: usize,
    ) -> Result<()> {
        let mut asked: Vec<IpAddr> = Vec::with_capacity(most);
        for spec in probes {
            if asked.len() >= most {
                break;
            }
            let Some(target) = self
                .ids
                .get(&spec)
                .and_then(|&id| self.targets[id as usize].as_ref())
            else {
                continue;
            };
            let (Ok(path), Some(_), Some(src_mac)) =
                (&target.path, target.written_mac, self.src_mac)
            else {
                continue;
            };
            let (IpAddr::V4(source), IpAddr::V4(next_hop)) = (path.source, path.next_hop) else {
                continue; // IPv6 neighbours answer NDP, not ARP
            };
            if asked.contains(&path.next_hop) {
                continue;
            }
            asked.push(path.next_hop);
            let socket = match &mut self.arp_socket {
                Some(socket) => socket,
                none => none.insert(super::transmit::PacketSocket::open()?),
            };
            socket.frame.clear();
            socket
                .frame
                .extend_from_slice(&arp_request(src_mac, source, next_hop));
            socket
                .send(path.ifindex)
                .with_context(|| format!("sending an ARP request for {next_hop}"))?;
        }
        Ok(())
    }

    /// Follows the kernel: routes again after route, address or link
    /// changes (and every `ROUTE_REFRESH` in case a notification was
    /// missed), the MACs of the next hops the kernel says changed, and all
    /// MACs after paths were read, while some are unresolved or when
    /// notifications were lost. Cheap when nothing changed: one
    /// non-blocking read.
    pub fn follow_kernel(&mut self) -> Result<()> {
        let changes = self.changes.poll();
        if changes.lost {
            self.notifications_lost += 1;
            if self
                .lost_logged
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
            {
                info!(
                    times = self.notifications_lost,
                    "route and neighbour notifications lost (ENOBUFS): reading every path again"
                );
                self.lost_logged = Some(Instant::now());
            }
        }
        // A change reads every path at once (changes are rare); the
        // periodic check, in case a notification was missed, goes a slice
        // of the targets a wake (a route lookup each: 100,000 at once
        // stalled the daemon for seconds).
        let mut paths_read = false;
        if changes.routes {
            self.look_up_routes(0..self.targets.len());
            self.last_route_lookup = Instant::now();
            self.route_pass = None;
            paths_read = true;
        } else if self.route_pass.is_none() && self.last_route_lookup.elapsed() >= ROUTE_REFRESH {
            self.route_pass = Some(0);
        }
        if let Some(from) = self.route_pass {
            let to = (from + ROUTES_PER_WAKE).min(self.targets.len());
            self.look_up_routes(from..to);
            if to < self.targets.len() {
                self.route_pass = Some(to);
            } else {
                self.route_pass = None;
                self.last_route_lookup = Instant::now();
                paths_read = true;
            }
        }
        // Targets without a neighbour are retried once a second: the
        // kernel's answer also comes as a notification. (The list, not a
        // scan of every target each second: with the periodic route pass,
        // this function was a tenth of a profile at rest at 100,000.)
        let unresolved_due = !self.unresolved.is_empty()
            && self
                .last_unresolved_refresh
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if unresolved_due {
            self.last_unresolved_refresh = Some(Instant::now());
        }
        if paths_read || changes.all_neighbours || unresolved_due {
            self.refresh_neighbours()?;
        } else if changes.neighbours {
            self.follow_neighbour_changes()?;
        }
        self.keep_neighbours_alive();
        Ok(())
    }

    /// Frames sent from XDP never confirm a neighbour entry, and replies
    /// dropped in XDP never reach the neighbour code: with more on-link real
    /// servers than gc_thresh1 (128) the kernel would collect the idle
    /// entries, and probes would wait for ARP. Each next hop in use is
    /// marked used (NTF_USE, as traffic would: a stale entry is re-probed)
    /// once per a third of the interface's gc_stale_time, spread over the
    /// ticks. A failed request skips that hop.
    fn keep_neighbours_alive(&mut self) {
        let now = Instant::now();
        let period = self.keepalive.period;
        let since = now.saturating_duration_since(self.keepalive.at);
        self.keepalive.at = now;
        if self.keepalive.cursor >= self.keepalive.hops.len() {
            // One pass per period: the next starts when it is due.
            if self
                .keepalive
                .pass_started
                .is_some_and(|at| now.saturating_duration_since(at) < period)
            {
                return;
            }
            self.keepalive.pass_started = Some(now);
            let hops: std::collections::BTreeSet<(u32, IpAddr)> = self
                .targets
                .iter()
                .flatten()
                .filter(|t| t.written_mac.is_some())
                .filter_map(|t| t.path.as_ref().ok())
                .map(|p| (p.ifindex, p.next_hop))
                .collect();
            self.keepalive.hops = hops.into_iter().collect();
            self.keepalive.cursor = 0;
        }
        let len = self.keepalive.hops.len();
        let budget = ((since.as_secs_f64() / period.as_secs_f64()) * len as f64).ceil() as usize;
        let end = (self.keepalive.cursor + budget.max(1)).min(len);
        // In batches: one system call for many hops (100,000 on-link real
        // servers are 5,000 requests a second at a 60 s gc_stale_time).
        let mut failed = 0;
        for batch in self.keepalive.hops[self.keepalive.cursor..end]
            .chunks(crate::rtnetlink::KEEPALIVE_BATCH)
        {
            match self.routes.request_resolutions(batch) {
                Ok(refused) => failed += refused,
                Err(_) => failed += batch.len(),
            }
        }
        self.keepalive.cursor = end;
        if failed > 0 {
            tracing::debug!(
                failed,
                "keeping neighbour entries alive: some requests failed"
            );
        }
    }

    /// One route lookup per distinct real server of the targets with ids
    /// in `ids`.
    pub(super) fn look_up_routes(&mut self, ids: impl IntoIterator<Item = usize>) {
        let mut by_server: HashMap<IpAddr, Result<Path, String>> = HashMap::new();
        for id in ids {
            let Some(Some(target)) = self.targets.get_mut(id) else {
                continue;
            };
            let server = target.spec.real_server();
            let path = by_server
                .entry(server)
                .or_insert_with(|| {
                    route_for(&mut self.routes, server, self.ifindex, &self.interface)
                        .map_err(|e| format!("{e:#}"))
                })
                .clone();
            let path = match (path, target.spec.forwarding) {
                (Ok(path), Forwarding::DirectRouting { .. }) if path.next_hop != server => {
                    Err(format!(
                        "direct-routing real server {server} is not on-link (route via {})",
                        path.next_hop
                    ))
                }
                (path, _) => path,
            };
            if path != target.path {
                target.path_changed = true;
                self.hops_stale = true;
            }
            target.path = path;
        }
    }

    /// Reads the neighbour table once and rewrites the entries whose MAC
    /// (or path) changed; asks the kernel to resolve missing next hops.
    pub fn refresh_neighbours(&mut self) -> Result<()> {
        let neighbours: HashMap<(u32, IpAddr), [u8; 6]> = self
            .routes
            .neighbours(false)?
            .into_iter()
            .filter_map(|n| Some(((n.ifindex, n.addr), n.mac?)))
            .collect();
        self.neighbour_table_reads += 1;
        let src_mac = self.routes.link_mac(self.ifindex)?;
        // A new interface MAC: every entry is written again (remembered
        // once all are, so a failed write leaves the rest to the next read).
        let src_mac_changed = self.src_mac != Some(src_mac);
        // A hop resolved again starts its backoff afresh next time.
        for (_, addr) in neighbours.keys() {
            self.resolutions.forget(addr);
        }
        self.rewrite_entries(&neighbours, 0..self.targets.len(), src_mac, src_mac_changed)?;
        self.src_mac = Some(src_mac);
        Ok(())
    }

    /// Follows the neighbour entries the kernel just told of: only the
    /// targets behind those next hops are looked at (on-link real servers'
    /// entries change all the time, and a read of the whole table and a
    /// pass over every target each time cost a director with 100,000 of
    /// them more than its probes).
    fn follow_neighbour_changes(&mut self) -> Result<()> {
        let Some(src_mac) = self.src_mac else {
            return self.refresh_neighbours();
        };
        let mut told = std::mem::take(&mut self.neighbours_told);
        self.changes.take_neighbours(&mut told);
        if self.hops_stale {
            self.index_hops();
        }
        // The latest word on each next hop (none: gone or not usable).
        let mut neighbours: HashMap<(u32, IpAddr), [u8; 6]> = HashMap::new();
        let mut ids = Vec::new();
        for n in &told {
            let hop = (n.ifindex, n.addr);
            match n.mac {
                Some(mac) => {
                    neighbours.insert(hop, mac);
                    self.resolutions.forget(&n.addr);
                }
                None => {
                    neighbours.remove(&hop);
                }
            }
            let from = self.by_hop.partition_point(|(h, _)| *h < hop);
            ids.extend(
                self.by_hop[from..]
                    .iter()
                    .take_while(|(h, _)| *h == hop)
                    .map(|&(_, id)| id as usize),
            );
        }
        self.neighbour_changes_followed += told.len() as u64;
        self.neighbours_told = told;
        ids.sort_unstable();
        ids.dedup();
        self.rewrite_entries(&neighbours, ids.into_iter(), src_mac, false)
    }

    /// Target ids by next hop, for [`Prober::follow_neighbour_changes`].
    fn index_hops(&mut self) {
        self.by_hop.clear();
        self.by_hop
            .extend(self.targets.iter().enumerate().filter_map(|(id, t)| {
                let path = t.as_ref()?.path.as_ref().ok()?;
                Some(((path.ifindex, path.next_hop), id as u32))
            }));
        self.by_hop.sort_unstable();
        self.hops_stale = false;
    }

    /// Writes the entries of targets `ids` from `neighbours` (their next
    /// hops' MACs, as the kernel has them; a hop missing is unresolved and
    /// its resolution is asked for), where the MAC, the path or the
    /// interface's MAC changed.
    fn rewrite_entries(
        &mut self,
        neighbours: &HashMap<(u32, IpAddr), [u8; 6]>,
        ids: impl Iterator<Item = usize>,
        src_mac: [u8; 6],
        src_mac_changed: bool,
    ) -> Result<()> {
        let now = Instant::now();
        let mut resolution_requested = std::collections::HashSet::new();
        let mut said: std::collections::BTreeMap<Option<String>, (usize, ProbeSpec)> =
            Default::default();
        // Targets whose next hop became resolved or unresolved.
        let mut flipped = Vec::new();
        for id in ids {
            let Some(target) = &self.targets[id] else {
                continue;
            };
            let resolved = match &target.path {
                Err(problem) => Err(problem.clone()),
                Ok(path) => match neighbours.get(&(path.ifindex, path.next_hop)) {
                    Some(mac) => Ok((*mac, path)),
                    None => {
                        if resolution_requested.insert(path.next_hop)
                            && self.resolutions.allow(path.next_hop, now, self.ids.len())
                        {
                            // A failed request skips this hop, not the rest.
                            if let Err(e) =
                                self.routes.request_resolution(path.ifindex, path.next_hop)
                            {
                                warn!("{e:#}");
                            }
                        }
                        Err(format!(
                            "neighbour {} on {} is not resolved yet (resolution requested)",
                            path.next_hop, self.interface
                        ))
                    }
                },
            };
            let unresolved = matches!(&target.path, Ok(path) if !neighbours.contains_key(&(path.ifindex, path.next_hop)));
            let (entry, problem) = match resolved {
                Ok((mac, path)) => {
                    let entry = probe_entry(target, path, src_mac, mac);
                    (Some((mac, entry)), None)
                }
                Err(problem) => (None, Some(problem)),
            };
            let Some(target) = &mut self.targets[id] else {
                continue;
            };
            if target.neighbour_unresolved != unresolved {
                target.neighbour_unresolved = unresolved;
                flipped.push(id as u32);
            }
            let problem_hash = problem.as_deref().map_or(0, problem_hash);
            if target.problem != problem_hash {
                // Said once per problem (a dead next hop can hold
                // thousands of targets), with a count and one example.
                let said = said.entry(problem.clone()).or_insert((0, target.spec));
                said.0 += 1;
            }
            let mac = entry.map(|(mac, _)| mac);
            let stale = target.path_changed || src_mac_changed;
            if mac != target.written_mac || (mac.is_some() && stale) {
                let written = entry.map(|(_, e)| e).unwrap_or_default(); // kind 0: slot unused
                self.maps
                    .targets
                    .set(id as u32, written, 0)
                    .context("writing PROBE_TARGETS")?;
                let key = reply_key(&target.spec, target.local_port);
                if entry.is_some() {
                    self.maps
                        .reply_index
                        .insert(key, id as u32, 0)
                        .context("writing REPLY_INDEX")?;
                } else if target.written_mac.is_some() {
                    let _ = self.maps.reply_index.remove(&key);
                }
                target.written_mac = mac;
            }
            target.path_changed = false;
            target.problem = problem_hash;
        }
        for (problem, (targets, example)) in said {
            match problem {
                Some(p) => warn!(targets, example = %example, "cannot probe: {p}"),
                None => info!(targets, example = %example, "paths resolved"),
            }
        }
        // The unresolved list stays in id order: a few changes in place,
        // many (a link that went down or came back) by a pass over all.
        if flipped.len() > 64 {
            self.unresolved.clear();
            self.unresolved.extend(
                self.targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.as_ref().is_some_and(|t| t.neighbour_unresolved))
                    .map(|(id, _)| id as u32),
            );
        } else {
            for id in flipped {
                match self.unresolved.binary_search(&id) {
                    Ok(i) => {
                        self.unresolved.remove(i);
                    }
                    Err(i) => self.unresolved.insert(i, id),
                }
            }
        }
        Ok(())
    }
}

/// A problem's text hashed, never 0 (which stands for none).
fn problem_hash(problem: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut hasher = rustc_hash::FxHasher::default();
    problem.hash(&mut hasher);
    (hasher.finish() as u32).max(1)
}

/// A broadcast ARP request from `source` (at `mac`) for `target`.
fn arp_request(mac: [u8; 6], source: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6- and 4-byte addresses, a request.
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&source.octets());
    frame[38..42].copy_from_slice(&target.octets());
    frame
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_arp_request_asks_who_has_the_target_from_the_director() {
        let mac = [2, 0, 0, 0, 0, 1];
        let frame = super::arp_request(mac, [192, 0, 2, 1].into(), [192, 0, 2, 9].into());
        // As tcpdump would decode it: broadcast, ARP, "who-has 192.0.2.9
        // tell 192.0.2.1".
        assert_eq!(&frame[..6], &[0xff; 6]);
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(&frame[12..14], &[8, 6]);
        assert_eq!(&frame[20..22], &[0, 1], "a request");
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[192, 0, 2, 1]);
        assert_eq!(&frame[32..38], &[0; 6], "target hardware address unknown");
        assert_eq!(&frame[38..42], &[192, 0, 2, 9]);
    }
}
