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

/// A connection to the kernel's IPVS over generic netlink.
pub struct IpvsClient {
    socket: Socket,
    family: u16,
    next_seq: u32,
    buffer: Vec<u8>,
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the "IPVS" family, which
    /// loads the ip_vs module where modules can load.
    pub fn connect() -> Result<Self, IpvsError> {
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
        enlarge_receive_queue(&socket);
        set_receive_timeout(&socket, REPLY_TIMEOUT)
            .map_err(socket_error("setting the netlink receive timeout"))?;
        let mut client = Self {
            socket,
            family: 0,
            next_seq: 1,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        };
        client.family = client.resolve_family()?;
        Ok(client)
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
                if message.seq < first_seq || message.seq > last_seq {
                    return Ok(Flow::Continue); // a stale reply of an earlier request
                }
                let index = pending[(message.seq - first_seq) as usize].1;
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
        self.socket
            .send(datagram, 0)
            .map(|_| ())
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
            self.buffer.clear();
            let len = self
                .socket
                .recv(&mut self.buffer, libc::MSG_TRUNC)
                .map_err(|source| {
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) {
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
                })?;
            if len > self.buffer.len() {
                return Err(malformed(
                    operation,
                    &format!("a {len}-byte datagram exceeds the {RECEIVE_BUFFER}-byte buffer"),
                ));
            }
            let datagram = std::mem::take(&mut self.buffer);
            let mut flow = Flow::Continue;
            for message in netlink::messages(&datagram) {
                let message = message.map_err(|e| malformed(operation, &e.0))?;
                flow = on_message(&message).map_err(|e| malformed(operation, &e.0))?;
                if flow == Flow::Stop {
                    break;
                }
            }
            self.buffer = datagram;
            if flow == Flow::Stop {
                return Ok(());
            }
        }
    }
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
fn enlarge_receive_queue(socket: &Socket) {
    let size = RECEIVE_QUEUE as libc::c_int;
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
