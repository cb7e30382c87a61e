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
use prober_common::{DrCheckFlow, DR_CHECK_PORT_MAX, DR_CHECK_PORT_MIN};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream, UdpSocket},
};

pub const PORTS: RangeInclusive<u16> = DR_CHECK_PORT_MIN..=DR_CHECK_PORT_MAX;

pub struct Gate {
    inner: Arc<Mutex<Leases>>,
}

struct Leases {
    map: HashMap<MapData, u32, DrCheckFlow>,
    taken: HashSet<u16>,
    next: u16,
}

impl Gate {
    pub fn new(map: HashMap<MapData, u32, DrCheckFlow>) -> Self {
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
        let IpAddr::V4(real_server) = target.ip() else {
            return Err("direct-routing checks are IPv4 only".into());
        };
        let (socket, lease) = self.lease(|port| {
            let socket = TcpSocket::new_v4()?;
            // Our ports are ours alone (see `taken`); a previous check's
            // TIME_WAIT must not block the next one.
            socket.set_reuseaddr(true)?;
            // Close with RST: no TIME_WAIT on our side, nothing half-open
            // on the real server's. (Deprecated because a non-zero linger
            // blocks on drop; a zero one never does.)
            #[allow(deprecated)]
            socket.set_linger(Some(std::time::Duration::ZERO))?;
            socket.bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
            Ok(socket)
        })?;
        self.register(&lease, real_server, vip)?;
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("connect to {vip}:{} on {real_server}: {e}", target.port()))?;
        Ok(Stream {
            inner: stream,
            _lease: Some(lease),
        })
    }

    /// A UDP socket whose traffic to `real_server` reaches `vip` on it.
    pub async fn udp(
        &self,
        real_server: IpAddr,
        vip: Ipv4Addr,
    ) -> Result<(UdpSocket, Lease), String> {
        let IpAddr::V4(real_server) = real_server else {
            return Err("direct-routing checks are IPv4 only".into());
        };
        let (socket, lease) = self.lease(|port| {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        })?;
        self.register(&lease, real_server, vip)?;
        Ok((socket, lease))
    }

    /// Binds a socket to a free port of ours.
    fn lease<S>(&self, mut bind: impl FnMut(u16) -> io::Result<S>) -> Result<(S, Lease), String> {
        let mut leases = self.inner.lock().expect("not poisoned");
        let count = PORTS.len();
        for _ in 0..count {
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

    fn register(&self, lease: &Lease, real_server: Ipv4Addr, vip: Ipv4Addr) -> Result<(), String> {
        let flow = DrCheckFlow {
            real_server: real_server.octets(),
            vip: vip.octets(),
        };
        let mut leases = self.inner.lock().expect("not poisoned");
        leases
            .map
            .insert(lease.port as u32, flow, 0)
            .map_err(|e| format!("registering the check in DR_CHECKS: {e}"))
    }
}

/// A port of ours, registered for one check; freed on drop.
pub struct Lease {
    port: u16,
    gate: Arc<Mutex<Leases>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self.gate.lock().expect("not poisoned");
        let _ = leases.map.remove(&(self.port as u32));
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
