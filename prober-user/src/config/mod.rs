//! The daemon's configuration: a TOML file for what IPVS discovery cannot
//! know. Every setting has a default, so no file at all is a valid
//! configuration (zero-config: every IPVS service is managed).
//!
//! ```toml
//! [daemon]
//! interval = "1s"          # time between two probes of a target
//! timeout = "1s"           # a reply slower than this counts as a failure
//! rise = 2                 # successes in a row that bring a server up
//! fall = 3                 # failures in a row that take it down
//! discovery = "5s"         # how often IPVS is re-read in full (default:
//!                          # when it changes, and every 60 s; every 5 s
//!                          # where the kernel refuses the change signal)
//! manual_weights = "respect"   # or "overwrite": a weight changed by hand
//! diagnose = true          # ICMP-probe each real server host while its
//!                          # checks fail, to tell a dead host from a dead
//!                          # service in alerts
//! max_checks = 256         # L7 checks and commands running at once
//! max_probes = 131072      # probes the datapath holds (default: sized at
//!                          # start from IPVS with room to grow, at least
//!                          # 65,536; takes effect at the next start)
//!
//! [alerts]                 # one event per root cause (see README)
//! notify = ["/usr/local/bin/page"]   # run per event, JSON on stdin
//! webhook = "http://alerts.example:9000/prober"   # POSTed each event
//! flap_window = "60s"      # more than flap_limit changes in the window:
//! flap_limit = 4           # one "flapping" event, then quiet until stable
//!
//! [metrics]                # Prometheus endpoint, off unless set
//! listen = "127.0.0.1:9464"   # GET /metrics (OpenMetrics text)
//!
//! [agent]                  # real servers report state and weight (UDP)
//! port = 5555              # off unless set
//! address = "10.0.0.1"     # default: the interface's first IPv4 address
//! deadline = "10s"         # silent this long: back to active checks only
//! key_file = "/etc/prober/agent.key"  # shared key (32 hex digits, mode 600):
//!                          # reports need its tag and a fresh sequence
//!
//! [weights]
//! latency_aware = true     # false: only health moves weights
//! decay = "10s"            # latency EWMA time constant
//! peak_ewma = false        # true: a slow reply counts at once (Finagle)
//! latency_slack = "5ms"    # differences below it are noise; added before comparing
//! floor = 0.1              # least share of its weight a slow server keeps
//! hysteresis = 0.1         # smaller changes are not written
//! max_step = 0.25          # most change per interval
//! slow_start = "30s"       # ramp after recovery ("0s": none)
//! panic_threshold = 0      # healthy share below this: keep weights (0: off)
//!
//! [[service]]
//! match = "tcp:192.0.2.10:80"  # or "fwmark:7"
//! probe = "tcp"                # "tcp", "icmp" or "none" (leave alone)
//! port = 8080                  # probe this port instead of the real server's
//! rise = 3                     # interval, timeout, rise, fall per service
//! [[service.check]]            # L7 checks; all must pass (see README)
//! type = "http"                # "http", "https", "tcp", "dns", "command"
//! path = "/health"             # http(s): path, host, status, body,
//! status = [200]               #   body_regex, tls_verify
//! body = "OK"                  # tcp: send, expect; dns: query, record;
//!                              # command: command = ["prog", "{address}"]
//! [service.weights]            # this service's own weight policy: any of
//! floor = 0.3                  # latency_aware, latency_slack, floor,
//! panic_threshold = 0.3        # hysteresis, max_step, slow_start,
//!                              # panic_threshold (decay, peak_ewma: global)
//! ```

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use prober_ipvs::{Family, Protocol, ServiceKey};
use serde::{de, Deserialize, Deserializer};

use crate::{
    checks::{Check, Record},
    health::RiseFall,
    weights::WeightPolicy,
};

