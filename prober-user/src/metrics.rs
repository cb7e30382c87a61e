//! Prometheus metrics (off unless `[metrics] listen` is set): a tiny HTTP
//! endpoint serving `GET /metrics` in the OpenMetrics text format, encoded
//! by `prometheus-client` from a status snapshot taken for each scrape.
//! Histograms come straight from the datapath's log2 buckets.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    control::{ask, Pending, Request, Response},
    status::Status,
};

/// Serves `/metrics` on `listen` (call within a runtime).
pub async fn serve(listen: SocketAddr, forward: mpsc::Sender<Pending>) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("[metrics] listen = \"{listen}\": cannot listen there"))?;
    info!(%listen, "metrics served at /metrics");
    // Scrapers are few: more connections than this wait for a slot.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, say: back off instead of spinning.
                    warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            let forward = forward.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut head = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut head),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&head[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, kind, body) = if path == "/metrics" {
                    match ask(&forward, Request::Metrics).await {
                        Response::Metrics(text) => (
                            "200 OK",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            text,
                        ),
                        other => (
                            "503 Service Unavailable",
                            "text/plain",
                            format!("{other:?}\n"),
                        ),
                    }
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".into())
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                // A scraper that does not read gets 10 s, not forever.
                let write = stream.write_all(answer.as_bytes());
                match tokio::time::timeout(std::time::Duration::from_secs(10), write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!("metrics: {e}"),
                    Err(_) => warn!("metrics: a scraper did not read its answer within 10 s"),
                }
            });
        }
    });
    Ok(())
}

/// The snapshot in the exposition format.
pub fn encode_status(status: Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status)));
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

#[derive(Debug)]
struct Snapshot(Status);

