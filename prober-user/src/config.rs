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
//! discovery = "5s"         # how often IPVS is re-read
//! manual_weights = "respect"   # or "overwrite": a weight changed by hand
//! diagnose = true          # ICMP-probe each real server host, to tell a
//!                          # dead host from a dead service in alerts
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
//! latency_slack = "5ms"    # added to latencies before comparing them
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

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub interval: Duration,
    pub timeout: Duration,
    pub limits: RiseFall,
    pub discovery: Duration,
    pub manual_weights: ManualWeights,
    pub latency_aware: bool,
    pub policy: WeightPolicy,
    pub services: Vec<ServiceConfig>,
    /// ICMP-probe every real server host for root-cause diagnosis.
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
            discovery: Duration::from_secs(5),
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
            discovery: daemon.discovery.map(|d| d.0).unwrap_or(defaults.discovery),
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    daemon: Option<DaemonSection>,
    weights: Option<WeightsSection>,
    alerts: Option<AlertsSection>,
    agent: Option<AgentSection>,
    metrics: Option<MetricsSection>,
    #[serde(default)]
    service: Vec<toml::Spanned<ServiceSection>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AlertsSection {
    notify: Option<Argv>,
    webhook: Option<Url>,
    flap_window: Option<Interval>,
    flap_limit: Option<Count>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// "ADDR:PORT" of the Prometheus endpoint.
    listen: std::net::SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    port: AgentPort,
    address: Option<std::net::Ipv4Addr>,
    deadline: Option<Interval>,
    key_file: Option<AgentKeyFile>,
}

/// The path of the agents' key file, read when the config is.
struct AgentKeyFile(crate::agent::AgentKey);

impl<'de> Deserialize<'de> for AgentKeyFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let path = std::path::PathBuf::deserialize(d)?;
        crate::agent::read_key(&path)
            .map(AgentKeyFile)
            .map_err(de::Error::custom)
    }
}

/// A UDP port for agents, outside the ports of direct-routing checks.
struct AgentPort(u16);

impl<'de> Deserialize<'de> for AgentPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Port(port) = Port::deserialize(d)?;
        if crate::checks::dr::PORTS.contains(&port) {
            return Err(de::Error::custom(format!(
                "{port} is one of the ports of direct-routing checks ({}-{}): pick another",
                crate::checks::dr::PORTS.start(),
                crate::checks::dr::PORTS.end()
            )));
        }
        Ok(AgentPort(port))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    interval: Option<Interval>,
    timeout: Option<Interval>,
    rise: Option<Count>,
    fall: Option<Count>,
    discovery: Option<Interval>,
    manual_weights: Option<ManualWeights>,
    diagnose: Option<bool>,
    max_checks: Option<Count>,
    max_probes: Option<ProbeCapacity>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WeightsSection {
    latency_aware: Option<bool>,
    decay: Option<Interval>,
    peak_ewma: Option<bool>,
    latency_slack: Option<Latency>,
    floor: Option<Share>,
    hysteresis: Option<Share>,
    max_step: Option<Share>,
    slow_start: Option<Latency>,
    panic_threshold: Option<Share>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    #[serde(rename = "match")]
    service: ServiceMatch,
    probe: Option<ProbeChoice>,
    port: Option<Port>,
    interval: Option<Interval>,
    timeout: Option<Interval>,
    rise: Option<Count>,
    fall: Option<Count>,
    #[serde(default, deserialize_with = "one_or_many")]
    check: Vec<CheckAt>,
    weights: Option<ServiceWeightsSection>,
}

/// A check table and where it starts, when toml can tell.
struct CheckAt {
    section: CheckSection,
    span: Option<usize>,
}

