//! The IPVS generic netlink socket: family lookup, dumps (multi-part, any
//! size, retried when interrupted) and pipelined weight writes.

use std::{os::fd::AsRawFd, time::Duration};

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use crate::{
    netlink::{self, Reply, NLM_F_DUMP_INTR},
    Destination, DestinationKey, IpvsError, IpvsInfo, Service, ServiceKey, VirtualService,
    MAX_WEIGHT,
};

/// Dump chunks are up to 32 KiB; a bigger buffer never truncates one.
const RECEIVE_BUFFER: usize = 64 * 1024;
/// Socket receive queue asked for (as root), so a batch's acks never overflow it.
const RECEIVE_QUEUE: usize = 4 * 1024 * 1024;
/// Weight writes sent before their acks are read: bounded so the acks fit
/// the receive queue even when the kernel refuses to enlarge it.
const BATCH_WINDOW: usize = 128;
/// How often a dump that changed under us is restarted before giving up.
const DUMP_ATTEMPTS: u32 = 5;
/// A reply that takes longer means the kernel lost our request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A weight to set: the destination as last dumped (its forwarding,
/// thresholds and tunnel settings are sent back unchanged) and its new weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightUpdate {
    pub service: ServiceKey,
    pub destination: Destination,
    pub weight: u32,
}

/// One update of a batch that did not apply.
#[derive(Debug)]
pub struct WeightFailure {
    /// Its position in the batch.
    pub index: usize,
    pub service: ServiceKey,
    pub destination: DestinationKey,
    pub error: IpvsError,
}

/// A weight to set only if the destination still holds `expected`: the
/// destination's other settings are read fresh just before the write, so
/// whatever an operator changed since the last dump (forwarding,
/// thresholds, tunnel) is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChange {
    pub service: ServiceKey,
    pub destination: DestinationKey,
    /// The weight prober believes IPVS holds.
    pub expected: u32,
    pub weight: u32,
}

/// What came of a batch of [`WeightChange`]s, by position in the batch.
#[derive(Debug, Default)]
pub struct ChangeOutcome {
    /// Written and acknowledged.
    pub applied: Vec<usize>,
    /// Not written: the destination holds another weight than expected
    /// (someone else changed it); it is given as read.
    pub changed_by_others: Vec<(usize, Destination)>,
    /// Not written: the destination or its service is gone.
    pub gone: Vec<usize>,
    /// Refused by the kernel.
    pub failed: Vec<WeightFailure>,
    /// The socket failed: these changes' outcome is unknown (sent, not
    /// acknowledged: some may have applied), and the error.
    pub unknown: Option<(Vec<usize>, IpvsError)>,
    /// Not sent, after the socket failed: not applied.
    pub not_sent: Vec<usize>,
}

/// Where requests go and replies come from: the kernel's netlink socket,
/// or in unit tests a scripted stand-in.
pub(crate) trait Transport: Send {
    fn send(&mut self, datagram: &[u8]) -> std::io::Result<()>;
    /// Receives one datagram into `buffer` (emptied first, filled up to its
    /// capacity) and returns its full length, which exceeds what `buffer`
    /// holds when the datagram was truncated.
    fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize>;
    /// Drops whatever replies are queued, without waiting.
    fn discard_queued(&mut self) {}
}

struct KernelSocket(Socket);

impl Transport for KernelSocket {
    fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
        self.0.send(datagram, 0).map(|_| ())
    }

    fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
        buffer.clear();
        // MSG_TRUNC: the return value is the datagram's real length.
        self.0.recv(buffer, libc::MSG_TRUNC)
    }

    fn discard_queued(&mut self) {
        let mut scratch = Vec::with_capacity(RECEIVE_BUFFER);
        // Bounded: the queue holds at most RECEIVE_QUEUE bytes.
        for _ in 0..RECEIVE_QUEUE / 64 {
            scratch.clear();
            if self
                .0
                .recv(&mut scratch, libc::MSG_TRUNC | libc::MSG_DONTWAIT)
                .is_err()
            {
                break;
            }
        }
    }
}

/// A connection to the kernel's IPVS over generic netlink.
pub struct IpvsClient {
    transport: Box<dyn Transport>,
    family: u16,
    next_seq: u32,
    buffer: Vec<u8>,
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the "IPVS" family, which
    /// loads the ip_vs module where modules can load.
    pub fn connect() -> Result<Self, IpvsError> {
        Self::connect_with_receive_queue(RECEIVE_QUEUE)
    }

