//! The daemon's control socket: `prober status` and `prober reload` talk
//! to the running daemon through it (one JSON line each way), and the
//! metrics endpoint asks through the same channel. Requests are answered
//! by the daemon's main loop, between ticks, so they see one consistent
//! state. The socket is root-only (mode 0600): reload is privileged.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::warn;

/// Where the control sockets live.
pub const SOCKET_DIR: &str = "/run/prober";

/// The control socket of the daemon owning `pin_dir` (one daemon per pin
/// directory, so one socket each).
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "prober".into());
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reload,
    Metrics,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Status(Box<crate::status::Status>),
    /// Reload applied (`ok`), or refused and why.
    Reload {
        ok: bool,
        message: String,
    },
    Metrics(String),
    Error(String),
}

pub type Pending = (Request, oneshot::Sender<Response>);

/// The listening socket; removed on drop.
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of our socket: removed on drop only if still ours.
    inode: Option<(u64, u64)>,
    requests: mpsc::Receiver<Pending>,
    sender: mpsc::Sender<Pending>,
}

impl ControlServer {
    /// Listens on `path` (call within a runtime). The caller owns the pin
    /// directory, so a socket already there is a dead daemon's.
    pub fn listen(path: &Path) -> Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // A live daemon answers: its socket is not ours to take.
                if StdUnixStream::connect(path).is_ok() {
                    bail!(
                        "another prober listens on {} (give this one --socket or another --pin-dir)",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Ok(_) => bail!(
                "{} exists and is not a socket: not removing it",
                path.display()
            ),
            Err(_) => {}
        }
        // Root only from the first instant: no window with a wider mode.
        // SAFETY: umask only changes this process's file creation mask.
        let old_mask = unsafe { libc::umask(0o077) };
        let bound = UnixListener::bind(path);
        unsafe { libc::umask(old_mask) };
        let listener =
            bound.with_context(|| format!("listening on control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        let inode = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        let (sender, requests) = mpsc::channel(16);
        let forward = sender.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of fds, say: back off instead of spinning.
                        warn!("control socket: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let forward = forward.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, forward).await {
                        warn!("control socket: {e:#}");
                    }
                });
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            inode,
            requests,
            sender,
        })
    }

    /// The next request, for the main loop to answer.
    pub async fn next(&mut self) -> Option<Pending> {
        self.requests.recv().await
    }

    /// For other front ends (the metrics endpoint).
    pub fn sender(&self) -> mpsc::Sender<Pending> {
        self.sender.clone()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let current = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if current.is_some() && current == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One connection: one request line, one response line.
async fn serve(stream: tokio::net::UnixStream, forward: mpsc::Sender<Pending>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = AsyncBufReader::new(read).take(4096);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .context("no request within 5 s")??;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => ask(&forward, request).await,
        Err(e) => Response::Error(format!("not a request: {e}")),
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Asks the main loop; it answers between ticks.
pub async fn ask(forward: &mpsc::Sender<Pending>, request: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    if forward.send((request, reply)).await.is_err() {
        return Response::Error("the daemon is stopping".into());
    }
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(response)) => response,
        _ => Response::Error("the daemon did not answer within 10 s".into()),
    }
}

/// The daemon is not running (exit code 3 in the CLI).
#[derive(Debug)]
pub struct NotRunning(pub String);

impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotRunning {}

/// How long a CLI call waits for the daemon's answer: the status of
/// 100,000 real servers is built between ticks and took over 15 s on a
/// loaded emulated director (a debug build); giving up sooner showed an
/// operator nothing.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Sends one request to the daemon owning `socket` (a CLI call).
pub fn request(socket: &Path, request: Request) -> Result<Response> {
    let mut stream = match StdUnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(NotRunning(format!(
                "prober is not running: no daemon listens on {} ({e}); start it with `prober run --iface <interface>`",
                socket.display()
            ))
            .into());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    stream.set_read_timeout(Some(ANSWER_WAIT))?;
    let mut text = serde_json::to_string(&request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!(
                "the daemon on {} did not answer within {} s (stalled or overloaded: its log says why)",
                socket.display(),
                ANSWER_WAIT.as_secs()
            );
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading the answer from {}", socket.display()));
        }
    }
    if line.is_empty() {
        bail!("the daemon closed {} without answering", socket.display());
    }
    Ok(serde_json::from_str(&line)?)
}
