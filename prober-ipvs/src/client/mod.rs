//! The IPVS generic netlink socket: family lookup, dumps (multi-part, any
//! size, retried when interrupted) and pipelined weight writes.

use std::{os::fd::AsRawFd, time::Duration};

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

mod socket;
#[cfg(test)]
mod tests;
mod weights;

pub(crate) use socket::Transport;
use socket::{set_receive_queue, set_receive_timeout, KernelSocket};
pub use weights::{ChangeOutcome, WeightChange, WeightFailure, WeightUpdate};

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