/// `[[service.check]]` (several, each with its position) or
/// `[service.check]` (one; errors then name the service's line).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CheckAt>, D::Error> {
    struct Visitor;
    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<CheckAt>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a [service.check] table or [[service.check]] tables")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(c) = seq.next_element::<toml::Spanned<CheckSection>>()? {
                out.push(CheckAt {
                    span: Some(c.span().start),
                    section: c.into_inner(),
                });
            }
            Ok(out)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let section = CheckSection::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok(vec![CheckAt {
                section,
                span: None,
            }])
        }
    }
    d.deserialize_any(Visitor)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum CheckType {
    Http,
    Https,
    Tcp,
    Dns,
    Command,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSection {
    #[serde(rename = "type")]
    kind: CheckType,
    port: Option<Port>,
    interval: Option<Interval>,
    timeout: Option<Interval>,
    rise: Option<Count>,
    fall: Option<Count>,
    path: Option<String>,
    host: Option<String>,
    status: Option<Vec<u16>>,
    body: Option<String>,
    body_regex: Option<String>,
    tls_verify: Option<bool>,
    send: Option<String>,
    expect: Option<String>,
    query: Option<String>,
    record: Option<Record>,
    command: Option<Argv>,
}

/// Turns a `[[service.check]]` table into a check, refusing fields that do
/// not belong to its type; errors name the table's line.
fn check_config(c: CheckSection, line: usize) -> Result<CheckConfig> {
    let at = |why: String| {
        anyhow::anyhow!(
            "line {line}: [[service.check]] type = \"{}\": {why}",
            format!("{:?}", c.kind).to_lowercase()
        )
    };
    let given = |name: &str| -> bool {
        match name {
            "path" => c.path.is_some(),
            "host" => c.host.is_some(),
            "status" => c.status.is_some(),
            "body" => c.body.is_some(),
            "body_regex" => c.body_regex.is_some(),
            "tls_verify" => c.tls_verify.is_some(),
            "send" => c.send.is_some(),
            "expect" => c.expect.is_some(),
            "query" => c.query.is_some(),
            "record" => c.record.is_some(),
            "command" => c.command.is_some(),
            _ => false,
        }
    };
    let allowed: &[&str] = match c.kind {
        CheckType::Http => &["path", "host", "status", "body", "body_regex"],
        CheckType::Https => &["path", "host", "status", "body", "body_regex", "tls_verify"],
        CheckType::Tcp => &["send", "expect"],
        CheckType::Dns => &["query", "record"],
        CheckType::Command => &["command"],
    };
    for field in [
        "path",
        "host",
        "status",
        "body",
        "body_regex",
        "tls_verify",
        "send",
        "expect",
        "query",
        "record",
        "command",
    ] {
        if given(field) && !allowed.contains(&field) {
            return Err(at(format!(
                "`{field}` does not apply (fields of this type: {})",
                allowed.join(", ")
            )));
        }
    }
    let check = match c.kind {
        CheckType::Http | CheckType::Https => {
            let path = c.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|ch| ch.is_ascii_whitespace()) {
                return Err(at(format!(
                    "path '{path}' must start with / and hold no spaces"
                )));
            }
            if let Some(host) = &c.host {
                if host.is_empty() || host.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    return Err(at(format!(
                        "host {host:?} must be a name or address without spaces"
                    )));
                }
                if c.kind == CheckType::Https {
                    rustls::pki_types::ServerName::try_from(host.as_str())
                        .map_err(|e| at(format!("host '{host}' is not a TLS server name: {e}")))?;
                }
            }
            if c.tls_verify == Some(true) && c.host.is_none() {
                return Err(at(
                    "tls_verify = true needs `host`: certificates name the service, not the real server's address".into(),
                ));
            }
            if let Some(pattern) = &c.body_regex {
                regex::bytes::Regex::new(pattern)
                    .map_err(|e| at(format!("body_regex is not a regular expression: {e}")))?;
            }
            let status = c.status.clone().unwrap_or_else(|| vec![200]);
            if status.is_empty() || status.iter().any(|s| !(100..=599).contains(s)) {
                return Err(at(format!(
                    "status {status:?}: give HTTP codes from 100 to 599"
                )));
            }
            Check::Http {
                tls: c.kind == CheckType::Https,
                tls_verify: c.tls_verify.unwrap_or(false),
                path,
                host: c.host.clone(),
                status,
                body: c.body.clone(),
                body_regex: c.body_regex.clone(),
            }
        }
        CheckType::Tcp => Check::Tcp {
            send: c.send.clone(),
            expect: c.expect.clone(),
        },
        CheckType::Dns => {
            let name = c
                .query
                .clone()
                .ok_or_else(|| at("`query` (the name to ask for) is missing".into()))?;
            crate::checks::valid_dns_name(&name).map_err(at)?;
            Check::Dns {
                name,
                record: c.record.unwrap_or(Record::A),
            }
        }
        CheckType::Command => Check::Command {
            argv: c
                .command
                .as_ref()
                .map(|a| a.0.clone())
                .ok_or_else(|| at("`command` (program and arguments) is missing".into()))?,
        },
    };
    Ok(CheckConfig {
        check: Arc::new(check),
        port: c.port.map(|p| p.0),
        interval: c.interval.map(|d| d.0),
        timeout: c.timeout.map(|d| d.0),
        rise: c.rise.map(|r| r.0),
        fall: c.fall.map(|f| f.0),
    })
}

