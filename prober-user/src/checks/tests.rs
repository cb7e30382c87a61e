//! Each check against real servers on loopback.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
};

use super::*;

/// A TCP server on 127.0.0.1 that answers every connection with
/// `answer`, in `pieces` equal parts with `pause` between them.
async fn server(answer: &'static [u8], pieces: usize, pause: Duration) -> u16 {
    let size = answer.len().div_ceil(pieces.max(1)).max(1);
    parts_server(answer.chunks(size).collect(), pause).await
}

/// Like `server`, the answer in the given parts.
async fn parts_server(parts: Vec<&'static [u8]>, pause: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let parts = parts.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                for chunk in parts {
                    if stream.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    });
    port
}

fn spec(port: u16, check: Check) -> CheckSpec {
    CheckSpec {
        address: "127.0.0.1".parse().unwrap(),
        port,
        vip: None,
        check: Arc::new(check),
    }
}

fn http(status: &[u16], body: Option<&str>, body_regex: Option<&str>) -> Check {
    Check::Http {
        tls: false,
        tls_verify: false,
        path: "/health".into(),
        host: Some("www.example".into()),
        status: status.to_vec(),
        body: body.map(String::from),
        body_regex: body_regex.map(String::from),
    }
}

async fn once(spec: &CheckSpec, timeout: Duration) -> Outcome {
    let context = Context {
        gate: None,
        tls: Arc::new(http::TlsConfigs::new()),
        timeout,
    };
    match tokio::time::timeout(timeout, run(spec, &context)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(why)) => Outcome::Failed(why),
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

const OK: Outcome = Outcome::Passed { weight: None };
const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn http_status_body_and_regex() {
    let good = server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nstatus: healthy\n",
        3,
        Duration::from_millis(5),
    )
    .await;
    assert_eq!(
        once(&spec(good, http(&[200], None, None)), SECOND).await,
        OK
    );
    assert_eq!(
        once(
            &spec(good, http(&[200], Some("healthy"), Some("^status: \\w+"))),
            SECOND
        )
        .await,
        OK
    );
    let Outcome::Failed(why) = once(&spec(good, http(&[200], Some("ready"), None)), SECOND).await
    else {
        panic!("a missing substring must fail");
    };
    assert!(why.contains("no \"ready\""), "{why}");
    let Outcome::Failed(why) = once(&spec(good, http(&[204], None, None)), SECOND).await else {
        panic!("a wrong status must fail");
    };
    assert_eq!(why, "HTTP status 200, expected 204");

    let error = server(
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
        1,
        Duration::ZERO,
    )
    .await;
    let Outcome::Failed(why) = once(&spec(error, http(&[200], None, None)), SECOND).await else {
        panic!("503 must fail");
    };
    assert!(why.contains("503"), "{why}");
}

#[tokio::test]
async fn http_chunked_and_slow_bodies() {
    let chunked = server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nall\r\n4\r\n ok.\r\n0\r\n\r\n",
        4,
        Duration::from_millis(5),
    )
    .await;
    assert_eq!(
        once(&spec(chunked, http(&[200], Some("all ok"), None)), SECOND).await,
        OK,
        "a substring split across chunks is found"
    );
    // Headers at once, the body trickling in over 2 s: too slow.
    let slow = parts_server(
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            b"01234",
            b"56789",
        ],
        Duration::from_millis(1000),
    )
    .await;
    let started = std::time::Instant::now();
    let outcome = once(
        &spec(slow, http(&[200], Some("89"), None)),
        Duration::from_millis(500),
    )
    .await;
    assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_millis(900));
    // Without a body condition the status line is enough.
    assert_eq!(
        once(
            &spec(slow, http(&[200], None, None)),
            Duration::from_millis(500)
        )
        .await,
        OK
    );
}

#[tokio::test]
async fn https_with_any_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["rs.example".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = [0u8; 1024];
                let _ = tls.read(&mut request).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let mut check = http(&[200], Some("secure"), None);
    if let Check::Http { tls, .. } = &mut check {
        *tls = true;
    }
    assert_eq!(once(&spec(port, check.clone()), SECOND).await, OK);
    if let Check::Http { tls_verify, .. } = &mut check {
        *tls_verify = true;
    }
    let Outcome::Failed(why) = once(&spec(port, check), SECOND).await else {
        panic!("a self-signed certificate must fail verification");
    };
    assert!(why.contains("TLS"), "{why}");
}

