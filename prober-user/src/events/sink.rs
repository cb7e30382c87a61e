//! Where events go: the log always, the notify command and the webhook
//! when configured. Deliveries run in the background, bounded (a slow
//! pager cannot pile up processes or connections) and timed out.

use std::{process::Stdio, sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, process::Command, sync::Semaphore};
use tracing::{info, warn};

use super::{webhook, Event, Kind};
use crate::{checks::http::TlsConfigs, config::AlertConfig};

/// Deliveries in flight at once; more wait their turn.
const IN_FLIGHT: usize = 4;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sink {
    notify: Option<Arc<Vec<String>>>,
    webhook: Option<Arc<webhook::Url>>,
    limiter: Arc<Semaphore>,
    tls: Arc<TlsConfigs>,
}

impl Sink {
    pub fn new(config: &AlertConfig) -> Self {
        Self {
            notify: config.notify.clone().map(Arc::new),
            webhook: config
                .webhook
                .as_deref()
                .and_then(|u| webhook::parse_url(u).ok())
                .map(Arc::new),
            limiter: Arc::new(Semaphore::new(IN_FLIGHT)),
            tls: Arc::new(TlsConfigs::new()),
        }
    }

    /// Logs the event and starts its deliveries (call within a runtime).
    pub fn send(&self, event: &Event) {
        let json = serde_json::to_string(event).expect("events serialize");
        match event.kind {
            Kind::HostDown | Kind::CheckDown | Kind::ServiceEmpty | Kind::Flapping => {
                warn!(event = ?event.kind, services = event.services.len(), "{}", event.message)
            }
            _ => info!(event = ?event.kind, services = event.services.len(), "{}", event.message),
        }
        if let Some(argv) = &self.notify {
            let (argv, limiter, json) = (argv.clone(), self.limiter.clone(), json.clone());
            let kind = kind_name(event.kind);
            let message = event.message.clone();
            tokio::spawn(async move {
                let Ok(_permit) = limiter.acquire().await else {
                    return;
                };
                if let Err(e) = notify(&argv, kind, &message, &json).await {
                    warn!("notify command {}: {e}", argv[0]);
                }
            });
        }
        if let Some(url) = &self.webhook {
            let (url, limiter, tls) = (url.clone(), self.limiter.clone(), self.tls.clone());
            tokio::spawn(async move {
                let Ok(_permit) = limiter.acquire().await else {
                    return;
                };
                match webhook::post(&url, &json, &tls, DELIVERY_TIMEOUT).await {
                    Ok(status) if (200..300).contains(&status) => {}
                    Ok(status) => warn!(
                        "webhook {}:{}{}: HTTP status {status}",
                        url.host, url.port, url.path
                    ),
                    Err(e) => warn!("webhook {}:{}{}: {e}", url.host, url.port, url.path),
                }
            });
        }
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::HostDown => "host_down",
        Kind::HostUp => "host_up",
        Kind::CheckDown => "check_down",
        Kind::CheckUp => "check_up",
        Kind::ServiceEmpty => "service_empty",
        Kind::ServiceRestored => "service_restored",
        Kind::Flapping => "flapping",
        Kind::Stable => "stable",
    }
}

/// Runs the notify command: the event as JSON on stdin, its kind and
/// message in PROBER_EVENT and PROBER_MESSAGE (keepalived-style scripts
/// can use those alone).
async fn notify(argv: &[String], kind: &str, message: &str, json: &str) -> Result<(), String> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("PROBER_EVENT", kind)
        .env("PROBER_MESSAGE", message)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let run = async {
        // A command that does not read its input still runs.
        let _ = stdin.write_all(json.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
        drop(stdin);
        child.wait().await
    };
    match tokio::time::timeout(DELIVERY_TIMEOUT, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("exited with {status}")),
        Ok(Err(e)) => Err(format!("waiting: {e}")),
        Err(_) => Err(format!("still running after {DELIVERY_TIMEOUT:?}: killed")),
    }
}