/// A program and its arguments: a non-empty array of strings.
struct Argv(Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let argv = Vec::<String>::deserialize(d)?;
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(de::Error::custom(
                "give the program and its arguments as an array, e.g. [\"/usr/local/bin/check\", \"{address}\"]",
            ));
        }
        Ok(Argv(argv))
    }
}

/// An http:// or https:// URL.
struct Url(String);

impl<'de> Deserialize<'de> for Url {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::events::webhook::parse_url(&text).map_err(de::Error::custom)?;
        Ok(Url(text))
    }
}

/// A service's own weight policy; the latency estimate (`decay`,
/// `peak_ewma`) is shared by all services and set only in `[weights]`.
#[derive(Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct ServiceWeightsSection {
    latency_aware: Option<bool>,
    latency_slack: Option<Latency>,
    floor: Option<Share>,
    hysteresis: Option<Share>,
    max_step: Option<Share>,
    slow_start: Option<Latency>,
    panic_threshold: Option<Share>,
}

/// A duration like "200ms" or "1s", at least 10 ms.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Interval(Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            de::Error::custom(format!(
                "'{text}' is not a duration like \"200ms\" or \"1s\" ({e})"
            ))
        })?;
        if duration < Duration::from_millis(10) {
            return Err(de::Error::custom(format!(
                "'{text}' is below the 10ms minimum"
            )));
        }
        Ok(Interval(duration))
    }
}

/// A duration like "5ms", zero allowed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Latency(Duration);

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Latency).map_err(|e| {
            de::Error::custom(format!("'{text}' is not a duration like \"5ms\" ({e})"))
        })
    }
}

/// A count of at least 1.
struct Count(u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if !(1..=1000).contains(&n) {
            return Err(de::Error::custom(format!(
                "{n} is not a count from 1 to 1000"
            )));
        }
        Ok(Count(n as u32))
    }
}

/// How many probes the datapath holds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProbeCapacity(u32);

impl<'de> Deserialize<'de> for ProbeCapacity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        let most = prober_common::MOST_TARGETS as i64;
        if !(1024..=most).contains(&n) {
            return Err(de::Error::custom(format!(
                "{n} is not a number of probes from 1024 to {most}"
            )));
        }
        Ok(ProbeCapacity(n as u32))
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(0.0..=1.0).contains(&x) {
            return Err(de::Error::custom(format!(
                "{x} is not a share from 0.0 to 1.0"
            )));
        }
        Ok(Share(x))
    }
}

struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if !(1..=65535).contains(&n) {
            return Err(de::Error::custom(format!(
                "{n} is not a port from 1 to 65535"
            )));
        }
        Ok(Port(n as u16))
    }
}

/// "tcp:ADDR:PORT", "udp:...", "sctp:...", "fwmark:MARK" or "fwmark6:MARK".
struct ServiceMatch(ServiceKey);

impl<'de> Deserialize<'de> for ServiceMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_service(&text)
            .map(ServiceMatch)
            .map_err(de::Error::custom)
    }
}

