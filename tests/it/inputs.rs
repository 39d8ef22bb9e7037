//! URL inputs and the extended input items through the real engine against the simulator: a
//! local file server (an image, large files, a stalling endpoint, redirect chains, redirects to
//! refused addresses), the SSRF guard, the size and time limits, `subfolder`/`type`, masks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use comfy_sim::Simulator;
use comfy_worker::config::Settings;
use comfy_worker::job::{codec, Engine, JobOutput};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{self, error_text, images, run_job};
use crate::worker_process::simulator;

const BIG: usize = 300_000;

/// An 8×8 RGBA PNG.
fn png_bytes(shade: u8) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, 8, 8);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[shade; 8 * 8 * 4]).unwrap();
    }
    out
}

/// The start of an MP4 file (what the signature check looks at) and some payload.
fn mp4_bytes() -> Vec<u8> {
    let mut v = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom".to_vec();
    v.extend(std::iter::repeat_n(7u8, 1000));
    v
}

struct FileServer {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        // Aborted, not shut down gracefully: the stalling endpoint never finishes.
        self.task.abort();
    }
}

#[derive(Clone)]
struct Served {
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    async fn start() -> FileServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let served = Served {
            port: addr.port(),
            hits: hits.clone(),
        };
        let app = Router::new()
            .route("/{*path}", get(serve))
            .with_state(served);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FileServer { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

fn redirect(to: String) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn serve(State(s): State<Served>, Path(path): Path<String>) -> Response {
    s.hits.lock().unwrap().push(format!("/{path}"));
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["image.png"] | ["noext"] | ["dir", "Photo (1).png"] => {
            ([(header::CONTENT_TYPE, "image/png")], png_bytes(200)).into_response()
        }
        ["clip.mp4"] => ([(header::CONTENT_TYPE, "video/mp4")], mp4_bytes()).into_response(),
        ["missing.png"] => StatusCode::NOT_FOUND.into_response(),
        ["empty.png"] => Vec::<u8>::new().into_response(),
        // Announced as large: refused from its Content-Length, before the body.
        ["big.bin"] => vec![1u8; BIG].into_response(),
        // Streamed in chunks without a Content-Length: only counting finds it too large.
        ["stream-big.bin"] => {
            let chunks = futures_util::stream::iter(
                (0..BIG / 10_000).map(|_| Ok::<_, std::io::Error>(vec![2u8; 10_000])),
            );
            Body::from_stream(chunks).into_response()
        }
        // Announces 200 MiB, then sends nothing.
        ["huge.bin"] => {
            let stall = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
            Response::builder()
                .header(header::CONTENT_LENGTH, "209715200")
                .body(Body::from_stream(stall))
                .unwrap()
        }
        // Headers and a first chunk, then a stall.
        ["slow.png"] => {
            let first = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(png_bytes(1)[..20].to_vec())
            });
            let body = first.chain(futures_util::stream::pending());
            Body::from_stream(body).into_response()
        }
        ["r", n] => match n.parse::<u32>() {
            Ok(0) => redirect(format!("http://127.0.0.1:{}/image.png", s.port)),
            Ok(n) => redirect(format!("/r/{}", n - 1)),
            Err(_) => StatusCode::BAD_REQUEST.into_response(),
        },
        ["to-metadata"] => redirect("http://169.254.169.254/latest/meta-data/".into()),
        ["to-localhost"] => redirect(format!("http://localhost:{}/image.png", s.port)),
        ["to-ftp"] => redirect("ftp://example.com/x.png".into()),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// An engine for `sim` whose input settings come from `env` (a lookup map, never the process
/// environment); the rest are the harness's fast test timings.
fn engine(sim: &Simulator, env: &[(&str, &str)]) -> Engine {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let from_env = Settings::from_lookup(|k| map.get(k).cloned()).expect("settings");
    Engine::new(Settings {
        inputs: from_env.inputs,
        ..harness::settings(&sim.host())
    })
    .expect("engine")
}

/// A job running the simulator's plain workflow with these input items.
fn job(items: Value) -> Value {
    json!({"workflow": harness::workflow("ok"), "images": items})
}

fn details(out: &JobOutput) -> Vec<String> {
    out.to_json()["details"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `items` expecting the input failure; returns its details after checking that ComfyUI
/// got nothing.
async fn refused(engine: &Engine, sim: &Simulator, items: Value) -> Vec<String> {
    let (out, _) = run_job(engine, job(items)).await;
    assert_eq!(
        error_text(&out),
        "Failed to upload one or more input images",
        "{}",
        out.to_json()
    );
    assert!(sim.uploads().is_empty(), "uploaded: {:?}", sim.uploads());
    assert!(sim.prompts().is_empty(), "a prompt was queued");
    details(&out)
}

const HINT: &str = "(set ALLOW_PRIVATE_INPUT_URLS=true to allow it)";

#[tokio::test]
async fn a_url_input_is_downloaded_only_when_private_addresses_are_allowed() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let url = files.url("/image.png");

    // Without the opt-in, the local server is refused before any connection.
    let guarded = engine(&sim, &[]);
    let problems = refused(&guarded, &sim, json!([{"name": "input.png", "image": url}])).await;
    assert_eq!(
        problems,
        [format!(
            "Error downloading input.png from {url}: refused: 127.0.0.1 is a loopback address {HINT}"
        )]
    );
    assert!(files.hits().is_empty(), "the server was contacted");

    // With it, the bytes ComfyUI stores are the served file's.
    let open = engine(&sim, &[("ALLOW_PRIVATE_INPUT_URLS", "true")]);
    let (out, _) = run_job(&open, job(json!([{"name": "input.png", "image": url}]))).await;
    assert_eq!(images(&out).len(), 2, "{}", out.to_json());
    assert_eq!(sim.input_file("", "input.png"), Some(png_bytes(200)));
    assert_eq!(files.hits(), ["/image.png"]);

    // Without a name, the URL's last segment, made safe, names the file; a name without an
    // extension gets the one of the file's type.
    let items = json!([
        {"image": files.url("/dir/Photo%20(1).png?token=secret")},
        {"image": files.url("/noext")},
    ]);
    let (out, _) = run_job(&open, job(items)).await;
    assert!(!out.is_error(), "{}", out.to_json());
    assert_eq!(sim.input_file("", "Photo_1.png"), Some(png_bytes(200)));
    assert_eq!(sim.input_file("", "noext.png"), Some(png_bytes(200)));

    // A host in INPUT_URL_ALLOW_HOSTS is allowed without opening the private network.
    let listed = engine(&sim, &[("INPUT_URL_ALLOW_HOSTS", "127.0.0.1")]);
    let (out, _) = run_job(&listed, job(json!([{"name": "listed.png", "image": url}]))).await;
    assert!(!out.is_error(), "{}", out.to_json());
    assert_eq!(sim.input_file("", "listed.png"), Some(png_bytes(200)));
}

#[tokio::test]
async fn the_guard_refuses_private_targets_and_local_names() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let port = files.addr.port();
    let guarded = engine(&sim, &[]);
    let items = json!([
        {"name": "a.png", "image": format!("http://127.0.0.1:{port}/image.png")},
        {"name": "b.png", "image": "http://10.0.0.1/b.png"},
        {"name": "c.png", "image": "http://169.254.169.254/latest/meta-data/"},
        {"name": "d.png", "image": format!("http://localhost:{port}/image.png")},
        {"name": "e.png", "image": format!("http://[::1]:{port}/image.png")},
        {"name": "f.png", "image": format!("http://2130706433:{port}/image.png")},
        {"name": "g.png", "image": "https://192.168.1.10/x.png?X-Amz-Signature=abc"},
    ]);
    let problems = refused(&guarded, &sim, items).await;
    assert_eq!(
        problems,
        [
            format!("Error downloading a.png from http://127.0.0.1:{port}/image.png: refused: 127.0.0.1 is a loopback address {HINT}"),
            format!("Error downloading b.png from http://10.0.0.1/b.png: refused: 10.0.0.1 is a private address {HINT}"),
            format!("Error downloading c.png from http://169.254.169.254/latest/meta-data/: refused: 169.254.169.254 is a link-local address (the cloud metadata service) {HINT}"),
            format!("Error downloading d.png from http://localhost:{port}/image.png: refused: localhost is a local host name {HINT}"),
            format!("Error downloading e.png from http://[::1]:{port}/image.png: refused: ::1 is a loopback address {HINT}"),
            format!("Error downloading f.png from http://127.0.0.1:{port}/image.png: refused: 127.0.0.1 is a loopback address {HINT}"),
            // The query (a signature, a token) is never repeated.
            format!("Error downloading g.png from https://192.168.1.10/x.png?…: refused: 192.168.1.10 is a private address {HINT}"),
        ]
    );
    assert!(files.hits().is_empty(), "the server was contacted");
}

/// A name that is not a local name but resolves to loopback through the system resolver (the
/// machine's own host name, when `/etc/hosts` maps it so): refused after resolution. Skipped where
/// the host name resolves to a public address or not at all; the resolver filter itself is
/// unit-tested with a fake resolution in `net.rs`.
#[tokio::test]
async fn a_host_name_resolving_to_loopback_is_refused_after_resolution() {
    let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") else {
        eprintln!("skipped: no /proc/sys/kernel/hostname");
        return;
    };
    let name = name.trim().to_owned();
    if name.is_empty() || comfy_worker::ssrf::local_name(&name).is_some() {
        eprintln!("skipped: host name {name:?} is a local name");
        return;
    }
    let Ok(addrs) = tokio::net::lookup_host((name.as_str(), 80)).await else {
        eprintln!("skipped: host name {name:?} does not resolve");
        return;
    };
    let addrs: Vec<SocketAddr> = addrs.collect();
    let Some(first) = addrs.first() else {
        eprintln!("skipped: host name {name:?} resolves to nothing");
        return;
    };
    if comfy_worker::ssrf::refusal(first.ip()).is_none() {
        eprintln!("skipped: host name {name:?} resolves to a public address");
        return;
    }
    let sim = simulator(1).await;
    let problems = refused(
        &engine(&sim, &[]),
        &sim,
        json!([{"name": "a.png", "image": format!("http://{name}/a.png")}]),
    )
    .await;
    assert!(
        problems[0].contains(&format!("refused: {name} resolves to ")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn redirects_are_followed_and_each_target_checked_again() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let port = files.addr.port();
    // The file server is allowed by name; everything else is guarded.
    let engine = engine(&sim, &[("INPUT_URL_ALLOW_HOSTS", "127.0.0.1")]);

    let (out, _) = run_job(
        &engine,
        job(json!([{"name": "chain.png", "image": files.url("/r/4")}])),
    )
    .await;
    assert!(!out.is_error(), "{}", out.to_json());
    assert_eq!(sim.input_file("", "chain.png"), Some(png_bytes(200)));
    assert_eq!(
        files.hits(),
        ["/r/4", "/r/3", "/r/2", "/r/1", "/r/0", "/image.png"]
    );

    let sim = simulator(1).await;
    let engine = self::engine(&sim, &[("INPUT_URL_ALLOW_HOSTS", "127.0.0.1")]);
    let items = json!([
        {"name": "long.png", "image": files.url("/r/5")},
        {"name": "meta.png", "image": files.url("/to-metadata")},
        {"name": "local.png", "image": files.url("/to-localhost")},
        {"name": "ftp.png", "image": files.url("/to-ftp")},
    ]);
    let problems = refused(&engine, &sim, items).await;
    assert_eq!(
        problems,
        [
            format!("Error downloading long.png from http://127.0.0.1:{port}/r/5: more than 5 redirects"),
            format!("Error downloading meta.png from http://127.0.0.1:{port}/to-metadata: redirect to http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is a link-local address (the cloud metadata service) {HINT}"),
            format!("Error downloading local.png from http://127.0.0.1:{port}/to-localhost: redirect to http://localhost:{port}/image.png refused: localhost is a local host name {HINT}"),
            format!("Error downloading ftp.png from http://127.0.0.1:{port}/to-ftp: invalid redirect to ftp://example.com/x.png: the scheme must be http or https, not \"ftp\""),
        ]
    );
}

#[tokio::test]
async fn oversized_slow_missing_and_empty_downloads_fail_clearly() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let port = files.addr.port();
    let small = engine(
        &sim,
        &[
            ("ALLOW_PRIVATE_INPUT_URLS", "true"),
            ("INPUT_URL_MAX_BYTES", "100000"),
            ("INPUT_URL_TIMEOUT_S", "1"),
        ],
    );
    let started = Instant::now();
    let items = json!([
        {"name": "big.bin", "image": files.url("/big.bin")},
        {"name": "stream.bin", "image": files.url("/stream-big.bin")},
        {"name": "slow.png", "image": files.url("/slow.png")},
        {"name": "missing.png", "image": files.url("/missing.png")},
        {"name": "empty.png", "image": files.url("/empty.png")},
    ]);
    let problems = refused(&small, &sim, items).await;
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        problems,
        [
            format!("Error downloading big.bin from {base}/big.bin: the server announces {BIG} bytes, larger than INPUT_URL_MAX_BYTES (100000 bytes)"),
            format!("Error downloading stream.bin from {base}/stream-big.bin: the file is larger than INPUT_URL_MAX_BYTES (100000 bytes)"),
            format!("Error downloading slow.png from {base}/slow.png: timed out after 1 s (INPUT_URL_TIMEOUT_S)"),
            format!("Error downloading missing.png from {base}/missing.png: the server answered HTTP 404 Not Found"),
            format!("Error downloading empty.png from {base}/empty.png: the file is empty"),
        ]
    );
    // Downloads run side by side: the stall bounds the whole list, not each file in turn.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // The default limit, from a Content-Length announced before a body that never comes.
    let default = engine(&sim, &[("ALLOW_PRIVATE_INPUT_URLS", "true")]);
    let problems = refused(
        &default,
        &sim,
        json!([{"name": "input.png", "image": files.url("/huge.bin")}]),
    )
    .await;
    assert_eq!(
        problems,
        [format!("Error downloading input.png from {base}/huge.bin: the server announces 209715200 bytes, larger than INPUT_URL_MAX_BYTES (104857600 bytes)")]
    );
}