type Labels = Vec<(&'static str, String)>;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A histogram from log2-µs buckets, in seconds; bucket i's upper bound is
/// 2^(i+1) µs, the sum is estimated from the buckets' midpoints.
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, &[u64])],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, log2) in series.iter().filter(|(_, log2)| !log2.is_empty()) {
        // Per-bucket counts: the encoder makes them cumulative. The last
        // log2 bucket holds everything above, so it is +Inf.
        let mut count = 0u64;
        let mut sum = 0.0;
        let mut buckets = Vec::with_capacity(log2.len());
        for (i, &n) in log2.iter().enumerate() {
            count += n;
            let upper = (1u64 << (i + 1)) as f64 / 1e6;
            sum += n as f64 * upper * 0.75;
            let bound = if i + 1 < log2.len() {
                upper
            } else {
                f64::INFINITY
            };
            buckets.push((bound, n));
        }
        family
            .encode_family(labels)?
            .encode_histogram::<Labels>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        gauge(
            &mut e,
            "prober_up",
            "1 while the daemon runs",
            None,
            &[(vec![], 1.0)],
        )?;
        gauge(
            &mut e,
            "prober_ipvs_readable",
            "1 if the last IPVS discovery succeeded",
            None,
            &[(vec![], if s.ipvs_problem.is_none() { 1.0 } else { 0.0 })],
        )?;
        gauge(
            &mut e,
            "prober_memory",
            "The daemon's resident memory, and its heap's live allocations and free space",
            Some(&Unit::Bytes),
            &[
                (
                    vec![("kind", "resident".into())],
                    (s.memory.rss_kib * 1024) as f64,
                ),
                (
                    vec![("kind", "heap_in_use".into())],
                    (s.memory.heap_in_use_kib * 1024) as f64,
                ),
                (
                    vec![("kind", "heap_free".into())],
                    (s.memory.heap_free_kib * 1024) as f64,
                ),
            ],
        )?;
        gauge(
            &mut e,
            "prober_unchecked_destinations",
            "destinations prober does not check (see prober status), weights left alone",
            None,
            &[(vec![], s.unchecked.len() as f64)],
        )?;
        gauge(
            &mut e,
            "prober_hosts_undiagnosed",
            "real server hosts without an L3 diagnosis probe because the datapath is full",
            None,
            &[(vec![], s.undiagnosed_hosts as f64)],
        )?;
        gauge(
            &mut e,
            "prober_l3_probes_paused",
            "hosts' L3 diagnosis probes resting while their checks answer",
            None,
            &[(vec![], s.l3_probes_paused as f64)],
        )?;
        gauge(
            &mut e,
            "prober_director_fault_suspected",
            "1 while the evidence points at the director's own path (weights kept)",
            None,
            &[(vec![], if s.director_fault.is_some() { 1.0 } else { 0.0 })],
        )?;
        let mut healthy = Vec::new();
        let mut weights = Vec::new();
        let mut checks = Vec::new();
        let mut sent = Vec::new();
        let mut results = Vec::new();
        let mut rtts = Vec::new();
        let mut handshakes = Vec::new();
        let mut responses = Vec::new();
        let mut seen_probes = std::collections::HashSet::new();
        let mut seen_servers = std::collections::HashSet::new();
        for service in &s.services {
            for srv in &service.servers {
                let labels = || -> Labels {
                    vec![
                        ("service", service.service.clone()),
                        ("server", srv.server.clone()),
                    ]
                };
                // Drained servers are healthy (at weight 0).
                healthy.push((labels(), if srv.state == "down" { 0.0 } else { 1.0 }));
                for (source, value) in [
                    ("configured", Some(srv.weight.configured)),
                    ("computed", srv.weight.computed),
                    ("ipvs", Some(srv.weight.ipvs)),
                ] {
                    if let Some(value) = value {
                        let mut l = labels();
                        l.push(("source", source.into()));
                        weights.push((l, value as f64));
                    }
                }
                for check in &srv.l7 {
                    let mut l = labels();
                    l.push(("check", check.check.clone()));
                    checks.push((l, if check.state == "up" { 1.0 } else { 0.0 }));
                }
                // A probe shared by services is one series.
                if let Some(p) = &srv.l4 {
                    if seen_probes.insert(p.probe.clone()) {
                        let l = || -> Labels { vec![("probe", p.probe.clone())] };
                        sent.push((l(), p.sent));
                        for (result, n) in [
                            ("answered", p.answered),
                            ("refused", p.refused),
                            ("unreachable", p.unreachable),
                            ("timed_out", p.timed_out),
                        ] {
                            let mut l = l();
                            l.push(("result", result.into()));
                            results.push((l, n));
                        }
                        rtts.push((l(), p.rtt_log2_us.as_slice()));
                    }
                }
                if !srv.rtt.handshake_log2_us.is_empty() && seen_servers.insert(srv.server.clone())
                {
                    let l = vec![("server", srv.server.clone())];
                    handshakes.push((l.clone(), srv.rtt.handshake_log2_us.as_slice()));
                    responses.push((l, srv.rtt.response_log2_us.as_slice()));
                }
            }
        }
        gauge(
            &mut e,
            "prober_real_server_healthy",
            "1 if the real server passes every layer for this virtual service",
            None,
            &healthy,
        )?;
        gauge(
            &mut e,
            "prober_real_server_weight",
            "Weight of the real server: configured, computed by prober, and held by IPVS",
            None,
            &weights,
        )?;
        gauge(
            &mut e,
            "prober_check_healthy",
            "1 if the L7 check or command passes",
            None,
            &checks,
        )?;
        counter(&mut e, "prober_probes_sent", "Active probes sent", &sent)?;
        counter(
            &mut e,
            "prober_probe_results",
            "Active probe outcomes by result",
            &results,
        )?;
        histogram(
            &mut e,
            "prober_probe_rtt",
            "Round-trip time of answered active probes",
            &rtts,
        )?;
        histogram(
            &mut e,
            "prober_passive_handshake",
            "Client handshake RTT (SYN forwarded to SYN-ACK) seen passively",
            &handshakes,
        )?;
        histogram(
            &mut e,
            "prober_passive_response",
            "Time from a client request to the first response byte, seen passively",
            &responses,
        )?;
        counter(
            &mut e,
            "prober_weight_writes",
            "IPVS weight writes that succeeded",
            &[(vec![], s.weight_writes)],
        )?;
        counter(
            &mut e,
            "prober_weight_write_errors",
            "IPVS weight writes that failed",
            &[(vec![], s.weight_write_errors)],
        )?;
        counter(
            &mut e,
            "prober_netlink_errors",
            "Failed IPVS netlink exchanges (dumps and write batches)",
            &[(vec![], s.netlink_errors)],
        )?;
        gauge(
            &mut e,
            "prober_probe_send_largest",
            "The most probes sent in one tick (sends are spread over each interval)",
            None,
            &[(vec![], s.largest_send as f64)],
        )?;
        counter(
            &mut e,
            "prober_ipvs_dumps",
            "Full IPVS dumps (at start, when IPVS's configuration changed, and every discovery period)",
            &[(vec![], s.ipvs_dumps)],
        )?;
        if let Some(signalled) = s.ipvs_changes_signalled {
            counter(
                &mut e,
                "prober_ipvs_changes_signalled",
                "IPVS configuration calls by other processes, signalled by the kernel",
                &[(vec![], signalled)],
            )?;
        }
        counter(
            &mut e,
            "prober_probe_sends_late",
            "Probe sends that went out over half an interval after their grid point (the daemon was behind)",
            &[(vec![], s.sends_late)],
        )?;
        counter(
            &mut e,
            "prober_probe_frames_dropped_here",
            "Probe frames the probing interface dropped as they were sent (its ring full)",
            &[(vec![], s.frames_dropped_here)],
        )?;
        counter(
            &mut e,
            "prober_probe_events",
            "Probe outcomes the datapath reported: failures of up targets, answers of down ones, the outcomes ending such runs, RTT moves beyond the band",
            &[(vec![], s.probe_events)],
        )?;
        counter(
            &mut e,
            "prober_probe_slots_skipped",
            "Send-wheel slots not walked in their turn (the daemon was a whole turn behind); their targets went a turn later",
            &[(vec![], s.slots_skipped)],
        )?;
        counter(
            &mut e,
            "prober_pools_recomputed",
            "Pools whose weights were worked out again: touched by a change, or with something moving (a step, slow start, agent, command or client times)",
            &[(vec![], s.pools_recomputed)],
        )?;
        let d = &s.datapath;
        counter(
            &mut e,
            "prober_xdp_runs",
            "Runs of the ingress XDP program (one per received frame)",
            &[(vec![], d.packets)],
        )?;
        counter(
            &mut e,
            "prober_xdp_bytes",
            "Bytes of the frames the ingress XDP program saw",
            &[(vec![], d.bytes)],
        )?;
        counter(
            &mut e,
            "prober_probe_tx_runs",
            "Probe frames built by the probe_tx program",
            &[(vec![], d.probes_built)],
        )?;
        counter(
            &mut e,
            "prober_probe_tx_errors",
            "probe_tx runs that sent nothing",
            &[(vec![], d.probe_errors)],
        )?;
        counter(
            &mut e,
            "prober_replies",
            "Replies to probe ports by verdict (rejected: cookie did not match)",
            &[
                (vec![("verdict", "matched".into())], d.replies_matched),
                (vec![("verdict", "rejected".into())], d.replies_rejected),
                (vec![("verdict", "late".into())], d.replies_late),
            ],
        )?;
        counter(
            &mut e,
            "prober_resets_sent",
            "RSTs sent for SYN-ACKs (no half-open connections)",
            &[(vec![], d.resets_sent)],
        )?;
        counter(
            &mut e,
            "prober_resets_before_probe",
            "RSTs sent for an unanswered SYN before the next one (a lost SYN-ACK leaves the real server half-open)",
            &[(vec![], d.resets_before_probe)],
        )?;
        counter(
            &mut e,
            "prober_sends_held_for_timeout",
            "Turns of the send wheel that passed over a target whose last probe, sent late, was unanswered and still inside its timeout",
            &[(vec![], d.sends_held_for_timeout)],
        )?;
        counter(
            &mut e,
            "prober_probe_events_lost",
            "Probe outcomes the datapath's event ring had no room for (the daemon behind); a lost outcome delays a verdict, never makes one",
            &[(vec![], d.events_lost)],
        )?;
        counter(
            &mut e,
            "prober_agent_datagrams",
            "Datagrams to the agent port by outcome",
            &[
                (vec![("outcome", "recorded".into())], d.agent_reports),
                (vec![("outcome", "malformed".into())], d.agent_malformed),
                (vec![("outcome", "unknown_source".into())], d.agent_unknown),
                (
                    vec![("outcome", "unauthenticated".into())],
                    d.agent_unauthenticated,
                ),
                (vec![("outcome", "replayed".into())], d.agent_replayed),
            ],
        )?;
        let events: Vec<(Labels, u64)> = s
            .events
            .iter()
            .map(|(kind, n)| (vec![("kind", kind.clone())], *n))
            .collect();
        counter(&mut e, "prober_events", "Alerts raised, by kind", &events)?;
        Ok(())
    }
}
