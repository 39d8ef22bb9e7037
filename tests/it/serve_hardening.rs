//! The local endpoint against slow, half-open and cross-site clients (issue: "a local endpoint no
//! web page can drive"): every connection is bounded by the header and body timeouts and the
//! connection cap, shutdown never waits on a half-open connection, and without an API key only
//! direct JSON requests from this endpoint's own origin are taken.

use std::time::{Duration, Instant};

use comfy_sim::Simulator;
use comfy_worker::endpoint::{self, ConnectionLimits, ServeOptions};
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, LIMIT};
use crate::worker_process::simulator;

struct Served {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    _sim: Simulator,
}

async fn serve(options: ServeOptions) -> Served {
    let sim = simulator(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(endpoint::serve(
        listener,
        harness::engine(&sim.host()),
        Webhooks::new(WebhookPolicy::default()),
        options,
        shutdown.clone(),
    ));
    Served {
        addr,
        shutdown,
        server,
        _sim: sim,
    }
}

fn with_limits(header_ms: u64, body_ms: u64, max_connections: usize) -> ServeOptions {
    ServeOptions {
        limits: ConnectionLimits {
            header_timeout: Duration::from_millis(header_ms),
            body_timeout: Duration::from_millis(body_ms),
            max_connections,
        },
        ..ServeOptions::default()
    }
}

/// Everything the server sends until it closes the connection, within [`LIMIT`].
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut got))
        .await
        .expect("the server closed the connection in time")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_half_sent_request_is_closed_within_the_header_timeout() {
    let s = serve(with_limits(300, 30_000, 64)).await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let reply = read_to_close(&mut stream).await;
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply}"
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let s = serve(with_limits(300, 30_000, 64)).await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let request = format!("GET /openapi.json HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    stream.write_all(request.as_bytes()).await.unwrap();
    // The reply comes, then nothing more is asked: the connection is closed.
    let reply = read_to_close(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_half_open_connection() {
    let s = serve(with_limits(60_000, 60_000, 64)).await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(b"POST /run HTTP/1.1\r\nHo").await.unwrap();
    // Let the server take the connection before it is told to stop.
    let request = format!(
        "GET /openapi.json HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr
    );
    let mut probe = TcpStream::connect(s.addr).await.unwrap();
    probe.write_all(request.as_bytes()).await.unwrap();
    assert!(read_to_close(&mut probe).await.starts_with("HTTP/1.1 200"));
    let asked = Instant::now();
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.server)
        .await
        .expect("the endpoint stopped without waiting for the half-open connection")
        .unwrap()
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    drop(stream);
}

#[tokio::test]
async fn a_huge_announced_body_is_refused_at_once_and_a_stalled_one_times_out() {
    let s = serve(with_limits(10_000, 300, 64)).await;
    let head = |len: u64| {
        format!(
            "POST /run HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{{",
            s.addr
        )
    };
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(head(1_000_000_000_000).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(LIMIT, stream.read(&mut buf))
        .await
        .expect("an answer without waiting for the body")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(head(100).as_bytes()).await.unwrap();
    let n = tokio::time::timeout(LIMIT, stream.read(&mut buf))
        .await
        .expect("an answer once the body stopped arriving")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let s = serve(with_limits(400, 30_000, 2)).await;
    // Two connections that never finish their headers hold both slots...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /").await.unwrap();
        held.push(c);
    }
    // ...until the header timeout frees them; a third is served then.
    let started = Instant::now();
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    let request = format!(
        "GET /openapi.json HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr
    );
    third.write_all(request.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut third).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// `POST /run` as a browser page or a script would send it.
async fn post_run(s: &Served, host: Option<&str>, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut request = format!(
        "POST /run HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    request.push_str(&format!(
        "Host: {}\r\n",
        host.map_or(s.addr.to_string(), str::to_owned)
    ));
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut stream).await;
    reply
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply}"))
}

#[tokio::test]
async fn a_keyless_endpoint_cannot_be_driven_cross_site() {
    let s = serve(ServeOptions {
        cors_origins: vec!["https://app.example".into()],
        ..ServeOptions::default()
    })
    .await;
    let job = json!({"input": {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}}}).to_string();
    let own = format!("http://{}", s.addr);
    let json_type = ("Content-Type", "application/json");
    // A form or text/plain from another site: no preflight, so the endpoint must refuse.
    assert_eq!(
        post_run(
            &s,
            None,
            &[
                ("Origin", "https://evil.example"),
                ("Content-Type", "text/plain")
            ],
            &job
        )
        .await,
        403
    );
    assert_eq!(
        post_run(
            &s,
            None,
            &[("Origin", "https://evil.example"), json_type],
            &job
        )
        .await,
        403
    );
    assert_eq!(
        post_run(
            &s,
            None,
            &[("Sec-Fetch-Site", "cross-site"), json_type],
            &job
        )
        .await,
        403
    );
    assert_eq!(
        post_run(&s, None, &[("Content-Type", "text/plain")], &job).await,
        415
    );
    // DNS rebinding: the page's own name, pointed at 127.0.0.1.
    assert_eq!(
        post_run(&s, Some("evil.example"), &[json_type], &job).await,
        403
    );
    // The endpoint's own page, a listed origin and a script still work.
    assert_eq!(
        post_run(&s, None, &[("Origin", own.as_str()), json_type], &job).await,
        200
    );
    assert_eq!(
        post_run(
            &s,
            None,
            &[("Origin", "https://app.example"), json_type],
            &job
        )
        .await,
        200
    );
    assert_eq!(post_run(&s, None, &[json_type], &job).await, 200);
    assert_eq!(
        post_run(
            &s,
            Some(&format!("localhost:{}", s.addr.port())),
            &[json_type],
            &job
        )
        .await,
        200
    );
    // /purge-queue from another site is refused too.
    let request = format!("POST /purge-queue HTTP/1.1\r\nHost: {}\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", s.addr);
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    assert!(read_to_close(&mut stream).await.starts_with("HTTP/1.1 403"));
    // A listed origin gets its preflight answered.
    let preflight = format!("OPTIONS /run HTTP/1.1\r\nHost: {}\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n", s.addr);
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(preflight.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut stream).await.to_ascii_lowercase();
    assert!(
        reply.contains("access-control-allow-origin: https://app.example"),
        "{reply}"
    );
}
