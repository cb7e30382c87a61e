//! HTTP/1.1 GET for health checks: one request per connection
//! (`Connection: close`), the answer read up to [`MAX_ANSWER`].

use std::sync::Arc;

use regex::bytes::Regex;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{contains, dr, MAX_ANSWER};

pub struct Request<'a> {
    pub path: &'a str,
    pub host: &'a str,
    pub status: &'a [u16],
    pub body: Option<&'a str>,
    pub body_regex: Option<&'a str>,
}

pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &Request<'_>,
) -> Result<(), String> {
    let text = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: prober\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        request.path, request.host
    );
    stream
        .write_all(text.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let wants_body = request.body.is_some() || request.body_regex.is_some();
    let mut answer = Vec::with_capacity(4096);
    let mut buffer = [0u8; 8192];
    let (status, body_start, length, chunked) = loop {
        let n = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err(if answer.is_empty() {
                "connection closed without an answer".into()
            } else {
                "connection closed inside the answer's headers".into()
            });
        }
        answer.extend_from_slice(&buffer[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(start)) => {
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                };
                let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
                let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                break (response.code.unwrap_or(0), start, length, chunked);
            }
            Ok(httparse::Status::Partial) if answer.len() < MAX_ANSWER => continue,
            Ok(httparse::Status::Partial) => return Err("answer headers too long".into()),
            Err(e) => return Err(format!("not an HTTP answer: {e}")),
        }
    };
    if !request.status.contains(&status) {
        return Err(format!(
            "HTTP status {status}, expected {}",
            list(request.status)
        ));
    }
    if !wants_body {
        return Ok(());
    }
    // Read the body to its end (length, last chunk or close), within the
    // check's timeout: a body that never ends fails the check.
    loop {
        let body = &answer[body_start..];
        let complete = match (chunked, length) {
            (true, _) => dechunk(body).is_some(),
            (false, Some(length)) => body.len() >= length,
            (false, None) => false,
        };
        if complete || answer.len() >= MAX_ANSWER {
            break;
        }
        let n = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        if n == 0 {
            if length.is_some() || chunked {
                return Err("connection closed inside the body".into());
            }
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let raw = &answer[body_start..];
    let body = if chunked {
        dechunk(raw).unwrap_or_else(|| raw.to_vec())
    } else {
        raw[..length.unwrap_or(raw.len()).min(raw.len())].to_vec()
    };
    if let Some(needle) = request.body {
        if !contains(&body, needle.as_bytes()) {
            return Err(format!("body has no {needle:?}"));
        }
    }
    if let Some(pattern) = request.body_regex {
        let regex = Regex::new(pattern).map_err(|e| format!("body_regex: {e}"))?;
        if !regex.is_match(&body) {
            return Err(format!("body does not match /{pattern}/"));
        }
    }
    Ok(())
}

fn list(status: &[u16]) -> String {
    status
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A complete chunked body, decoded; `None` until the last chunk is in.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        // Sizes beyond what is ever read are malformed (and must not
        // overflow below).
        let size = usize::from_str_radix(size_text, 16)
            .ok()
            .filter(|s| *s <= MAX_ANSWER)?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if raw.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// TLS client settings: checks reach real servers by address, whose
/// certificates name the service, so verification is opt-in.
pub struct TlsConfigs {
    verifying: Arc<ClientConfig>,
    trusting: Arc<ClientConfig>,
}

impl TlsConfigs {
    pub fn new() -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let verifying = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let trusting = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Self {
            verifying: Arc::new(verifying),
            trusting: Arc::new(trusting),
        }
    }

    pub async fn connect(
        &self,
        stream: dr::Stream,
        host: &str,
        verify: bool,
    ) -> Result<TlsStream<dr::Stream>, String> {
        let config = if verify {
            self.verifying.clone()
        } else {
            self.trusting.clone()
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("'{host}' is not a TLS server name: {e}"))?;
        TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}

/// Accepts any certificate but still checks the handshake's signatures
/// (the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_decode_only_when_complete() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").as_deref(),
            Some(&b"Wikipedia"[..])
        );
        assert_eq!(dechunk(b"4\r\nWiki\r\n5\r\nped"), None);
        assert_eq!(dechunk(b"zz\r\n"), None);
        assert_eq!(dechunk(b"ffffffffffffffff\r\nx"), None, "no overflow");
    }
}