pub fn parse_service(text: &str) -> Result<ServiceKey, String> {
    let bad = |why: &str| {
        format!("'{text}' is not a service ({why}; expected tcp:ADDR:PORT, udp:..., sctp:..., fwmark:MARK or fwmark6:MARK)")
    };
    let (kind, rest) = text.split_once(':').ok_or_else(|| bad("no kind"))?;
    let mark = |family| {
        rest.parse()
            .map(|mark| ServiceKey::Fwmark { family, mark })
            .map_err(|_| bad("bad mark"))
    };
    let protocol = match kind {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "fwmark" => return mark(Family::Ipv4),
        "fwmark6" => return mark(Family::Ipv6),
        _ => return Err(bad("unknown kind")),
    };
    let (addr, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let addr: IpAddr = addr
        .trim_matches(['[', ']'])
        .parse()
        .map_err(|_| bad("bad address"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    Ok(ServiceKey::Address {
        protocol,
        addr,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_content_is_the_default_configuration() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn a_full_file_is_read() {
        let config = Config::parse(
            r#"
[daemon]
interval = "200ms"
rise = 3
manual_weights = "overwrite"

[weights]
floor = 0.2
slow_start = "1m"

[[service]]
match = "tcp:192.0.2.10:80"
port = 8080
fall = 5

[[service]]
match = "fwmark:7"
probe = "none"
"#,
        )
        .unwrap();
        assert_eq!(config.interval, Duration::from_millis(200));
        assert_eq!(config.limits, RiseFall { rise: 3, fall: 3 });
        assert_eq!(config.manual_weights, ManualWeights::Overwrite);
        assert_eq!(config.policy.floor, 0.2);
        assert_eq!(config.policy.slow_start, Duration::from_secs(60));
        let web = config
            .service(&parse_service("tcp:192.0.2.10:80").unwrap())
            .unwrap();
        assert_eq!((web.port, web.fall), (Some(8080), Some(5)));
        let marked = config
            .service(&ServiceKey::Fwmark {
                family: Family::Ipv4,
                mark: 7,
            })
            .unwrap();
        assert_eq!(marked.probe, Some(ProbeChoice::None));
        assert_eq!(
            marked.policy, config.policy,
            "no overrides: the global policy"
        );
    }

    #[test]
    fn a_service_can_have_its_own_weight_policy() {
        let config = Config::parse(
            "[weights]\nfloor = 0.2\n[[service]]\nmatch = \"tcp:192.0.2.10:80\"\n[service.weights]\nlatency_aware = false\npanic_threshold = 0.3\n",
        )
        .unwrap();
        let key = parse_service("tcp:192.0.2.10:80").unwrap();
        let (latency_aware, policy) = config.weights_for(&key);
        assert!(!latency_aware);
        assert_eq!(
            (policy.panic_threshold, policy.floor),
            (0.3, 0.2),
            "override on top of the global policy"
        );
        let other = parse_service("tcp:192.0.2.11:80").unwrap();
        assert_eq!(config.weights_for(&other), (true, config.policy));
        let err =
            Config::parse("[[service]]\nmatch = \"fwmark:1\"\n[service.weights]\ndecay = \"1s\"\n")
                .unwrap_err();
        assert!(
            err.to_string().contains("line 4") && err.to_string().contains("decay"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            (
                "[daemon]\ninterval = \"fast\"\n",
                "line 2",
                "not a duration",
            ),
            ("[daemon]\n\nrise = 0\n", "line 3", "not a count"),
            ("[weights]\nfloor = 1.5\n", "line 2", "not a share"),
            (
                "[[service]]\nmatch = \"tcp:1.2.3.4\"\n",
                "line 2",
                "no port",
            ),
            ("[daemon]\nintervall = \"1s\"\n", "line 2", "intervall"),
            (
                "[daemon]\ninterval = \"fast\"\n",
                "line 2",
                "`interval = \"fast\"`",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\nport = 0\n",
                "line 3",
                "not a port",
            ),
        ];
        for (text, line, what) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(line) && err.contains(what), "{text:?}: {err}");
        }
        let check_cases = [
            (
                "[[service]]\nmatch = \"fwmark:1\"\n\n[[service.check]]\ntype = \"tcp\"\npath = \"/\"\n",
                "line 4",
                "`path` does not apply",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[service.check]\ntype = \"http\"\nbody_regex = \"(\"\n",
                "line 1",
                "body_regex is not a regular expression",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"gopher\"\n",
                "line 4",
                "unknown variant `gopher`",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"dns\"\n",
                "line 3",
                "`query`",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"command\"\ncommand = []\n",
                "line 5",
                "program and its arguments",
            ),
            (
                "[alerts]\nwebhook = \"ftp://x/\"\n",
                "line 2",
                "not a webhook URL",
            ),
            ("[agent]\ndeadline = \"5s\"\n", "line 1", "missing field `port`"),
            ("[agent]\nport = 60001\n", "line 2", "ports of direct-routing checks"),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"http\"\ntls_verify = true\n",
                "line 3",
                "`tls_verify` does not apply",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"https\"\ntls_verify = true\n",
                "line 3",
                "needs `host`",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"http\"\nhost = \"a\\r\\nX-Evil: 1\"\n",
                "line 3",
                "without spaces",
            ),
            (
                "[[service]]\nmatch = \"fwmark:1\"\nprobe = \"none\"\n[[service.check]]\ntype = \"tcp\"\n",
                "line 1",
                "probe = \"none\"",
            ),
        ];
        for (text, line, what) in check_cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(line) && err.contains(what), "{text:?}: {err}");
        }
        let twice = "[[service]]\nmatch = \"fwmark:1\"\n[[service]]\nmatch = \"fwmark:1\"\n";
        assert!(Config::parse(twice)
            .unwrap_err()
            .to_string()
            .contains("configured twice"));
    }

    #[test]
    fn the_agent_key_file_is_read_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("prober-key-test-{}", std::process::id()));
        std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
        let text = format!(
            "[agent]\nport = 5555\nkey_file = {:?}\n",
            path.display().to_string()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("key_file") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = Config::parse(&text).unwrap();
        assert_eq!(
            config.agent.unwrap().key,
            Some(crate::agent::parse_key("00112233445566778899aabbccddeeff").unwrap())
        );
        std::fs::write(&path, "short\n").unwrap();
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("32 hex digits"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("No such file"), "{err}");
    }
}
