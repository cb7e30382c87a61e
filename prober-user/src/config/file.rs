//! The file as TOML gives it: one struct per section, each refusing
//! unknown fields, and the checks turned into their runtime form.

use super::*;
use values::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub(super) daemon: Option<DaemonSection>,
    pub(super) weights: Option<WeightsSection>,
    pub(super) alerts: Option<AlertsSection>,
    pub(super) agent: Option<AgentSection>,
    pub(super) metrics: Option<MetricsSection>,
    #[serde(default)]
    pub(super) service: Vec<toml::Spanned<ServiceSection>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsSection {
    pub(super) notify: Option<Argv>,
    pub(super) webhook: Option<Url>,
    pub(super) flap_window: Option<Interval>,
    pub(super) flap_limit: Option<Count>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsSection {
    /// "ADDR:PORT" of the Prometheus endpoint.
    pub(super) listen: std::net::SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentSection {
    pub(super) port: AgentPort,
    pub(super) address: Option<std::net::Ipv4Addr>,
    pub(super) deadline: Option<Interval>,
    pub(super) key_file: Option<AgentKeyFile>,
}

/// The path of the agents' key file, read when the config is.
pub(super) struct AgentKeyFile(pub(super) crate::agent::AgentKey);

impl<'de> Deserialize<'de> for AgentKeyFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let path = std::path::PathBuf::deserialize(d)?;
        crate::agent::read_key(&path)
            .map(AgentKeyFile)
            .map_err(de::Error::custom)
    }
}

/// A UDP port for agents, outside the ports of direct-routing checks.
pub(super) struct AgentPort(pub(super) u16);

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
pub(super) struct DaemonSection {
    pub(super) interval: Option<Interval>,
    pub(super) timeout: Option<Interval>,
    pub(super) rise: Option<Count>,
    pub(super) fall: Option<Count>,
    pub(super) discovery: Option<Interval>,
    pub(super) manual_weights: Option<ManualWeights>,
    pub(super) diagnose: Option<bool>,
    pub(super) max_checks: Option<Count>,
    pub(super) max_probes: Option<ProbeCapacity>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WeightsSection {
    pub(super) latency_aware: Option<bool>,
    pub(super) decay: Option<Interval>,
    pub(super) peak_ewma: Option<bool>,
    pub(super) latency_slack: Option<Latency>,
    pub(super) floor: Option<Share>,
    pub(super) hysteresis: Option<Share>,
    pub(super) max_step: Option<Share>,
    pub(super) slow_start: Option<Latency>,
    pub(super) panic_threshold: Option<Share>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    #[serde(rename = "match")]
    pub(super) service: ServiceMatch,
    pub(super) probe: Option<ProbeChoice>,
    pub(super) port: Option<Port>,
    pub(super) interval: Option<Interval>,
    pub(super) timeout: Option<Interval>,
    pub(super) rise: Option<Count>,
    pub(super) fall: Option<Count>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub(super) check: Vec<CheckAt>,
    pub(super) weights: Option<ServiceWeightsSection>,
}

/// A check table and where it starts, when toml can tell.
pub(super) struct CheckAt {
    pub(super) section: CheckSection,
    pub(super) span: Option<usize>,
}

/// `[[service.check]]` (several, each with its position) or
/// `[service.check]` (one; errors then name the service's line).
pub(super) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CheckAt>, D::Error> {
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

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub(super) enum CheckType {
    Http,
    Https,
    Tcp,
    Dns,
    Command,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckSection {
    #[serde(rename = "type")]
    pub(super) kind: CheckType,
    pub(super) port: Option<Port>,
    pub(super) interval: Option<Interval>,
    pub(super) timeout: Option<Interval>,
    pub(super) rise: Option<Count>,
    pub(super) fall: Option<Count>,
    pub(super) path: Option<String>,
    pub(super) host: Option<String>,
    pub(super) status: Option<Vec<u16>>,
    pub(super) body: Option<String>,
    pub(super) body_regex: Option<String>,
    pub(super) tls_verify: Option<bool>,
    pub(super) send: Option<String>,
    pub(super) expect: Option<String>,
    pub(super) query: Option<String>,
    pub(super) record: Option<Record>,
    pub(super) command: Option<Argv>,
}

/// Turns a `[[service.check]]` table into a check, refusing fields that do
/// not belong to its type; errors name the table's line.
pub(super) fn check_config(c: CheckSection, line: usize) -> Result<CheckConfig> {
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
pub(super) struct Argv(pub(super) Vec<String>);

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
pub(super) struct Url(pub(super) String);

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
pub(super) struct ServiceWeightsSection {
    pub(super) latency_aware: Option<bool>,
    pub(super) latency_slack: Option<Latency>,
    pub(super) floor: Option<Share>,
    pub(super) hysteresis: Option<Share>,
    pub(super) max_step: Option<Share>,
    pub(super) slow_start: Option<Latency>,
    pub(super) panic_threshold: Option<Share>,
}