    /// As [`IpvsClient::connect`], asking for a receive queue of `bytes`.
    /// Fault tests ask for one too small for a batch's acks: the kernel
    /// then applies every write, drops the acks that overflow and reports
    /// ENOBUFS, which is a batch whose outcome is partly unknown.
    pub fn connect_with_receive_queue(bytes: usize) -> Result<Self, IpvsError> {
        let socket_error = |operation: &str| {
            let operation = operation.to_string();
            move |source| IpvsError::Socket { operation, source }
        };
        let mut socket =
            Socket::new(NETLINK_GENERIC).map_err(socket_error("opening a netlink socket"))?;
        socket
            .bind_auto()
            .map_err(socket_error("binding the netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_error("connecting the netlink socket to the kernel"))?;
        // Small acks for failed writes: the header of the request is enough
        // to match them, the rest of it needs no echo.
        let _ = socket.set_cap_ack(true);
        set_receive_queue(&socket, bytes);
        set_receive_timeout(&socket, REPLY_TIMEOUT)
            .map_err(socket_error("setting the netlink receive timeout"))?;
        let mut client = Self::with_transport(Box::new(KernelSocket(socket)), 0);
        client.family = client.resolve_family()?;
        Ok(client)
    }

    pub(crate) fn with_transport(transport: Box<dyn Transport>, family: u16) -> Self {
        Self {
            transport,
            family,
            next_seq: 1,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        }
    }

    /// The generic netlink id of the IPVS family.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        const OPERATION: &str = "looking up the IPVS generic netlink family";
        let seq = self.seq();
        self.send(&netlink::get_family_request(seq), OPERATION)?;
        let mut family = None;
        self.receive_replies(seq, OPERATION, |reply| match reply {
            Reply::Data { attributes, .. } => {
                family = Some(netlink::parse_family_id(attributes)?);
                Ok(Flow::Stop)
            }
            _ => Ok(Flow::Continue),
        })
        .map_err(|e| match e {
            // The controller has no family of that name, and loading
            // ip_vs on demand did not register one.
            ReceiveError::Errno(libc::ENOENT) => IpvsError::NotAvailable,
            other => other.into_ipvs(OPERATION, None, None, None),
        })?;
        family.ok_or_else(|| malformed(OPERATION, "the family reply had no data"))
    }

    /// IPVS version and connection table size.
    pub fn info(&mut self) -> Result<IpvsInfo, IpvsError> {
        const OPERATION: &str = "reading IPVS info";
        let seq = self.seq();
        self.send(&netlink::get_info_request(self.family, seq), OPERATION)?;
        let mut info = None;
        self.receive_replies(seq, OPERATION, |reply| match reply {
            Reply::Data { attributes, .. } => {
                info = Some(netlink::parse_info(attributes)?);
                Ok(Flow::Stop)
            }
            _ => Ok(Flow::Continue),
        })
        .map_err(|e| e.into_ipvs(OPERATION, None, None, None))?;
        info.ok_or_else(|| malformed(OPERATION, "GET_INFO had no data"))
    }

    /// Every virtual service (without destinations).
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        const OPERATION: &str = "listing virtual services";
        let family = self.family;
        self.run_dump(
            OPERATION,
            None,
            |seq| netlink::dump_services_request(family, seq),
            netlink::parse_service,
        )
    }