/// How often IPVS is dumped in full without a change signal, unless the
/// configuration says otherwise.
pub const DEFAULT_DISCOVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub interval: Duration,
    pub timeout: Duration,
    pub limits: RiseFall,
    /// How often IPVS is dumped in full; None: when the change signal
    /// fires and every [`fallback_discovery`](crate::ipvs_changes::fallback_discovery)
    /// (60 s up to 10,000 destinations, longer past them), or every
    /// [`DEFAULT_DISCOVERY`] where there is no signal.
    pub discovery: Option<Duration>,
    pub manual_weights: ManualWeights,
    pub latency_aware: bool,
    pub policy: WeightPolicy,
    pub services: Vec<ServiceConfig>,
    /// ICMP-probe every real server host for root-cause diagnosis (sent
    /// while its checks fail: see `controller::diagnosis`).
    pub diagnose: bool,
    /// L7 checks and commands running at once.
    pub max_checks: usize,
    /// Probes the datapath holds; None: sized at start from IPVS.
    pub max_probes: Option<u32>,
    pub alerts: AlertConfig,
    pub agent: Option<AgentConfig>,
    /// Where the Prometheus endpoint listens (off when none).
    pub metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    /// Program (and arguments) run for each event, the event as JSON on
    /// its standard input.
    pub notify: Option<Vec<String>>,
    /// URL POSTed each event as JSON (http:// or https://).
    pub webhook: Option<String>,
    pub flap_window: Duration,
    pub flap_limit: u32,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            notify: None,
            webhook: None,
            flap_window: Duration::from_secs(60),
            flap_limit: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentConfig {
    /// UDP port on the director that agents send to.
    pub port: u16,
    /// The director's address they send to (default: the interface's
    /// first IPv4 address).
    pub address: Option<std::net::Ipv4Addr>,
    /// An agent silent this long is ignored: active checks alone decide.
    pub deadline: Duration,
    /// Key shared with the agents: reports without its tag are refused.
    pub key: Option<crate::agent::AgentKey>,
}

/// One L7 check or command of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub check: Arc<Check>,
    /// Port to check (default: the one the service's L4 probe uses).
    pub port: Option<u16>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

/// What to do when a weight in IPVS differs from the one prober wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManualWeights {
    /// Take it as the server's new configured weight (keepalived-like).
    Respect,
    /// Write prober's weight back.
    Overwrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeChoice {
    Tcp,
    Icmp,
    /// Leave the service alone: no probes, no weight writes.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub service: ServiceKey,
    pub probe: Option<ProbeChoice>,
    pub port: Option<u16>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub checks: Vec<CheckConfig>,
    /// The global weight settings with this service's overrides applied.
    pub latency_aware: bool,
    pub policy: WeightPolicy,
    weights: Option<ServiceWeightsSection>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            limits: RiseFall::default(),
            discovery: None,
            manual_weights: ManualWeights::Respect,
            latency_aware: true,
            policy: WeightPolicy::default(),
            services: Vec::new(),
            diagnose: true,
            max_checks: 256,
            max_probes: None,
            alerts: AlertConfig::default(),
            agent: None,
            metrics: None,
        }
    }
}

