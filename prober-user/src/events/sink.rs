//! Where events go: the log always, the notify command and the webhook
//! when configured. Each of those two has one worker delivering in order,
//! one at a time, each delivery timed out, behind a bounded queue: a slow
//! pager or a dead webhook cannot pile up processes or connections, and
//! what does not fit in the queue is dropped and counted in the log.

use std::{process::Stdio, sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, process::Command, sync::mpsc};
use tracing::{info, warn};

use super::{webhook, Event, Kind};
use crate::{checks::http::TlsConfigs, config::AlertConfig};

/// Events waiting for one destination; more are dropped.
const QUEUE: usize = 64;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a worker delivers.
struct Delivery {
    kind: &'static str,
    message: String,
    json: String,
}

pub struct Sink {
    notify: Option<mpsc::Sender<Arc<Delivery>>>,
    webhook: Option<mpsc::Sender<Arc<Delivery>>>,
    dropped: u64,
}

impl Sink {
    /// Starts the workers (call within a runtime).
    pub fn new(config: &AlertConfig) -> Self {
        let notify = config.notify.clone().map(|argv| {
            let (tx, mut rx) = mpsc::channel::<Arc<Delivery>>(QUEUE);
            tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    if let Err(e) = notify(&argv, d.kind, &d.message, &d.json).await {
                        warn!("notify command {}: {e}", argv[0]);
                    }
                }
            });
            tx
        });
        let webhook = config
            .webhook
            .as_deref()
            .and_then(|u| webhook::parse_url(u).ok())
            .map(|url| {
                let (tx, mut rx) = mpsc::channel::<Arc<Delivery>>(QUEUE);
                let tls = TlsConfigs::new();
                tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        match webhook::post(&url, &d.json, &tls, DELIVERY_TIMEOUT).await {
                            Ok(status) if (200..300).contains(&status) => {}
                            Ok(status) => warn!(
                                "webhook {}:{}{}: HTTP status {status}",
                                url.host, url.port, url.path
                            ),
                            Err(e) => warn!("webhook {}:{}{}: {e}", url.host, url.port, url.path),
                        }
                    }
                });
                tx
            });
        Self {
            notify,
            webhook,
            dropped: 0,
        }
    }

    /// Logs the event and queues its deliveries.
    pub fn send(&mut self, event: &Event) {
        match event.kind {
            Kind::HostDown | Kind::CheckDown | Kind::ServiceEmpty | Kind::Flapping => {
                warn!(event = ?event.kind, services = event.services.len(), "{}", event.message)
            }
            _ => info!(event = ?event.kind, services = event.services.len(), "{}", event.message),
        }
        if self.notify.is_none() && self.webhook.is_none() {
            return;
        }
        let delivery = Arc::new(Delivery {
            kind: event.kind.name(),
            message: event.message.clone(),
            json: serde_json::to_string(event).expect("events serialize"),
        });
        for queue in [&self.notify, &self.webhook].into_iter().flatten() {
            if queue.try_send(delivery.clone()).is_err() {
                self.dropped += 1;
                warn!(
                    dropped = self.dropped,
                    "alert queue full ({QUEUE} waiting): event not delivered: {}", event.message
                );
            }
        }
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
