//! Application (L7) checks and user commands, run by the daemon itself:
//! HTTP/HTTPS GET, TCP send/expect, a DNS query, or an external command
//! (keepalived's MISC_CHECK). One check runs per (real server, port,
//! check) however many services share it; each runs in its own task at its
//! interval, all of them together bounded by one semaphore.
//!
//! With direct routing the real server answers on the VIP, so the check
//! must reach the VIP on that real server: it connects to the real
//! server's own address from a port of [`dr::PORTS`], and the datapath
//! rewrites that connection's destination to the VIP on the way out and the
//! VIP back to the real server's address on the way in (see `dr`).

mod command;
mod dns;
pub mod dr;
pub(crate) mod http;

use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, Semaphore},
    task::AbortHandle,
    time::{Instant, MissedTickBehavior},
};

pub use dns::{valid_name as valid_dns_name, Record};

/// The most of an answer a check reads: enough for a status page.
const MAX_ANSWER: usize = 64 * 1024;

/// What to check, as the config says it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Check {
    /// GET `path` over HTTP or HTTPS; up when the status is one of
    /// `status` and the body has `body` and matches `body_regex`.
    Http {
        tls: bool,
        /// Verify the server's certificate against the web PKI (off by
        /// default: real servers are reached by address).
        tls_verify: bool,
        path: String,
        /// Host header and TLS server name (default: the address checked,
        /// the VIP with direct routing).
        host: Option<String>,
        status: Vec<u16>,
        body: Option<String>,
        body_regex: Option<String>,
    },
    /// Connect, send `send` if any, read until `expect` appears if any.
    Tcp {
        send: Option<String>,
        expect: Option<String>,
    },
    /// A recursive query for `name`; up on NOERROR with at least one answer.
    Dns { name: String, record: Record },
    /// Run a program; exit 0 = up. Its first line of output may be a
    /// weight. `{address}` and `{port}` in the arguments are replaced.
    Command { argv: Vec<String> },
}

impl Check {
    pub fn layer(&self) -> &'static str {
        match self {
            Check::Command { .. } => "command",
            _ => "L7",
        }
    }

    fn describe(&self) -> String {
        match self {
            Check::Http { tls, path, .. } => {
                format!("{} GET {path}", if *tls { "https" } else { "http" })
            }
            Check::Tcp { .. } => "tcp send/expect".into(),
            Check::Dns { name, record } => format!("dns {record:?} {name}"),
            Check::Command { argv } => format!("command {}", argv.join(" ")),
        }
    }
}

/// One check of one real server: the unit that runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    /// The real server's own address.
    pub address: IpAddr,
    pub port: u16,
    /// With direct routing: the VIP the real server answers on.
    pub vip: Option<Ipv4Addr>,
    pub check: Arc<Check>,
}