#[tokio::test]
async fn tcp_send_expect() {
    let redis = server(b"+PONG\r\n", 1, Duration::ZERO).await;
    let check = |expect: &str| Check::Tcp {
        send: Some("PING\r\n".into()),
        expect: Some(expect.into()),
    };
    assert_eq!(once(&spec(redis, check("+PONG")), SECOND).await, OK);
    assert!(matches!(
        once(&spec(redis, check("+OK")), SECOND).await,
        Outcome::Failed(_)
    ));
    // Nothing listening: refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let Outcome::Failed(why) = once(&spec(closed, check("+PONG")), SECOND).await else {
        panic!("a closed port must fail");
    };
    assert!(why.contains("refused"), "{why}");
}

/// Answers A queries for `known` with one record, others with NXDOMAIN.
async fn dns_server(known: &'static str) -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let query = &buf[..n];
            let mut name = Vec::new();
            let mut i = 12;
            while i < n && query[i] != 0 {
                let len = query[i] as usize;
                name.push(String::from_utf8_lossy(&query[i + 1..i + 1 + len]).to_string());
                i += 1 + len;
            }
            let question_end = i + 5;
            let mut answer = query[..question_end].to_vec();
            answer[2] = 0x81;
            if name.join(".") == known {
                answer[3] = 0x80;
                answer[7] = 1; // one answer
                answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
            } else {
                answer[3] = 0x83; // NXDOMAIN
            }
            let _ = socket.send_to(&answer, from).await;
        }
    });
    port
}

#[tokio::test]
async fn dns_query() {
    let port = dns_server("www.example.com").await;
    let check = |name: &str| Check::Dns {
        name: name.into(),
        record: Record::A,
    };
    assert_eq!(
        once(&spec(port, check("www.example.com")), SECOND).await,
        OK
    );
    let Outcome::Failed(why) = once(&spec(port, check("nope.example.com")), SECOND).await else {
        panic!("NXDOMAIN must fail");
    };
    assert!(why.contains("NXDOMAIN"), "{why}");
}

#[tokio::test]
async fn commands_exit_status_weight_and_no_leftovers() {
    let command = |script: &str| Check::Command {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
    };
    assert_eq!(once(&spec(80, command("exit 0")), SECOND).await, OK);
    assert_eq!(
        once(&spec(80, command("echo weight=37")), SECOND).await,
        Outcome::Passed { weight: Some(37) }
    );
    assert_eq!(
        once(&spec(8080, command("test \"$1\" = 8080 && echo 5")), SECOND).await,
        Outcome::Failed("/bin/sh exited with 1".into()),
        "{{port}} is only replaced in arguments"
    );
    assert_eq!(
        once(
            &spec(8080, command("test \"$PROBER_PORT\" = 8080 && echo 5")),
            SECOND
        )
        .await,
        Outcome::Passed { weight: Some(5) }
    );
    let Outcome::Failed(why) = once(&spec(80, command("echo broken >&2; exit 3")), SECOND).await
    else {
        panic!("exit 3 must fail");
    };
    assert_eq!(why, "/bin/sh exited with 3: broken");
    // A hung check and the children it started are killed, not left.
    let marker = format!("prober-hung-check-{}", std::process::id());
    let started = std::time::Instant::now();
    let outcome = once(
        &spec(
            80,
            command(&format!("sleep 30 & exec -a {marker} sleep 31")),
        ),
        Duration::from_millis(500),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Failed(ref why) if why.contains("killed")),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(900));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&marker) || c.starts_with("sleep 30 "))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test]
async fn checker_runs_each_check_at_its_interval_within_the_bound() {
    let port = server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        1,
        Duration::ZERO,
    )
    .await;
    let (checker, mut reports) = Checker::new(1, None);
    let timing = CheckTiming {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(200),
    };
    let a = checker.start(spec(port, http(&[200], None, None)), timing);
    let b = checker.start(spec(port, http(&[500], None, None)), timing);
    let mut passed = 0;
    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while passed < 3 || failed < 3 {
        let report = tokio::time::timeout_at(deadline, reports.recv())
            .await
            .expect("reports keep coming")
            .unwrap();
        match report.outcome {
            Outcome::Passed { .. } => passed += 1,
            Outcome::Failed(_) => failed += 1,
        }
    }
    a.abort();
    b.abort();
}
