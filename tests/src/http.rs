//! A small HTTP/1.1 server for tests: answers per path as told (status,
//! body, a pause before the body), changeable while it runs, and records
//! what it was asked. One thread per connection, bounded by `MAX_CONNECTIONS`.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

const MAX_CONNECTIONS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub status: u16,
    pub body: String,
    /// Time between the headers and the body.
    pub pause: Duration,
}

impl Route {
    pub fn ok(body: &str) -> Self {
        Self {
            status: 200,
            body: body.into(),
            pause: Duration::ZERO,
        }
    }
}

/// A request as received: path and Host header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    pub body: String,
}

#[derive(Clone, Default)]
pub struct HttpServer {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl HttpServer {
    /// Serves on `listener` (bound by the caller, e.g. inside a namespace)
    /// until the process ends; unknown paths get 404.
    pub fn serve(listener: TcpListener) -> Self {
        let server = Self::default();
        let shared = server.clone();
        listener.set_nonblocking(false).expect("blocking listener");
        thread::spawn(move || {
            for conn in listener.incoming().take(MAX_CONNECTIONS) {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                thread::spawn(move || shared.answer(conn));
            }
        });
        server
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.into(), route);
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn answer(&self, mut conn: std::net::TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut request = Vec::new();
        let mut buffer = [0u8; 2048];
        let head_end = loop {
            match conn.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buffer[..n]),
            }
            if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if request.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&request[..head_end]).to_string();
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or("").split_whitespace();
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while request.len() < head_end + length {
            match conn.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buffer[..n]),
            }
        }
        let body_end = request.len().min(head_end + length);
        self.seen.lock().unwrap().push(Seen {
            method,
            host: header("host").unwrap_or_default(),
            path: path.clone(),
            body: String::from_utf8_lossy(&request[head_end..body_end]).to_string(),
        });
        let route = self
            .routes
            .lock()
            .unwrap()
            .get(&path)
            .cloned()
            .unwrap_or(Route {
                status: 404,
                body: "not found".into(),
                pause: Duration::ZERO,
            });
        let headers = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            route.status,
            route.body.len()
        );
        if conn.write_all(headers.as_bytes()).is_err() {
            return;
        }
        thread::sleep(route.pause);
        let _ = conn.write_all(route.body.as_bytes());
    }
}