impl std::fmt::Display for CheckSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = SocketAddr::new(self.address, self.port);
        match self.vip {
            Some(vip) => write!(f, "{} {target} (vip {vip})", self.check.describe()),
            None => write!(f, "{} {target}", self.check.describe()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckTiming {
    pub interval: Duration,
    pub timeout: Duration,
}

/// What one run of a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Up; a command may also have given a weight.
    Passed { weight: Option<u32> },
    /// Down, and why (for logs and alerts).
    Failed(String),
}

#[derive(Debug)]
pub struct CheckReport {
    pub spec: CheckSpec,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// Starts and stops check tasks; their reports come through one channel.
pub struct Checker {
    limiter: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<CheckReport>,
    gate: Option<Arc<dr::Gate>>,
    tls: Arc<http::TlsConfigs>,
}

impl Checker {
    /// At most `concurrency` checks run at once; `gate` lets checks reach
    /// the VIP on direct-routing real servers (none: such checks fail).
    pub fn new(
        concurrency: usize,
        gate: Option<dr::Gate>,
    ) -> (Self, mpsc::UnboundedReceiver<CheckReport>) {
        let (reports, receiver) = mpsc::unbounded_channel();
        (
            Self {
                limiter: Arc::new(Semaphore::new(concurrency.max(1))),
                reports,
                gate: gate.map(Arc::new),
                tls: Arc::new(http::TlsConfigs::new()),
            },
            receiver,
        )
    }

    /// Runs `spec` every `timing.interval` until the handle aborts it.
    /// Must be called within a tokio runtime.
    pub fn start(&self, spec: CheckSpec, timing: CheckTiming) -> AbortHandle {
        let limiter = self.limiter.clone();
        let reports = self.reports.clone();
        let gate = self.gate.clone();
        let tls = self.tls.clone();
        let task = tokio::spawn(async move {
            // Spread thousands of checks over the interval instead of
            // starting them all in the same instant.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            spec.hash(&mut hasher);
            let phase = timing
                .interval
                .mul_f64((hasher.finish() % 1000) as f64 / 1000.0);
            let mut ticker = tokio::time::interval_at(Instant::now() + phase, timing.interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let context = Context {
                gate,
                tls,
                timeout: timing.timeout,
            };
            loop {
                ticker.tick().await;
                let Ok(_permit) = limiter.acquire().await else {
                    return;
                };
                let started = Instant::now();
                let outcome = match tokio::time::timeout(timing.timeout, run(&spec, &context)).await
                {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(why)) => Outcome::Failed(why),
                    Err(_) => Outcome::Failed(format!("no answer within {:?}", timing.timeout)),
                };
                let report = CheckReport {
                    spec: spec.clone(),
                    outcome,
                    elapsed: started.elapsed(),
                };
                if reports.send(report).is_err() {
                    return; // the controller is gone
                }
            }
        });
        task.abort_handle()
    }
}

struct Context {
    gate: Option<Arc<dr::Gate>>,
    tls: Arc<http::TlsConfigs>,
    timeout: Duration,
}

async fn run(spec: &CheckSpec, context: &Context) -> Result<Outcome, String> {
    if spec.port == 0 && !matches!(*spec.check, Check::Command { .. }) {
        return Err(
            "no port to check (the destination has none: set `port` in [[service.check]])".into(),
        );
    }
    match &*spec.check {
        Check::Http {
            tls,
            tls_verify,
            path,
            host,
            status,
            body,
            body_regex,
        } => {
            let stream = connect(spec, context).await?;
            let default_host = spec.vip.map_or(spec.address, IpAddr::V4).to_string();
            let request = http::Request {
                path,
                host: host.as_deref().unwrap_or(&default_host),
                status,
                body: body.as_deref(),
                body_regex: body_regex.as_deref(),
            };
            if *tls {
                let stream = context
                    .tls
                    .connect(stream, request.host, *tls_verify)
                    .await?;
                http::get(stream, &request).await?;
            } else {
                http::get(stream, &request).await?;
            }
            Ok(Outcome::Passed { weight: None })
        }
        Check::Tcp { send, expect } => {
            let stream = connect(spec, context).await?;
            send_expect(stream, send.as_deref(), expect.as_deref()).await?;
            Ok(Outcome::Passed { weight: None })
        }
        Check::Dns { name, record } => {
            let (socket, _lease) = match (spec.vip, &context.gate) {
                (Some(vip), Some(gate)) => {
                    let target = SocketAddr::new(spec.address, spec.port);
                    let (socket, lease) = gate.udp(target, vip).await?;
                    (socket, Some(lease))
                }
                (Some(_), None) => return Err(NO_GATE.into()),
                (None, _) => (dns::socket(spec.address).await?, None),
            };
            dns::query(
                socket,
                SocketAddr::new(spec.address, spec.port),
                name,
                *record,
            )
            .await?;
            Ok(Outcome::Passed { weight: None })
        }
        Check::Command { argv } => command::run(argv, spec, context.timeout)
            .await
            .map(|weight| Outcome::Passed { weight }),
    }
}

const NO_GATE: &str = "cannot reach the VIP on a direct-routing real server: the datapath's rewrite map is not available";

/// A TCP connection to the real server (to the VIP on it with direct
/// routing); its end leaves no half-open connection behind.
async fn connect(spec: &CheckSpec, context: &Context) -> Result<dr::Stream, String> {
    let target = SocketAddr::new(spec.address, spec.port);
    match (spec.vip, &context.gate) {
        (Some(vip), Some(gate)) => gate.connect(target, vip).await,
        (Some(_), None) => Err(NO_GATE.into()),
        (None, _) => TcpStream::connect(target)
            .await
            .map(dr::Stream::plain)
            .map_err(|e| format!("connect to {target}: {e}")),
    }
}

async fn send_expect<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    send: Option<&str>,
    expect: Option<&str>,
) -> Result<(), String> {
    if let Some(send) = send {
        stream
            .write_all(send.as_bytes())
            .await
            .map_err(|e| format!("sending: {e}"))?;
    }
    let Some(expect) = expect else {
        return Ok(());
    };
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while seen.len() < MAX_ANSWER {
        let n = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buffer[..n]);
        if contains(&seen, expect.as_bytes()) {
            return Ok(());
        }
    }
    Err(format!(
        "expected {expect:?}, got {:?}",
        String::from_utf8_lossy(&seen[..seen.len().min(80)])
    ))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests;
