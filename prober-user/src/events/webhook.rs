//! POSTs an event as JSON to the configured URL (HTTP/1.1, one request
//! per connection; https:// verifies the server's certificate).

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::checks::{dr, http::TlsConfigs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// `http://HOST[:PORT][/PATH]` or `https://...`.
pub fn parse_url(text: &str) -> Result<Url, String> {
    let bad = |why: &str| {
        format!("'{text}' is not a webhook URL ({why}; expected http://HOST[:PORT]/PATH or https://...)")
    };
    let (tls, rest) = if let Some(rest) = text.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(bad("scheme"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.chars().any(|c| c.is_ascii_whitespace()) {
        return Err(bad("space in the path"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| bad("port"))?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

pub async fn post(
    url: &Url,
    body: &str,
    tls: &TlsConfigs,
    timeout: Duration,
) -> Result<u16, String> {
    tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect to {}:{}: {e}", url.host, url.port))?;
        let stream = dr::Stream::plain(stream);
        if url.tls {
            let stream = tls.connect(stream, &url.host, true).await?;
            send(stream, url, body).await
        } else {
            send(stream, url, body).await
        }
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &Url,
    body: &str,
) -> Result<u16, String> {
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: prober\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.path,
        url.host,
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("connection closed without an answer".into());
        }
        answer.extend_from_slice(&buffer[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(_)) => return Ok(response.code.unwrap_or(0)),
            Ok(httparse::Status::Partial) if answer.len() < 16 * 1024 => continue,
            _ => return Err("not an HTTP answer".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("http://alerts.example:9000/hook").unwrap(),
            Url {
                tls: false,
                host: "alerts.example".into(),
                port: 9000,
                path: "/hook".into()
            }
        );
        assert_eq!(parse_url("https://10.0.0.1").unwrap().port, 443);
        assert_eq!(parse_url("http://[::1]:81/x").unwrap().host, "::1");
        for bad in ["ftp://x/", "http://:80/", "http://h:port/", "http://h/a b"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