    /// One virtual service; [`IpvsError::NoSuchService`] when it is absent.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Service, IpvsError> {
        let operation = format!("reading virtual service {key}");
        let seq = self.seq();
        self.send(
            &netlink::get_service_request(self.family, seq, key),
            &operation,
        )?;
        let mut service = None;
        self.receive_replies(seq, &operation, |reply| match reply {
            Reply::Data { attributes, .. } => {
                service = Some(netlink::parse_service(attributes)?);
                Ok(Flow::Stop)
            }
            _ => Ok(Flow::Continue),
        })
        .map_err(|e| e.into_ipvs(&operation, Some(key), None, None))?;
        service.ok_or_else(|| malformed(&operation, "GET_SERVICE had no data"))
    }

    /// The destinations of one service; [`IpvsError::NoSuchService`] when
    /// the service is absent (a dump alone cannot tell: it comes back empty).
    pub fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        self.service(key)?;
        self.dump_destinations(key)
    }

    fn dump_destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        let operation = format!("listing the real servers of {key}");
        let family = self.family;
        let service_family = key.family();
        self.run_dump(
            &operation,
            Some(key),
            |seq| netlink::dump_destinations_request(family, seq, key),
            |attributes| netlink::parse_destination(attributes, service_family),
        )
    }

    /// Every service with all its destinations. A service removed between
    /// the two dumps shows with no destinations.
    pub fn dump(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
        let services = self.services()?;
        let mut dumped = Vec::with_capacity(services.len());
        for service in services {
            let destinations = self.dump_destinations(&service.key)?;
            dumped.push(VirtualService {
                service,
                destinations,
            });
        }
        Ok(dumped)
    }

    /// Sets one weight by read-modify-write: reads the destination's
    /// current settings, then writes them back with `weight`.
    pub fn set_weight(
        &mut self,
        service: &ServiceKey,
        destination: &DestinationKey,
        weight: u32,
    ) -> Result<(), IpvsError> {
        check_weight(service, destination, weight)?;
        let current = self
            .destinations(service)?
            .into_iter()
            .find(|d| d.key() == *destination)
            .ok_or_else(|| IpvsError::NoSuchDestination {
                operation: format!("setting the weight of {destination} in {service}"),
                service: *service,
                destination: *destination,
            })?;
        let update = WeightUpdate {
            service: *service,
            destination: current,
            weight,
        };
        match self.set_weights(std::slice::from_ref(&update))?.pop() {
            Some(failure) => Err(failure.error),
            None => Ok(()),
        }
    }

    /// Writes many weights, each by a fresh read-modify-write: the
    /// destinations of every service touched are read once, just before
    /// the batch; a change whose destination no longer holds the expected
    /// weight is not written (an operator's change wins) and one whose
    /// destination is gone is skipped. The rest go out pipelined as in
    /// [`IpvsClient::set_weights`].
    pub fn change_weights(&mut self, changes: &[WeightChange]) -> ChangeOutcome {
        let mut outcome = ChangeOutcome::default();
        let mut fresh: std::collections::HashMap<ServiceKey, Vec<Destination>> =
            std::collections::HashMap::new();
        let mut updates = Vec::with_capacity(changes.len());
        let mut positions = Vec::with_capacity(changes.len());
        for (index, change) in changes.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(slot) = fresh.entry(change.service) {
                match self.destinations(&change.service) {
                    Ok(list) => {
                        slot.insert(list);
                    }
                    Err(IpvsError::NoSuchService { .. }) => {
                        slot.insert(Vec::new());
                    }
                    Err(error) => {
                        // Nothing written yet: the ones queued and the
                        // rest are not applied.
                        outcome.not_sent = positions;
                        outcome.not_sent.extend(index..changes.len());
                        outcome.unknown = Some((Vec::new(), error));
                        return outcome;
                    }
                }
            }
            let current = fresh[&change.service]
                .iter()
                .find(|d| d.key() == change.destination);
            match current {
                None => outcome.gone.push(index),
                Some(d) if d.weight != change.expected => {
                    outcome.changed_by_others.push((index, d.clone()))
                }
                Some(d) => {
                    updates.push(WeightUpdate {
                        service: change.service,
                        destination: d.clone(),
                        weight: change.weight,
                    });
                    positions.push(index);
                }
            }
        }
        // Window by window, so a socket failure leaves exactly one window
        // of unknown outcome: those before it were acknowledged, those
        // after it never sent.
        for (w, window) in updates.chunks(BATCH_WINDOW).enumerate() {
            let at = |i: usize| positions[w * BATCH_WINDOW + i];
            match self.set_weights(window) {
                Ok(failures) => {
                    let refused: std::collections::HashSet<usize> =
                        failures.iter().map(|f| f.index).collect();
                    outcome
                        .applied
                        .extend((0..window.len()).filter(|i| !refused.contains(i)).map(at));
                    outcome.failed.extend(failures.into_iter().map(|mut f| {
                        f.index = at(f.index);
                        f
                    }));
                }
                Err(error) => {
                    outcome.unknown = Some(((0..window.len()).map(at).collect(), error));
                    let next = ((w + 1) * BATCH_WINDOW).min(positions.len());
                    outcome.not_sent = positions[next..].to_vec();
                    break;
                }
            }
        }
        outcome
    }

    /// Writes many weights, pipelined: up to [`BATCH_WINDOW`] requests per
    /// send, then their acks. Each update carries the destination as dumped,
    /// whose forwarding, thresholds and tunnel settings are sent back as
    /// they are. Returns the updates that failed, each with its error; an
    /// `Err` means the socket itself failed and later updates were not sent.
    pub fn set_weights(
        &mut self,
        updates: &[WeightUpdate],
    ) -> Result<Vec<WeightFailure>, IpvsError> {
        let mut failures = Vec::new();
        for (window_index, window) in updates.chunks(BATCH_WINDOW).enumerate() {
            let first_index = window_index * BATCH_WINDOW;
            let mut datagram = Vec::with_capacity(window.len() * 160);
            // seq -> index in `updates`, for the requests actually sent.
            let mut pending = Vec::with_capacity(window.len());
            for (offset, update) in window.iter().enumerate() {
                let index = first_index + offset;
                let key = update.destination.key();
                if let Err(error) = check_weight(&update.service, &key, update.weight) {
                    failures.push(WeightFailure {
                        index,
                        service: update.service,
                        destination: key,
                        error,
                    });
                    continue;
                }
                let seq = self.seq();
                datagram.extend_from_slice(&netlink::set_destination_request(
                    self.family,
                    seq,
                    &update.service,
                    &update.destination,
                    update.weight,
                ));
                pending.push((seq, index));
            }
            if pending.is_empty() {
                continue;
            }
            const OPERATION: &str = "setting weights";
            self.send(&datagram, OPERATION)?;
            let mut answered = 0;
            let first_seq = pending[0].0;
            let last_seq = pending[pending.len() - 1].0;
            self.receive(OPERATION, |message| {
                // Offsets from the first request, so a window that spans the
                // sequence number's wrap still matches.
                let offset = message.seq.wrapping_sub(first_seq);
                if offset > last_seq.wrapping_sub(first_seq) {
                    return Ok(Flow::Continue); // a stale reply of an earlier request
                }
                let index = pending[offset as usize].1;
                match netlink::reply(message)? {
                    Reply::Ack => answered += 1,
                    Reply::Error { errno } => {
                        answered += 1;
                        let update = &updates[index];
                        let key = update.destination.key();
                        failures.push(WeightFailure {
                            index,
                            service: update.service,
                            destination: key,
                            error: IpvsError::from_errno(
                                errno,
                                &format!(
                                    "setting the weight of {key} in {} to {}",
                                    update.service, update.weight
                                ),
                                Some(&update.service),
                                Some(&key),
                                Some(update.weight),
                            ),
                        });
                    }
                    _ => {}
                }
                Ok(if answered == pending.len() {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            })?;
        }
        failures.sort_by_key(|f| f.index);
        Ok(failures)
    }

    fn seq(&mut self) -> u32 {
        let seq = self.next_seq;
        // Wraps after 4 billion requests; 0 is left out as "unsolicited".
        self.next_seq = self.next_seq.checked_add(1).unwrap_or(1);
        seq
    }

    fn send(&mut self, datagram: &[u8], operation: &str) -> Result<(), IpvsError> {
        self.transport
            .send(datagram)
            .map_err(|source| IpvsError::Socket {
                operation: operation.to_string(),
                source,
            })
    }

    /// Runs a dump to NLMSG_DONE, parsing each data message; restarts it
    /// when the kernel marks it interrupted.
    fn run_dump<T>(
        &mut self,
        operation: &str,
        service: Option<&ServiceKey>,
        request: impl Fn(u32) -> Vec<u8>,
        parse: impl Fn(&[u8]) -> Result<T, netlink::ParseError>,
    ) -> Result<Vec<T>, IpvsError> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.seq();
            self.send(&request(seq), operation)?;
            let mut items = Vec::new();
            let outcome = self.receive_replies(seq, operation, |reply| {
                if let Reply::Data { attributes, .. } = reply {
                    items.push(parse(attributes)?);
                }
                Ok(Flow::Continue)
            });
            let interrupted = match outcome {
                Ok(()) => false,
                Err(ReceiveError::Interrupted) => true,
                Err(other) => return Err(other.into_ipvs(operation, service, None, None)),
            };
            if !interrupted {
                return Ok(items);
            }
        }
        Err(IpvsError::DumpInterrupted {
            operation: operation.to_string(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    /// Reads the replies to request `seq` until `on_reply` stops, the dump
    /// ends (NLMSG_DONE), an ack arrives or the kernel reports an error.
    fn receive_replies(
        &mut self,
        seq: u32,
        operation: &str,
        mut on_reply: impl FnMut(Reply<'_>) -> Result<Flow, netlink::ParseError>,
    ) -> Result<(), ReceiveError> {
        let mut interrupted = false;
        let mut failure = None;
        self.receive(operation, |message| {
            if message.seq != seq {
                return Ok(Flow::Continue); // a stale reply of an earlier request
            }
            interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
            match netlink::reply(message)? {
                Reply::Error { errno } => {
                    failure = Some(errno);
                    Ok(Flow::Stop)
                }
                Reply::Ack | Reply::Done => Ok(Flow::Stop),
                reply @ Reply::Data { .. } => on_reply(reply),
                Reply::Ignored => Ok(Flow::Continue),
            }
        })
        .map_err(ReceiveError::Ipvs)?;
        match failure {
            Some(errno) => Err(ReceiveError::Errno(errno)),
            None if interrupted => Err(ReceiveError::Interrupted),
            None => Ok(()),
        }
    }

    /// Receives datagrams and hands each message to `on_message` until it
    /// says stop. Every datagram is read whole (MSG_TRUNC tells if not).
    fn receive(
        &mut self,
        operation: &str,
        mut on_message: impl FnMut(&netlink::Message<'_>) -> Result<Flow, netlink::ParseError>,
    ) -> Result<(), IpvsError> {
        loop {
            let len = self.transport.receive(&mut self.buffer).map_err(|source| {
                if is_timeout(&source) {
                    IpvsError::Socket {
                        operation: operation.to_string(),
                        source: std::io::Error::new(
                            source.kind(),
                            format!(
                                "no reply from the kernel within {} s",
                                REPLY_TIMEOUT.as_secs()
                            ),
                        ),
                    }
                } else {
                    IpvsError::Socket {
                        operation: operation.to_string(),
                        source,
                    }
                }
            });
            let len = match len {
                Ok(len) => len,
                Err(error) => {
                    // After an overrun (ENOBUFS) some replies are lost and
                    // the queued ones answer requests now given up on:
                    // left there, they would also hold back the next
                    // dump, which the kernel starts only into room.
                    if !matches!(&error, IpvsError::Socket { source, .. } if is_timeout(source)) {
                        self.transport.discard_queued();
                    }
                    return Err(error);
                }
            };
            if len > self.buffer.len() {
                // The rest of the datagram is lost: the reply cannot be trusted.
                return Err(malformed(
                    operation,
                    &format!("a {len}-byte datagram exceeds the {RECEIVE_BUFFER}-byte buffer"),
                ));
            }
            let datagram = std::mem::take(&mut self.buffer);
            let mut handled = Ok(Flow::Continue);
            for message in netlink::messages(&datagram) {
                handled = message
                    .map_err(|e| malformed(operation, &e.0))
                    .and_then(|m| on_message(&m).map_err(|e| malformed(operation, &e.0)));
                if !matches!(handled, Ok(Flow::Continue)) {
                    break;
                }
            }
            // The buffer goes back whatever happened: a malformed reply must
            // not leave the client unable to receive.
            self.buffer = datagram;
            if handled? == Flow::Stop {
                return Ok(());
            }
        }
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

enum ReceiveError {
    Errno(i32),
    Interrupted,
    Ipvs(IpvsError),
}

impl ReceiveError {
    fn into_ipvs(
        self,
        operation: &str,
        service: Option<&ServiceKey>,
        destination: Option<&DestinationKey>,
        weight: Option<u32>,
    ) -> IpvsError {
        match self {
            ReceiveError::Errno(errno) => {
                IpvsError::from_errno(errno, operation, service, destination, weight)
            }
            ReceiveError::Interrupted => IpvsError::DumpInterrupted {
                operation: operation.to_string(),
                attempts: 1,
            },
            ReceiveError::Ipvs(e) => e,
        }
    }
}

fn malformed(operation: &str, reason: &str) -> IpvsError {
    IpvsError::Malformed {
        operation: operation.to_string(),
        reason: reason.to_string(),
    }
}

fn check_weight(
    service: &ServiceKey,
    destination: &DestinationKey,
    weight: u32,
) -> Result<(), IpvsError> {
    if weight > MAX_WEIGHT {
        return Err(IpvsError::WeightOutOfRange {
            service: *service,
            destination: *destination,
            weight,
        });
    }
    Ok(())
}

/// SO_RCVBUFFORCE (root) goes past rmem_max; without it the default stays
/// and [`BATCH_WINDOW`] still fits.
fn set_receive_queue(socket: &Socket, bytes: usize) {
    let size = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads an int from a valid pointer.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        net::{IpAddr, Ipv4Addr},
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{
        netlink::{
            fixtures, IPVS_CMD_GET_DEST, IPVS_CMD_GET_SERVICE, IPVS_CMD_SET_DEST, NLM_F_MULTI,
        },
        Forwarding, Protocol, Stats, Tunnel,
    };

    const FAMILY: u16 = 0x22;

    type Responder = Box<dyn FnMut(&netlink::Message<'_>) -> Vec<Vec<u8>> + Send>;

    /// Answers each request with the datagrams `respond` returns; records
    /// the requests. An empty queue reads as a receive timeout.
    struct ScriptedKernel {
        respond: Responder,
        /// Answer the requests of one send in reverse order.
        reverse: bool,
        queue: VecDeque<Vec<u8>>,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Transport for ScriptedKernel {
        fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
            let mut replies = Vec::new();
            for message in netlink::messages(datagram) {
                let message = message.expect("the client sent a malformed request");
                self.requests.lock().unwrap().push(message.payload.to_vec());
                replies.push((self.respond)(&message));
            }
            if self.reverse {
                replies.reverse();
            }
            self.queue.extend(replies.into_iter().flatten());
            Ok(())
        }

        fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
            buffer.clear();
            let datagram = self
                .queue
                .pop_front()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
            let fits = datagram.len().min(buffer.capacity());
            buffer.extend_from_slice(&datagram[..fits]);
            Ok(datagram.len())
        }
    }

    fn client(respond: Responder) -> (IpvsClient, Arc<Mutex<Vec<Vec<u8>>>>) {
        scripted(respond, false)
    }

    fn scripted(respond: Responder, reverse: bool) -> (IpvsClient, Arc<Mutex<Vec<Vec<u8>>>>) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let kernel = ScriptedKernel {
            respond,
            reverse,
            queue: VecDeque::new(),
            requests: requests.clone(),
        };
        (
            IpvsClient::with_transport(Box::new(kernel), FAMILY),
            requests,
        )
    }

    fn service_key(i: u16) -> ServiceKey {
        ServiceKey::Address {
            protocol: Protocol::Tcp,
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            port: 1000 + i,
        }
    }

    /// A service dump answered in `chunks` datagrams of `per_chunk`
    /// services each, then DONE in a datagram of its own.
    fn services_in_chunks(seq: u32, chunks: u16, per_chunk: u16, flags: u16) -> Vec<Vec<u8>> {
        let mut datagrams: Vec<Vec<u8>> = (0..chunks)
            .map(|c| {
                (0..per_chunk)
                    .flat_map(|i| {
                        fixtures::service_message(
                            FAMILY,
                            seq,
                            NLM_F_MULTI | flags,
                            &service_key(c * per_chunk + i),
                        )
                    })
                    .collect()
            })
            .collect();
        datagrams.push(fixtures::done(seq));
        datagrams
    }

    #[test]
    fn a_dump_over_many_datagrams_is_read_to_done() {
        let (mut client, requests) = client(Box::new(|m| services_in_chunks(m.seq, 40, 100, 0)));
        let services = client.services().unwrap();
        assert_eq!(services.len(), 4000);
        assert_eq!(services[3999].key, service_key(3999));
        assert_eq!(services[0].scheduler, "rr");
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_interrupted_dump_is_restarted_and_its_partial_result_dropped() {
        let mut attempt = 0;
        let (mut client, requests) = client(Box::new(move |m| {
            attempt += 1;
            // The first attempt is marked interrupted in its second chunk.
            if attempt == 1 {
                let mut datagrams = services_in_chunks(m.seq, 1, 3, 0);
                datagrams.insert(
                    1,
                    services_in_chunks(m.seq, 1, 3, NLM_F_DUMP_INTR)[0].clone(),
                );
                datagrams
            } else {
                services_in_chunks(m.seq, 1, 5, 0)
            }
        }));
        let services = client.services().unwrap();
        assert_eq!(services.len(), 5, "only the second, whole dump counts");
        assert_eq!(requests.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_dump_interrupted_every_time_gives_up_with_a_clear_error() {
        let (mut client, requests) = client(Box::new(|m| {
            services_in_chunks(m.seq, 2, 2, NLM_F_DUMP_INTR)
        }));
        let err = client.services().unwrap_err();
        assert_eq!(
            err.to_string(),
            "listing virtual services: the dump was interrupted by concurrent changes 5 times \
             in a row"
        );
        assert_eq!(requests.lock().unwrap().len(), DUMP_ATTEMPTS as usize);
    }

    #[test]
    fn replies_to_earlier_requests_are_skipped() {
        let (mut client, _) = client(Box::new(|m| {
            let mut datagrams = vec![fixtures::ack(m.seq.wrapping_sub(1), libc::ENOENT)];
            datagrams.extend(services_in_chunks(m.seq.wrapping_sub(1), 1, 2, 0));
            datagrams.extend(services_in_chunks(m.seq, 1, 1, 0));
            datagrams
        }));
        assert_eq!(client.services().unwrap().len(), 1);
    }

    #[test]
    fn an_error_in_done_is_the_dumps_error() {
        let (mut client, _) = client(Box::new(|m| {
            let mut done = fixtures::done(m.seq);
            done[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
            vec![done]
        }));
        let err = client.services().unwrap_err();
        assert!(matches!(err, IpvsError::PermissionDenied { .. }), "{err:?}");
    }

    #[test]
    fn a_truncated_datagram_is_an_error_not_a_short_dump() {
        let (mut client, _) = client(Box::new(|m| {
            let mut big = services_in_chunks(m.seq, 1, 1000, 0);
            assert!(big[0].len() > RECEIVE_BUFFER);
            big.truncate(1);
            big
        }));
        let err = client.services().unwrap_err();
        assert!(
            err.to_string().contains("exceeds the 65536-byte buffer"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_reply_does_not_break_the_next_request() {
        let calls = Arc::new(Mutex::new(0));
        let seen = calls.clone();
        let (mut client, _) = client(Box::new(move |m| {
            let mut n = seen.lock().unwrap();
            *n += 1;
            if *n == 1 {
                vec![vec![0xff; 20]] // a message header claiming 4 GiB
            } else {
                services_in_chunks(m.seq, 1, 3, 0)
            }
        }));
        assert!(client.services().is_err());
        assert_eq!(
            client.services().unwrap().len(),
            3,
            "the receive buffer survived the bad reply"
        );
    }

    #[test]
    fn no_reply_is_a_bounded_wait_with_a_clear_error() {
        let (mut client, _) = client(Box::new(|_| Vec::new()));
        let err = client.info().unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading IPVS info: netlink socket error: no reply from the kernel within 10 s"
        );
    }

    fn update(i: u32, weight: u32) -> WeightUpdate {
        WeightUpdate {
            service: service_key(0),
            destination: Destination {
                addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1)),
                port: 8000 + (i / 250) as u16,
                forwarding: Forwarding::Masquerade,
                weight: 1,
                upper_threshold: 0,
                lower_threshold: 0,
                tunnel: Tunnel::default(),
                active_conns: 0,
                inactive_conns: 0,
                persistent_conns: 0,
                stats: Stats::default(),
            },
            weight,
        }
    }

    /// 300 changes in three windows of writes: the kernel acks the first
    /// window, then goes silent. The first window is applied, the second
    /// unknown, the third never sent; a destination changed by someone
    /// else and a gone one are not written at all.
    #[test]
    fn a_batch_cut_short_says_which_changes_applied() {
        let dests: Vec<Destination> = (0..302)
            .map(|i| {
                let mut d = update(i, 5).destination;
                d.weight = if i == 301 { 42 } else { 1 };
                d.upper_threshold = 500;
                d
            })
            .collect();
        let listed = dests.clone();
        let mut writes = 0;
        let (mut client, requests) = client(Box::new(move |m| match m.payload[0] {
            IPVS_CMD_GET_SERVICE => {
                vec![fixtures::service_message(FAMILY, m.seq, 0, &service_key(0))]
            }
            IPVS_CMD_GET_DEST => {
                let mut out: Vec<Vec<u8>> = listed
                    .iter()
                    .map(|d| fixtures::destination_message(FAMILY, m.seq, d))
                    .collect();
                out.push(fixtures::done(m.seq));
                out
            }
            IPVS_CMD_SET_DEST => {
                writes += 1;
                if writes <= BATCH_WINDOW {
                    vec![fixtures::ack(m.seq, 0)]
                } else {
                    Vec::new() // silence: a receive timeout
                }
            }
            other => panic!("unexpected command {other}"),
        }));
        let mut changes: Vec<WeightChange> = (0..300)
            .map(|i| WeightChange {
                service: service_key(0),
                destination: dests[i].key(),
                expected: 1,
                weight: 7,
            })
            .collect();
        // Someone set 301 to 42 since the dump prober works from.
        changes.push(WeightChange {
            service: service_key(0),
            destination: dests[301].key(),
            expected: 1,
            weight: 7,
        });
        let mut gone = update(9999, 5).destination;
        gone.port = 1;
        changes.push(WeightChange {
            service: service_key(0),
            destination: gone.key(),
            expected: 1,
            weight: 7,
        });
        // 300 is listed but not changed; the 302 changes touch one service.
        let outcome = client.change_weights(&changes);
        assert_eq!(outcome.applied, (0..128).collect::<Vec<_>>());
        let (unknown, _) = outcome.unknown.expect("the socket went silent");
        assert_eq!(unknown, (128..256).collect::<Vec<_>>());
        assert_eq!(outcome.not_sent, (256..300).collect::<Vec<_>>());
        assert_eq!(outcome.changed_by_others.len(), 1);
        assert_eq!(outcome.changed_by_others[0].0, 300);
        assert_eq!(outcome.changed_by_others[0].1.weight, 42);
        assert_eq!(outcome.gone, vec![301]);
        // The writes sent back the thresholds as read just before.
        let sent = requests.lock().unwrap();
        let set: Vec<&Vec<u8>> = sent.iter().filter(|r| r[0] == IPVS_CMD_SET_DEST).collect();
        assert_eq!(set.len(), 256);
    }

    /// 300 updates in three windows; the kernel refuses every 7th with
    /// ENOENT and acks each window in reverse order.
    #[test]
    fn a_batch_reports_each_failure_by_destination() {
        let mut first_seq = None;
        let (mut client, requests) = scripted(
            Box::new(move |m| {
                let first = *first_seq.get_or_insert(m.seq);
                let errno = if (m.seq - first) % 7 == 3 {
                    libc::ENOENT
                } else {
                    0
                };
                vec![fixtures::ack(m.seq, errno)]
            }),
            true,
        );
        let mut updates: Vec<WeightUpdate> = (0..300).map(|i| update(i, 5)).collect();
        updates[150].weight = MAX_WEIGHT + 1; // never sent
        let failures = client.set_weights(&updates).unwrap();
        assert_eq!(requests.lock().unwrap().len(), 299);

        // Requests are numbered in sending order, which skips index 150.
        let sent_index = |n: usize| if n < 150 { n } else { n + 1 };
        let mut expected: Vec<usize> = (0..299).filter(|n| n % 7 == 3).map(sent_index).collect();
        expected.push(150);
        expected.sort();
        let indexes: Vec<usize> = failures.iter().map(|f| f.index).collect();
        assert_eq!(indexes, expected);
        for failure in &failures {
            assert_eq!(
                failure.destination,
                updates[failure.index].destination.key()
            );
            if failure.index == 150 {
                assert!(matches!(failure.error, IpvsError::WeightOutOfRange { .. }));
            } else {
                assert!(
                    matches!(failure.error, IpvsError::NoSuchDestination { .. }),
                    "{}",
                    failure.error
                );
            }
        }
    }
}