impl Config {
    /// Reads and checks a file; errors name the file, line and field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let file: File =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", describe(&e, text)))?;
        let defaults = Config::default();
        let daemon = file.daemon.unwrap_or_default();
        let weights = file.weights.unwrap_or_default();
        let alerts = file.alerts.unwrap_or_default();
        let mut services = Vec::with_capacity(file.service.len());
        for s in file.service {
            let service_line = line_of(text, s.span().start);
            let s = s.into_inner();
            if s.probe == Some(ProbeChoice::None) && !s.check.is_empty() {
                bail!(
                    "line {service_line}: [[service]] '{}' has probe = \"none\" (left alone) and checks: remove one",
                    s.service.0
                );
            }
            let checks = s
                .check
                .into_iter()
                .map(|c| {
                    let line = c.span.map_or(service_line, |at| line_of(text, at));
                    check_config(c.section, line)
                })
                .collect::<Result<Vec<_>>>()?;
            services.push(ServiceConfig {
                service: s.service.0,
                probe: s.probe,
                port: s.port.map(|p| p.0),
                interval: s.interval.map(|d| d.0),
                timeout: s.timeout.map(|d| d.0),
                rise: s.rise.map(|r| r.0),
                fall: s.fall.map(|r| r.0),
                checks,
                latency_aware: false,
                policy: WeightPolicy::default(),
                weights: s.weights,
            });
        }
        let mut config = Config {
            interval: daemon.interval.map(|d| d.0).unwrap_or(defaults.interval),
            timeout: daemon.timeout.map(|d| d.0).unwrap_or(defaults.timeout),
            limits: RiseFall {
                rise: daemon.rise.map(|r| r.0).unwrap_or(defaults.limits.rise),
                fall: daemon.fall.map(|f| f.0).unwrap_or(defaults.limits.fall),
            },
            discovery: daemon.discovery.map(|d| d.0),
            manual_weights: daemon.manual_weights.unwrap_or(defaults.manual_weights),
            latency_aware: weights.latency_aware.unwrap_or(true),
            policy: WeightPolicy {
                decay: weights.decay.map(|d| d.0).unwrap_or(defaults.policy.decay),
                peak_ewma: weights.peak_ewma.unwrap_or(defaults.policy.peak_ewma),
                latency_slack: weights
                    .latency_slack
                    .map(|d| d.0)
                    .unwrap_or(defaults.policy.latency_slack),
                floor: weights.floor.map(|s| s.0).unwrap_or(defaults.policy.floor),
                hysteresis: weights
                    .hysteresis
                    .map(|s| s.0)
                    .unwrap_or(defaults.policy.hysteresis),
                max_step: weights
                    .max_step
                    .map(|s| s.0)
                    .unwrap_or(defaults.policy.max_step),
                slow_start: weights
                    .slow_start
                    .map(|d| d.0)
                    .unwrap_or(defaults.policy.slow_start),
                panic_threshold: weights
                    .panic_threshold
                    .map(|s| s.0)
                    .unwrap_or(defaults.policy.panic_threshold),
            },
            services,
            diagnose: daemon.diagnose.unwrap_or(defaults.diagnose),
            max_checks: daemon
                .max_checks
                .map_or(defaults.max_checks, |c| c.0 as usize),
            max_probes: daemon.max_probes.map(|c| c.0),
            alerts: AlertConfig {
                notify: alerts.notify.map(|c| c.0),
                webhook: alerts.webhook.map(|u| u.0),
                flap_window: alerts
                    .flap_window
                    .map_or(defaults.alerts.flap_window, |d| d.0),
                flap_limit: alerts
                    .flap_limit
                    .map_or(defaults.alerts.flap_limit, |c| c.0),
            },
            metrics: file.metrics.map(|m| m.listen),
            agent: file.agent.map(|a| AgentConfig {
                port: a.port.0,
                address: a.address,
                deadline: a.deadline.map_or(Duration::from_secs(10), |d| d.0),
                key: a.key_file.map(|k| k.0),
            }),
        };
        for service in &mut config.services {
            let overrides = service.weights.take().unwrap_or_default();
            let p = &mut service.policy;
            *p = config.policy;
            service.latency_aware = overrides.latency_aware.unwrap_or(config.latency_aware);
            if let Some(v) = overrides.latency_slack {
                p.latency_slack = v.0;
            }
            for (value, field) in [
                (overrides.floor, &mut p.floor),
                (overrides.hysteresis, &mut p.hysteresis),
                (overrides.max_step, &mut p.max_step),
                (overrides.panic_threshold, &mut p.panic_threshold),
            ] {
                if let Some(v) = value {
                    *field = v.0;
                }
            }
            if let Some(v) = overrides.slow_start {
                p.slow_start = v.0;
            }
        }
        for (i, a) in config.services.iter().enumerate() {
            if config.services[..i].iter().any(|b| b.service == a.service) {
                bail!(
                    "[[service]] number {}: '{}' is configured twice",
                    i + 1,
                    a.service
                );
            }
        }
        Ok(config)
    }

    /// Whether latency moves a service's weights, and its weight policy.
    pub fn weights_for(&self, key: &ServiceKey) -> (bool, WeightPolicy) {
        match self.service(key) {
            Some(s) => (s.latency_aware, s.policy),
            None => (self.latency_aware, self.policy),
        }
    }

    /// The settings of one service, if the file names it.
    pub fn service(&self, key: &ServiceKey) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.service == *key)
    }
}

/// A parse error with its line and column (toml reports byte offsets).
fn describe(error: &toml::de::Error, text: &str) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let source = text.lines().nth(line - 1).unwrap_or_default().trim();
            format!(
                "line {line}, column {column} (`{source}`): {}",
                error.message()
            )
        }
        None => error.message().to_string(),
    }
}

mod file;
#[cfg(test)]
mod tests;
mod values;

use file::*;
pub use values::parse_service;