#[tokio::test]
async fn one_bad_url_fails_the_job_before_anything_is_uploaded() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let open = engine(&sim, &[("ALLOW_PRIVATE_INPUT_URLS", "true")]);
    let items = json!([
        {"name": "good.png", "image": files.url("/image.png")},
        {"name": "inline.png", "image": codec::encode(&png_bytes(5))},
        {"name": "bad.png", "image": files.url("/missing.png")},
        {"name": "later.png", "image": "s3://bucket/later.png"},
    ]);
    let problems = refused(&open, &sim, items).await;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("bad.png") && problems[0].contains("HTTP 404"));
    assert_eq!(
        problems[1],
        "Error downloading later.png from s3://bucket/later.png: no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config"
    );
    assert!(files.hits().contains(&"/image.png".to_owned()));
    assert_eq!(sim.input_file("", "good.png"), None);
}

#[tokio::test]
async fn subfolder_type_and_masks_reach_the_right_place() {
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let open = engine(&sim, &[("ALLOW_PRIVATE_INPUT_URLS", "true")]);
    let mask = png_bytes(9);
    // `files` is the alias of `images`.
    let input = json!({"workflow": harness::workflow("ok"), "files": [
        {"name": "photo.png", "image": files.url("/image.png"), "subfolder": "job-7/in/"},
        {"image": files.url("/clip.mp4"), "type": "temp", "subfolder": "clips"},
        {"name": "mask.png", "image": format!("data:image/png;base64,{}", codec::encode(&mask)),
         "kind": "mask", "original_ref": {"filename": "photo.png", "subfolder": "job-7/in"}},
        // A data URI whose media type contradicts the bytes is accepted (the bytes win).
        {"name": "voice", "image": format!("data:image/jpeg;base64,{}", codec::encode(b"RIFF\0\0\0\0WAVEfmt "))},
    ]});
    let (out, _) = run_job(&open, input).await;
    assert_eq!(images(&out).len(), 2, "{}", out.to_json());

    assert_eq!(
        sim.input_file("job-7/in", "photo.png"),
        Some(png_bytes(200))
    );
    assert_eq!(sim.input_file("", "photo.png"), None);
    assert_eq!(sim.input_file("", "mask.png"), Some(mask));
    // The temp file is where `/view` looks for it.
    let view = reqwest::Client::new()
        .get(format!("http://{}/view", sim.host()))
        .query(&[
            ("filename", "clip.mp4"),
            ("subfolder", "clips"),
            ("type", "temp"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.bytes().await.unwrap().to_vec(), mp4_bytes());

    let uploads = sim.uploads();
    let summary: Vec<(&str, &str, &str, &str, Option<&str>)> = uploads
        .iter()
        .map(|u| {
            (
                u.endpoint,
                u.name.as_str(),
                u.subfolder.as_str(),
                u.folder_type.as_str(),
                u.content_type.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "/upload/image",
                "photo.png",
                "job-7/in",
                "input",
                Some("image/png")
            ),
            (
                "/upload/image",
                "clip.mp4",
                "clips",
                "temp",
                Some("video/mp4")
            ),
            ("/upload/mask", "mask.png", "", "input", Some("image/png")),
            ("/upload/image", "voice", "", "input", Some("audio/wav")),
        ]
    );
    let original: Value =
        serde_json::from_str(uploads[2].original_ref.as_deref().unwrap()).unwrap();
    assert_eq!(
        original,
        json!({"filename": "photo.png", "subfolder": "job-7/in", "type": "input"})
    );
    assert!(uploads[0].original_ref.is_none());
}

/// Every way a URL input can fail, each URL carrying a token in its query: the token reaches
/// no error or detail of the job (the HTTP client's own errors name the URL, query and all).
#[tokio::test]
async fn no_url_query_reaches_any_error() {
    const TOKEN: &str = "QUERYSECRET7781";
    let files = FileServer::start().await;
    let sim = simulator(1).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let secret = |url: String| format!("{url}?token={TOKEN}&X-Amz-Signature={TOKEN}");
    let open = engine(
        &sim,
        &[
            ("ALLOW_PRIVATE_INPUT_URLS", "true"),
            ("INPUT_URL_MAX_BYTES", "100000"),
            ("INPUT_URL_TIMEOUT_S", "1"),
        ],
    );
    let guarded = engine(&sim, &[("INPUT_URL_TIMEOUT_S", "1")]);
    let failing = [
        "/big.bin",
        "/stream-big.bin",
        "/slow.png",
        "/missing.png",
        "/empty.png",
        "/to-metadata",
        "/to-ftp",
        "/r/9",
    ];
    let mut items: Vec<Value> = failing
        .iter()
        .enumerate()
        .map(|(i, path)| json!({"name": format!("f{i}.png"), "image": secret(files.url(path))}))
        .collect();
    // Connection refused: the HTTP client's error names the URL.
    items.push(json!({"name": "refused.png", "image": secret(format!("http://127.0.0.1:{closed_port}/x.png"))}));
    let mut outputs = Vec::new();
    for item in items {
        let (out, _) = run_job(&open, job(json!([item]))).await;
        outputs.push(out.to_json());
    }
    // Refused by the guard before any connection, and a name that does not resolve.
    for url in [
        secret(files.url("/image.png")),
        secret("http://no-such-host.example.invalid/x.png".into()),
    ] {
        let (out, _) = run_job(&guarded, job(json!([{"name": "g.png", "image": url}]))).await;
        outputs.push(out.to_json());
    }
    for out in &outputs {
        let text = out.to_string();
        assert!(out["error"].is_string(), "every case fails: {text}");
        assert!(!text.contains(TOKEN), "the query leaked: {text}");
    }
    // The URLs are still named, up to their path.
    assert!(
        outputs.iter().any(|o| o
            .to_string()
            .contains(&format!("http://127.0.0.1:{closed_port}/x.png?…"))),
        "{outputs:?}"
    );
}
