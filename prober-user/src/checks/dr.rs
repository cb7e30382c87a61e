//! Reaching the VIP on a direct-routing real server. The real server only
//! answers on the VIP, and the director owns the VIP itself, so a plain
//! connect() to it would stay local. Instead the check connects to the
//! real server's own address from a port of [`PORTS`], registered in the
//! datapath's `DR_CHECKS` map for the connection's life: TC egress turns
//! the destination into the VIP (the frame already goes to the real
//! server's MAC, as direct routing does), ingress XDP turns the answers'
//! source VIP back into the real server's address.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use aya::maps::{HashMap, MapData};
use prober_common::{DrCheckFlow, DrCheckKey, DR_CHECK_PORT_MAX, DR_CHECK_PORT_MIN};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream, UdpSocket},
};

pub const PORTS: RangeInclusive<u16> = DR_CHECK_PORT_MIN..=DR_CHECK_PORT_MAX;

pub struct Gate {
    inner: Arc<Mutex<Leases>>,
}

struct Leases {
    map: HashMap<MapData, DrCheckKey, DrCheckFlow>,
    taken: HashSet<u16>,
    next: u16,
}

impl Gate {
    pub fn new(map: HashMap<MapData, DrCheckKey, DrCheckFlow>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Leases {
                map,
                taken: HashSet::new(),
                next: *PORTS.start(),
            })),
        }
    }

    /// A TCP connection to the VIP on the real server at `target`.
    pub async fn connect(&self, target: SocketAddr, vip: Ipv4Addr) -> Result<Stream, String> {
        let (real_server, local) = addresses(target)?;
        let (socket, mut lease) = self.lease(|port| {
            let socket = TcpSocket::new_v4()?;
            // Our ports are ours alone (see `taken`); a previous check's
            // TIME_WAIT must not block the next one.
            socket.set_reuseaddr(true)?;
            // Close with RST: no TIME_WAIT on our side, nothing half-open
            // on the real server's. (Deprecated because a non-zero linger
            // blocks on drop; a zero one never does.)
            #[allow(deprecated)]
            socket.set_linger(Some(std::time::Duration::ZERO))?;
            socket.bind(SocketAddr::new(local.into(), port))?;
            Ok(socket)
        })?;
        let flow = Flow {
            local,
            remote_port: target.port(),
            protocol: libc::IPPROTO_TCP as u8,
            real_server,
            vip,
        };
        self.register(&mut lease, flow)?;
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("connect to {vip}:{} on {real_server}: {e}", target.port()))?;
        Ok(Stream {
            inner: stream,
            _lease: Some(lease),
        })
    }

    /// A UDP socket whose traffic to `target` reaches `vip` on it.
    pub async fn udp(
        &self,
        target: SocketAddr,
        vip: Ipv4Addr,
    ) -> Result<(UdpSocket, Lease), String> {
        let (real_server, local) = addresses(target)?;
        let (socket, mut lease) = self.lease(|port| {
            let socket = std::net::UdpSocket::bind((local, port))?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        })?;
        let flow = Flow {
            local,
            remote_port: target.port(),
            protocol: libc::IPPROTO_UDP as u8,
            real_server,
            vip,
        };
        self.register(&mut lease, flow)?;
        Ok((socket, lease))
    }

    /// Binds a socket to a free port of ours.
    fn lease<S>(&self, mut bind: impl FnMut(u16) -> io::Result<S>) -> Result<(S, Lease), String> {
        let mut leases = self.inner.lock().expect("not poisoned");
        for _ in 0..PORTS.len() {
            let port = leases.next;
            leases.next = if port == *PORTS.end() {
                *PORTS.start()
            } else {
                port + 1
            };
            if leases.taken.contains(&port) {
                continue;
            }
            // Another program may hold it: try the next.
            if let Ok(socket) = bind(port) {
                leases.taken.insert(port);
                return Ok((
                    socket,
                    Lease {
                        port,
                        key: None,
                        gate: self.inner.clone(),
                    },
                ));
            }
        }
        Err(format!(
            "no free local port in {}-{} for a direct-routing check",
            PORTS.start(),
            PORTS.end()
        ))
    }

    fn register(&self, lease: &mut Lease, flow: Flow) -> Result<(), String> {
        let key = DrCheckKey {
            local_addr: flow.local.octets(),
            local_port: lease.port.to_be(),
            remote_port: flow.remote_port.to_be(),
            protocol: flow.protocol,
            _pad: [0; 3],
        };
        let value = DrCheckFlow {
            real_server: flow.real_server.octets(),
            vip: flow.vip.octets(),
        };
        let mut leases = self.inner.lock().expect("not poisoned");
        leases
            .map
            .insert(key, value, 0)
            .map_err(|e| format!("registering the check in DR_CHECKS: {e}"))?;
        lease.key = Some(key);
        Ok(())
    }
}

/// One check connection, as registered.
struct Flow {
    local: Ipv4Addr,
    remote_port: u16,
    protocol: u8,
    real_server: Ipv4Addr,
    vip: Ipv4Addr,
}

/// The real server's address and the director's address the kernel would
/// use towards it (the route's preferred source): check sockets bind to
/// it, so the datapath can match their packets exactly.
fn addresses(target: SocketAddr) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let IpAddr::V4(real_server) = target.ip() else {
        return Err("direct-routing checks are IPv4 only".into());
    };
    let local = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no route to {real_server}: {e}"))?;
    match local.ip() {
        IpAddr::V4(local) => Ok((real_server, local)),
        IpAddr::V6(_) => Err(format!("no IPv4 source address towards {real_server}")),
    }
}

/// A port of ours, registered for one check; freed on drop.
pub struct Lease {
    port: u16,
    key: Option<DrCheckKey>,
    gate: Arc<Mutex<Leases>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self.gate.lock().expect("not poisoned");
        if let Some(key) = self.key {
            let _ = leases.map.remove(&key);
        }
        leases.taken.remove(&self.port);
    }
}

/// A check's TCP connection; with direct routing it holds its port's
/// registration until dropped.
pub struct Stream {
    inner: TcpStream,
    _lease: Option<Lease>,
}

impl Stream {
    pub fn plain(inner: TcpStream) -> Self {
        Self {
            inner,
            _lease: None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
