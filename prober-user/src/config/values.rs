//! Values with their bounds, refused with a message naming the bound
//! when the file is parsed.

use super::*;

/// A duration like "200ms" or "1s", at least 10 ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Interval(pub(super) Duration);

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
pub(super) struct Latency(pub(super) Duration);

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Latency).map_err(|e| {
            de::Error::custom(format!("'{text}' is not a duration like \"5ms\" ({e})"))
        })
    }
}

/// A count of at least 1.
pub(super) struct Count(pub(super) u32);

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
pub(super) struct ProbeCapacity(pub(super) u32);

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
pub(super) struct Share(pub(super) f64);

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

pub(super) struct Port(pub(super) u16);

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
pub(super) struct ServiceMatch(pub(super) ServiceKey);

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
