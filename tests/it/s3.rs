//! S3 outputs and `s3://` inputs against a real S3-compatible server: `s3s-fs` (installed by
//! `scripts/test` into `target/test-deps/bin`), which stores objects as files and verifies every
//! request's SigV4 signature, in headers and in presigned query strings. Each test starts its own
//! server on a free loopback port with a temporary directory.
//!
//! Covered: `auto` uploads the largest outputs and keeps small ones inline, the presigned URL
//! serves the bytes ComfyUI stored (and stops working when tampered with), `always` for every
//! file kind (videos with `format`/`frame_rate`, audio, other keys; text stays inline),
//! multipart uploads, a wrong secret as an `errors` entry, a job's `s3Config` replacing the env
//! bucket (serverless top level, local endpoint top level, inside `input`), the SSRF guard on a
//! job's endpoint (refused on loopback unless `ALLOW_PRIVATE_S3_ENDPOINTS`; the test server is on
//! loopback, so every `s3Config` test opts in), `s3://` inputs from the env bucket and from a
//! job's `s3Config` (and their errors: no bucket, another bucket, no such key, too large), and an
//! over-limit output without a bucket failing fast with the explanation; the serverless cases run
//! the real binary against the fake platform.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use comfy_sim::{SimConfig, Simulator};
use comfy_worker::config::{BucketSettings, InputPolicy, StorageSettings, UploadMode};
use comfy_worker::endpoint::{self, ServeOptions};
use comfy_worker::job::{CollectedFile, Engine, JobOutput, OutputKind, Storage};
use comfy_worker::secret::Secret;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::harness::{self, png_size, LIMIT};
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

const ACCESS: &str = "comfy-test-access";
const SECRET: &str = "comfy-test-secret-4f9b2c71";
const BUCKET: &str = "outputs";

/// The s3s-fs binary: `COMFY_WORKER_TEST_S3S_FS`, else where `scripts/test` installs it.
fn s3s_fs() -> PathBuf {
    let path = std::env::var_os("COMFY_WORKER_TEST_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/bin/s3s-fs")
        });
    assert!(
        path.exists(),
        "no S3 test server at {}: run the suite with scripts/test, which installs it \
         (cargo install --locked --root target/test-deps s3s-fs)",
        path.display()
    );
    path
}

/// A running s3s-fs with one access key and the given buckets; killed when dropped.
struct S3Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl S3Server {
    fn start(access: &str, secret: &str, buckets: &[&str]) -> S3Server {
        let bin = s3s_fs();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).unwrap();
        }
        // s3s-fs takes a port number; a port just freed by the OS is almost always still free,
        // and a start that fails is retried on another one.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", access, "--secret-key", secret])
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("s3s.log")).unwrap())
                .spawn()
                .expect("start s3s-fs");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return S3Server { child, port, dir };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "s3s-fs did not start; log:\n{}",
            std::fs::read_to_string(dir.path().join("s3s.log")).unwrap_or_default()
        );
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The stored object (s3s-fs keeps `<bucket>/<key>` as a file).
    fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.path().join("data").join(bucket).join(key)).ok()
    }

    /// Every stored object key of `bucket` (s3s-fs's own metadata files left out).
    fn keys(&self, bucket: &str) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    let rel = path
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    if !rel.starts_with('.') && !rel.contains("/.") {
                        out.push(rel);
                    }
                }
            }
        }
        let base = self.dir.path().join("data").join(bucket);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// The env settings for this server's bucket (path style, as with MinIO).
    fn env(&self, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("BUCKET_ENDPOINT_URL", self.endpoint()),
            ("BUCKET_ACCESS_KEY_ID", ACCESS.to_owned()),
            ("BUCKET_SECRET_ACCESS_KEY", secret.to_owned()),
            ("BUCKET_NAME", BUCKET.to_owned()),
        ]
    }

    fn bucket(&self, secret: &str) -> BucketSettings {
        BucketSettings {
            endpoint_url: self.endpoint(),
            access_key_id: ACCESS.into(),
            secret_access_key: Secret::new(secret),
            bucket_name: Some(BUCKET.into()),
            region: None,
        }
    }

    /// A job's `s3Config` for this server's `bucket`.
    fn s3_config(&self, access: &str, secret: &str, bucket: &str) -> Value {
        json!({
            "accessId": access,
            "accessSecret": secret,
            "bucketName": bucket,
            "endpointUrl": self.endpoint(),
        })
    }

    /// Stores an object through the S3 API (signed requests, as a client would).
    async fn put(&self, access: &str, secret: &str, bucket: &str, key: &str, bytes: Vec<u8>) {
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id(access)
            .with_secret_access_key(secret)
            .with_allow_http(true)
            .build()
            .unwrap();
        tokio::time::timeout(
            LIMIT,
            store.put(
                &object_store::path::Path::from(key),
                PutPayload::from(bytes),
            ),
        )
        .await
        .expect("put in time")
        .expect("put");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s.log")).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- s3s-fs log ---\n{}", self.log());
        }
    }
}

/// The simulator writing incompressible (noise) PNGs: `ok.json` then saves ~1 MB at 512x512
/// and ~260 KB at 256x256.
async fn noise_simulator() -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(5),
            noise_images: true,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Between the two outputs' base64 sizes together (~1.7 MB) and the small one's (~0.35 MB).
const SMALL_LIMIT: u64 = 600_000;

fn engine(sim: &Simulator, storage: StorageSettings) -> Engine {
    engine_with_inputs(sim, storage, InputPolicy::default())
}

fn engine_with_inputs(sim: &Simulator, storage: StorageSettings, inputs: InputPolicy) -> Engine {
    let mut settings = harness::settings(&sim.host());
    settings.storage = storage;
    settings.inputs = inputs;
    Engine::new(settings).unwrap()
}

/// Storage settings whose jobs may use a loopback `s3Config` endpoint (the test server's).
fn private_ok() -> StorageSettings {
    StorageSettings {
        allow_private_endpoints: true,
        ..StorageSettings::default()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// GET a URL: status and body.
async fn get(url: &str) -> (u16, Bytes) {
    let resp = tokio::time::timeout(LIMIT, http().get(url).send())
        .await
        .expect("no reply in time")
        .expect("request failed");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap())
}

/// What ComfyUI (the simulator) stored for an output file.
async fn stored_by_comfy(sim: &Simulator, filename: &str) -> Bytes {
    let url = format!(
        "http://{}/view?filename={filename}&subfolder=&type=output",
        sim.host()
    );
    let (status, body) = get(&url).await;
    assert_eq!(status, 200, "/view {filename}");
    body
}

/// The output's entries, by kind.
fn entries(output: &Value) -> (Vec<Value>, Vec<Value>) {
    let images = output["images"].as_array().expect("images").clone();
    images.into_iter().partition(|i| i["type"] == "s3_url")
}

/// Checks an `s3_url` entry: the key, the content type, the presigned URL serving exactly the
/// bytes ComfyUI stored, and the signature being checked (tampered URLs are refused).
async fn check_uploaded(sim: &Simulator, s3: &S3Server, entry: &Value, key_prefix: &str) {
    let filename = entry["filename"].as_str().unwrap();
    assert_eq!(entry["content_type"], "image/png", "{entry}");
    let url = entry["data"].as_str().unwrap();
    let parsed = url::Url::parse(url).unwrap();
    assert_eq!(
        parsed.path(),
        format!("/{BUCKET}/{key_prefix}{filename}"),
        "key is {{prefix}}/{{job_id}}/{{filename}}"
    );
    let query: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
    assert_eq!(query["X-Amz-Expires"], "604800", "default expiry: 7 days");
    assert!(!url.contains(SECRET));

    let expected = stored_by_comfy(sim, filename).await;
    let (status, body) = get(url).await;
    assert_eq!(
        status,
        200,
        "presigned GET: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(body == expected, "the URL serves the bytes ComfyUI stored");
    assert_eq!(
        s3.object(BUCKET, &format!("{key_prefix}{filename}"))
            .as_deref(),
        Some(&expected[..])
    );

    // The server checks the presigned signature: a changed signature, a changed key or no
    // signature at all is refused.
    let sig = &query["X-Amz-Signature"];
    let flipped = if sig.ends_with('0') { "1" } else { "0" };
    let tampered = url.replace(sig.as_str(), &format!("{}{flipped}", &sig[..sig.len() - 1]));
    assert_eq!(get(&tampered).await.0, 403, "tampered signature accepted");
    let other_key = url.replacen(filename, "other.png", 1);
    assert_eq!(
        get(&other_key).await.0,
        403,
        "signature reused for another key"
    );
    let bare = format!("{}{}", s3.endpoint(), parsed.path());
    assert_eq!(get(&bare).await.0, 403, "unsigned GET accepted");
}

#[tokio::test]
async fn auto_uploads_the_largest_output_and_keeps_the_small_one_inline() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let sim = noise_simulator().await;
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            max_inline_bytes: Some(SMALL_LIMIT),
            prefix: "runs".into(),
            ..StorageSettings::default()
        },
    );
    let (out, _) = harness::run_job(&engine, job_input(1, 2)).await;
    let out = out.to_json();
    assert!(out.get("errors").is_none(), "{out}");
    let (uploaded, inline) = entries(&out);
    assert_eq!(uploaded.len(), 1, "{out}");
    assert_eq!(inline.len(), 1, "{out}");
    assert!(uploaded[0]["filename"]
        .as_str()
        .unwrap()
        .starts_with("anchors_ok_full"));
    check_uploaded(&sim, &s3, &uploaded[0], "runs/test-job/").await;
    assert_eq!(png_size(inline[0]["data"].as_str().unwrap()), (256, 256));
    assert_eq!(inline[0]["content_type"], "image/png");

    // An output that fits stays inline entirely and nothing is uploaded.
    let roomy = engine_with_limit(&sim, &s3, 10_000_000);
    let (out, _) = harness::run_job(&roomy, job_input(2, 2)).await;
    let (uploaded, inline) = entries(&out.to_json());
    assert_eq!((uploaded.len(), inline.len()), (0, 2));
    assert_eq!(s3.keys(BUCKET).len(), 1);
}

fn engine_with_limit(sim: &Simulator, s3: &S3Server, limit: u64) -> Engine {
    engine(
        sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            max_inline_bytes: Some(limit),
            ..StorageSettings::default()
        },
    )
}

#[tokio::test]
async fn always_uploads_every_output() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let sim = noise_simulator().await;
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            mode: UploadMode::Always,
            url_expiry: Duration::from_secs(3600),
            ..StorageSettings::default()
        },
    );
    let (out, _) = harness::run_job(&engine, job_input(3, 2)).await;
    let out = out.to_json();
    let (uploaded, inline) = entries(&out);
    assert_eq!((uploaded.len(), inline.len()), (2, 0), "{out}");
    for entry in &uploaded {
        let url = url::Url::parse(entry["data"].as_str().unwrap()).unwrap();
        assert!(url.query().unwrap().contains("X-Amz-Expires=3600"));
        let (status, body) = get(url.as_str()).await;
        assert_eq!(status, 200);
        let filename = entry["filename"].as_str().unwrap();
        assert!(body == stored_by_comfy(&sim, filename).await);
    }
    assert_eq!(s3.keys(BUCKET).len(), 2);
}

#[tokio::test]
async fn large_files_go_up_in_parts() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let storage = Storage::new(StorageSettings {
        bucket: Some(s3.bucket(SECRET)),
        mode: UploadMode::Always,
        multipart_threshold: 6 * 1024 * 1024,
        part_size: 5 * 1024 * 1024,
        ..StorageSettings::default()
    });
    // 12 MiB of xorshift noise: three parts (5 + 5 + 2 MiB), and a small file in one PUT.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: Vec<u8> = (0..12 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let files = vec![
        CollectedFile::new(OutputKind::Videos, "clip.mp4", Bytes::from(big.clone())),
        CollectedFile::new(
            OutputKind::Images,
            "still.webp",
            Bytes::from_static(b"RIFF....WEBP"),
        ),
    ];
    let job = storage.for_job("job-mp", None).await.unwrap();
    let placed = tokio::time::timeout(LIMIT, job.place(files, 0))
        .await
        .expect("upload in time")
        .unwrap();
    let video = placed[0].as_ref().expect("uploaded");
    assert_eq!(video.kind, "s3_url");
    assert_eq!(video.content_type, "video/mp4");
    let (status, body) = get(video.data.as_text().unwrap()).await;
    assert_eq!(status, 200);
    assert!(body[..] == big[..], "multipart object reassembled");
    let still = placed[1].as_ref().expect("uploaded");
    assert_eq!(still.content_type, "image/webp");
    assert_eq!(
        get(still.data.as_text().unwrap()).await.1,
        Bytes::from_static(b"RIFF....WEBP")
    );
    assert_eq!(s3.keys(BUCKET), ["job-mp/clip.mp4", "job-mp/still.webp"]);
}

#[tokio::test]
async fn a_wrong_secret_is_an_errors_entry_and_small_outputs_still_return() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let sim = noise_simulator().await;
    let wrong = "not-the-secret-7d1e";
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(wrong)),
            max_inline_bytes: Some(SMALL_LIMIT),
            ..StorageSettings::default()
        },
    );
    let started = Instant::now();
    let (out, _) = harness::run_job(&engine, job_input(4, 2)).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no retry storm on a 403"
    );
    let out = out.to_json();
    let errors = out["errors"].as_array().expect("errors").clone();
    assert_eq!(errors.len(), 1, "{out}");
    let error = errors[0].as_str().unwrap();
    assert!(
        error.starts_with("Error uploading anchors_ok_full_") && error.contains(".png to S3: "),
        "{error}"
    );
    assert!(
        error.contains("403") && error.contains("SignatureDoesNotMatch"),
        "{error}"
    );
    assert!(
        error.ends_with("(check the bucket's access key id, secret and region)"),
        "{error}"
    );
    assert!(!error.contains(wrong) && !error.contains(SECRET), "{error}");
    let (uploaded, inline) = entries(&out);
    assert_eq!((uploaded.len(), inline.len()), (0, 1), "{out}");
    assert!(s3.keys(BUCKET).is_empty());
}

#[tokio::test]
async fn a_jobs_s3_config_in_input_replaces_the_env_bucket() {
    harness::init_logs();
    let env_s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let job_s3 = S3Server::start("job-access", "job-secret-93ac", &["job-bucket"]);
    let sim = noise_simulator().await;
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(env_s3.bucket(SECRET)),
            mode: UploadMode::Always,
            ..private_ok()
        },
    );
    let mut input = job_input(5, 2);
    input["s3Config"] = json!({
        "accessId": "job-access",
        "accessSecret": "job-secret-93ac",
        "bucketName": "job-bucket",
        "endpointUrl": job_s3.endpoint(),
    });
    let (out, _) = harness::run_job(&engine, input).await;
    let out = out.to_json();
    let (uploaded, _) = entries(&out);
    assert_eq!(uploaded.len(), 2, "{out}");
    for entry in &uploaded {
        let url = entry["data"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/job-bucket/test-job/", job_s3.endpoint())));
        assert_eq!(get(url).await.0, 200);
    }
    assert_eq!(job_s3.keys("job-bucket").len(), 2);
    assert!(env_s3.keys(BUCKET).is_empty(), "the env bucket is not used");

    // An s3Config that cannot work fails the job before it runs, with a clear message.
    let mut input = job_input(6, 2);
    input["s3Config"] = json!({"accessId": "a", "endpointUrl": job_s3.endpoint()});
    let (out, _) = harness::run_job(&engine, input).await;
    let msg = out.error_message().expect("an error").to_owned();
    assert!(
        msg.starts_with("Invalid s3Config: 'accessSecret' must be"),
        "{msg}"
    );
    assert!(sim.prompts().len() == 1, "the workflow did not run");
}

#[tokio::test]
async fn without_a_bucket_an_over_limit_output_fails_with_the_fix() {
    harness::init_logs();
    let sim = noise_simulator().await;
    let engine = engine(
        &sim,
        StorageSettings {
            max_inline_bytes: Some(SMALL_LIMIT),
            ..StorageSettings::default()
        },
    );
    let (out, _) = harness::run_job(&engine, job_input(7, 2)).await;
    let JobOutput::Failed { error, details } = &out else {
        panic!("expected a failure: {}", out.to_json());
    };
    assert!(details.is_none());
    check_size_message(error);
    assert!(error.ends_with("set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config) to return large outputs as URLs"), "{error}");
}

/// `The job output is <size> MB as base64, over the 0.6 MB …`, the size being both outputs'
/// (about 1.7 MB).
fn check_size_message(error: &str) {
    let size = error
        .strip_prefix("The job output is ")
        .and_then(|rest| rest.split_once(" MB as base64, over the 0.6 MB the platform accepts in a result (MAX_INLINE_OUTPUT_BYTES); "))
        .and_then(|(size, _)| size.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("unexpected message: {error}"));
    assert!((1.0..3.0).contains(&size), "{error}");
}

/// A local endpoint (`serve`) whose engine uploads to `s3` with `storage`.
async fn local_endpoint(sim: &Simulator, storage: StorageSettings) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(endpoint::serve(
        listener,
        engine(sim, storage),
        Webhooks::new(WebhookPolicy::default()),
        ServeOptions::default(),
        shutdown.clone(),
    ));
    (base, shutdown)
}

#[tokio::test]
async fn local_endpoint_takes_s3_config_on_the_job() {
    harness::init_logs();
    let s3 = S3Server::start("job-access", "job-secret-5521", &["job-bucket"]);
    let sim = noise_simulator().await;
    let (base, shutdown) = local_endpoint(
        &sim,
        StorageSettings {
            max_inline_bytes: Some(SMALL_LIMIT),
            ..private_ok()
        },
    )
    .await;
    let body = json!({
        "input": job_input(8, 2),
        "s3Config": {
            "accessId": "job-access",
            "accessSecret": "job-secret-5521",
            "endpointUrl": format!("{}/job-bucket", s3.endpoint()),
        }
    });
    let resp = tokio::time::timeout(
        LIMIT,
        http()
            .post(format!("{base}/runsync?wait=30000"))
            .json(&body)
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    let status: Value = resp.json().await.unwrap();
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let (uploaded, inline) = entries(&status["output"]);
    assert_eq!((uploaded.len(), inline.len()), (1, 1), "{status}");
    let id = status["id"].as_str().unwrap();
    let url = uploaded[0]["data"].as_str().unwrap();
    assert!(url.contains(&format!("/job-bucket/{id}/")), "{url}");
    assert_eq!(get(url).await.0, 200);
    shutdown.cancel();
}

/// The real binary in serverless mode, with the bucket from the environment.
#[tokio::test]
async fn serverless_auto_mode_uploads_what_does_not_fit() {
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let sim = noise_simulator().await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut env: Vec<(&str, String)> = s3.env(SECRET);
    env.push(("BUCKET_PREFIX", "/comfy/".into()));
    env.push(("MAX_INLINE_OUTPUT_BYTES", SMALL_LIMIT.to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker = WorkerProcess::start(&platform, &sim, &env);
    platform.push_job("s3-auto", job_input(9, 2));
    let body = final_of(&platform, "s3-auto").await;
    assert_eq!(platform.status("s3-auto")["status"], "COMPLETED", "{body}");
    let output = &body["output"];
    let (uploaded, inline) = entries(output);
    assert_eq!((uploaded.len(), inline.len()), (1, 1), "{body}");
    check_uploaded(&sim, &s3, &uploaded[0], "comfy/s3-auto/").await;
    png_size(inline[0]["data"].as_str().unwrap());
    let log = worker.log();
    assert!(!log.contains(SECRET), "the secret was logged");
    assert!(
        !log.contains("X-Amz-Signature"),
        "a presigned URL was logged"
    );
}

/// The platform's own `s3Config` field (top level on the job) replaces the env bucket.
#[tokio::test]
async fn serverless_job_s3_config_overrides_the_env() {
    let env_s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let job_s3 = S3Server::start("job-access", "job-secret-0b7e", &["job-bucket"]);
    let sim = noise_simulator().await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut env: Vec<(&str, String)> = env_s3.env(SECRET);
    env.push(("OUTPUT_UPLOAD", "always".into()));
    env.push(("ALLOW_PRIVATE_S3_ENDPOINTS", "true".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker = WorkerProcess::start(&platform, &sim, &env);
    platform.push_raw_job(json!({
        "id": "s3-job",
        "input": job_input(10, 2),
        "s3Config": {
            "accessId": "job-access",
            "accessSecret": "job-secret-0b7e",
            "bucketName": "job-bucket",
            "endpointUrl": job_s3.endpoint(),
        }
    }));
    let body = final_of(&platform, "s3-job").await;
    let (uploaded, inline) = entries(&body["output"]);
    assert_eq!((uploaded.len(), inline.len()), (2, 0), "{body}");
    for entry in &uploaded {
        assert_eq!(get(entry["data"].as_str().unwrap()).await.0, 200);
    }
    assert_eq!(job_s3.keys("job-bucket").len(), 2);
    assert!(env_s3.keys(BUCKET).is_empty());
    assert!(
        !worker.log().contains("job-secret-0b7e"),
        "the job's secret was logged"
    );
}

/// Without a bucket, an output over the limit fails at once with the explanation, instead of a
/// result the platform would refuse.
#[tokio::test]
async fn serverless_over_limit_without_a_bucket_fails_fast_with_the_fix() {
    let sim = noise_simulator().await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let limit = SMALL_LIMIT.to_string();
    let _worker = WorkerProcess::start(
        &platform,
        &sim,
        &[("MAX_INLINE_OUTPUT_BYTES", limit.as_str())],
    );
    platform.push_job("too-big", job_input(11, 2));
    let body = final_of(&platform, "too-big").await;
    let status = platform.status("too-big");
    assert_eq!(status["status"], "FAILED", "{status}");
    let error = body["error"].as_str().expect("error");
    check_size_message(error);
    assert!(error.contains("set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config)"), "{error}");
    assert!(body.get("output").is_none(), "{body}");
    assert!(
        status["executionTime"].as_u64().unwrap() < 10_000,
        "the job ended quickly: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every file kind, the SSRF guard on a job's endpoint, s3:// inputs.

/// One workflow with a video (VideoHelperSuite, with `format` and `frame_rate`), audio, a latent
/// (another key), an image and a text.
fn every_kind_workflow() -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 3368601}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "kinds"}},
        "3": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 12.5, "loop_count": 0,
              "filename_prefix": "clips/kinds", "format": "video/h264-mp4", "pingpong": false, "save_output": true}},
        "4": {"class_type": "EmptyAudio", "inputs": {"duration": 0.25, "sample_rate": 8000, "channels": 1}},
        "5": {"class_type": "SaveAudio", "inputs": {"audio": ["4", 0], "filename_prefix": "audio/kinds"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/kinds"}},
        "8": {"class_type": "PrimitiveString", "inputs": {"value": "a caption"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }})
}

/// `(subfolder, filename)` of every file ComfyUI (the simulator) lists for the last prompt.
async fn history_files(sim: &Simulator) -> Vec<(String, String)> {
    let prompt = sim.prompts().last().cloned().expect("a prompt");
    let id = prompt["prompt_id"].as_str().unwrap();
    let (status, body) = get(&format!("http://{}/history/{id}", sim.host())).await;
    assert_eq!(status, 200);
    let history: Value = serde_json::from_slice(&body).unwrap();
    let mut out = Vec::new();
    for ui in history[id]["outputs"].as_object().unwrap().values() {
        for items in ui.as_object().unwrap().values() {
            for item in items.as_array().into_iter().flatten() {
                if let Some(name) = item.get("filename").and_then(Value::as_str) {
                    out.push((
                        item["subfolder"].as_str().unwrap_or("").to_owned(),
                        name.to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn every_file_kind_can_be_uploaded() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let sim = simulator(1).await;
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            mode: UploadMode::Always,
            ..StorageSettings::default()
        },
    );
    let (out, _) = harness::run_job(&engine, every_kind_workflow()).await;
    let out = out.to_json();
    assert!(out.get("errors").is_none(), "{out}");
    let keys: Vec<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["images", "videos", "audio", "text", "latents"],
        "{out}"
    );
    assert_eq!(out["text"], json!(["a caption"]), "text stays inline");
    let subfolders: std::collections::HashMap<String, String> = history_files(&sim)
        .await
        .into_iter()
        .map(|(sub, name)| (name, sub))
        .collect();
    let mut uploaded = 0;
    for (kind, content_type) in [
        ("images", "image/png"),
        ("videos", "video/mp4"),
        ("audio", "audio/flac"),
        ("latents", "application/octet-stream"),
    ] {
        let entries = out[kind].as_array().unwrap();
        assert!(!entries.is_empty(), "{kind}");
        for entry in entries {
            assert_eq!(entry["type"], "s3_url", "{entry}");
            assert_eq!(entry["content_type"], content_type, "{entry}");
            let filename = entry["filename"].as_str().unwrap();
            let subfolder = &subfolders[filename];
            let url = url::Url::parse(entry["data"].as_str().unwrap()).unwrap();
            let key = if subfolder.is_empty() {
                format!("test-job/{filename}")
            } else {
                format!("test-job/{subfolder}/{filename}")
            };
            assert_eq!(url.path(), format!("/{BUCKET}/{key}"));
            let view = format!(
                "http://{}/view?filename={filename}&subfolder={subfolder}&type=output",
                sim.host()
            );
            let (status, expected) = get(&view).await;
            assert_eq!(status, 200, "/view {filename}");
            let (status, body) = get(url.as_str()).await;
            assert_eq!(status, 200);
            assert!(
                body == expected,
                "{kind} {filename}: the URL serves ComfyUI's bytes"
            );
            uploaded += 1;
        }
    }
    let video = &out["videos"][0];
    assert_eq!(video["format"], "video/h264-mp4");
    assert_eq!(video["frame_rate"], 12.5);
    assert_eq!(s3.keys(BUCKET).len(), uploaded);
}

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

/// A job running the plain workflow with these input items.
fn with_inputs(items: Value) -> Value {
    json!({"workflow": harness::workflow("ok"), "images": items})
}

fn details(out: &JobOutput) -> Vec<String> {
    match out {
        JobOutput::Failed {
            details: Some(d), ..
        } => d.clone(),
        other => panic!("expected a failure with details: {}", other.to_json()),
    }
}

#[tokio::test]
async fn s3_inputs_are_read_from_the_env_bucket() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    s3.put(ACCESS, SECRET, BUCKET, "inputs/photo.png", png_bytes(40))
        .await;
    s3.put(ACCESS, SECRET, BUCKET, "inputs/noext", png_bytes(80))
        .await;
    let sim = simulator(1).await;
    let reader = engine(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            ..StorageSettings::default()
        },
    );
    let items = json!([
        {"name": "photo.png", "image": format!("s3://{BUCKET}/inputs/photo.png")},
        // Without a name: the key's last segment, with the extension of the file's type.
        {"image": format!("s3://{BUCKET}/inputs/noext")},
    ]);
    let (out, _) = harness::run_job(&reader, with_inputs(items)).await;
    assert!(!out.is_error(), "{}", out.to_json());
    assert_eq!(sim.input_file("", "photo.png"), Some(png_bytes(40)));
    assert_eq!(sim.input_file("", "noext.png"), Some(png_bytes(80)));
    let uploads = sim.uploads();
    assert_eq!(uploads[0].content_type.as_deref(), Some("image/png"));

    // Another bucket, a missing key: the job fails before anything reaches ComfyUI, naming each.
    let sim = simulator(1).await;
    let limited = engine_with_inputs(
        &sim,
        StorageSettings {
            bucket: Some(s3.bucket(SECRET)),
            ..StorageSettings::default()
        },
        InputPolicy {
            max_bytes: 50,
            ..InputPolicy::default()
        },
    );
    let items = json!([
        {"name": "a.png", "image": "s3://someone-elses/inputs/photo.png"},
        {"name": "b.png", "image": format!("s3://{BUCKET}/inputs/missing.png")},
        {"name": "c.png", "image": format!("s3://{BUCKET}/inputs/photo.png")},
    ]);
    let (out, _) = harness::run_job(&limited, with_inputs(items)).await;
    assert_eq!(
        out.error_message(),
        Some("Failed to upload one or more input images")
    );
    let size = png_bytes(40).len();
    assert_eq!(
        details(&out),
        [
            "Error downloading a.png from s3://someone-elses/inputs/photo.png: the bucket \"someone-elses\" is not the configured one (\"outputs\"); s3:// inputs are read from the job's bucket only".to_owned(),
            "Error downloading b.png from s3://outputs/inputs/missing.png: no such object in the bucket".to_owned(),
            format!("Error downloading c.png from s3://outputs/inputs/photo.png: the object is {size} bytes, larger than INPUT_URL_MAX_BYTES (50 bytes)"),
        ]
    );
    assert!(sim.uploads().is_empty() && sim.prompts().is_empty());

    // Without any bucket, the error says what to configure.
    let no_bucket = engine(&sim, StorageSettings::default());
    let items = json!([{"name": "a.png", "image": format!("s3://{BUCKET}/inputs/photo.png")}]);
    let (out, _) = harness::run_job(&no_bucket, with_inputs(items)).await;
    let problem = &details(&out)[0];
    assert!(
        problem.contains(": no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL"),
        "{problem}"
    );
}

#[tokio::test]
async fn s3_inputs_and_outputs_use_the_jobs_s3_config() {
    harness::init_logs();
    let env_s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let job_s3 = S3Server::start("job-access", "job-secret-77f1", &["job-bucket"]);
    job_s3
        .put(
            "job-access",
            "job-secret-77f1",
            "job-bucket",
            "in/photo.png",
            png_bytes(120),
        )
        .await;
    // The same key in the env bucket holds other bytes: the job's bucket must win.
    env_s3
        .put(ACCESS, SECRET, BUCKET, "in/photo.png", png_bytes(1))
        .await;
    let sim = simulator(1).await;
    let engine = engine(
        &sim,
        StorageSettings {
            bucket: Some(env_s3.bucket(SECRET)),
            mode: UploadMode::Always,
            ..private_ok()
        },
    );
    let mut input =
        with_inputs(json!([{"name": "photo.png", "image": "s3://job-bucket/in/photo.png"}]));
    input["s3Config"] = job_s3.s3_config("job-access", "job-secret-77f1", "job-bucket");
    let (out, _) = harness::run_job(&engine, input).await;
    let out = out.to_json();
    assert_eq!(sim.input_file("", "photo.png"), Some(png_bytes(120)));
    let (uploaded, inline) = entries(&out);
    assert_eq!((uploaded.len(), inline.len()), (2, 0), "{out}");
    assert_eq!(
        job_s3.keys("job-bucket").len(),
        3,
        "the input and two outputs"
    );
    assert_eq!(
        env_s3.keys(BUCKET),
        ["in/photo.png"],
        "the env bucket is not used"
    );

    // The env bucket is not readable through another name while s3Config is set.
    let mut input =
        with_inputs(json!([{"name": "x.png", "image": format!("s3://{BUCKET}/in/photo.png")}]));
    input["s3Config"] = job_s3.s3_config("job-access", "job-secret-77f1", "job-bucket");
    let (out, _) = harness::run_job(&engine, input).await;
    assert!(
        details(&out)[0].ends_with("the bucket \"outputs\" is not the configured one (\"job-bucket\"); s3:// inputs are read from the job's bucket only"),
        "{}",
        out.to_json()
    );
}

#[tokio::test]
async fn a_jobs_loopback_endpoint_is_refused_without_the_opt_in() {
    harness::init_logs();
    let s3 = S3Server::start("job-access", "job-secret-3c2d", &["job-bucket"]);
    s3.put(
        "job-access",
        "job-secret-3c2d",
        "job-bucket",
        "in/photo.png",
        png_bytes(9),
    )
    .await;
    let sim = simulator(1).await;
    let engine = engine(&sim, StorageSettings::default());
    let expected = "Invalid s3Config: s3Config.endpointUrl refused: 127.0.0.1 is a loopback address (set ALLOW_PRIVATE_S3_ENDPOINTS=true to allow it)";
    for items in [
        json!([]),
        json!([{"name": "p.png", "image": "s3://job-bucket/in/photo.png"}]),
    ] {
        let mut input = with_inputs(items);
        input["s3Config"] = s3.s3_config("job-access", "job-secret-3c2d", "job-bucket");
        let (out, _) = harness::run_job(&engine, input).await;
        assert_eq!(out.to_json(), json!({"error": expected}));
    }
    // Named hosts are checked too (`localhost` without resolving it).
    let mut input = with_inputs(json!([]));
    input["s3Config"] = s3.s3_config("job-access", "job-secret-3c2d", "job-bucket");
    input["s3Config"]["endpointUrl"] = json!(format!("http://localhost:{}", s3.port));
    let (out, _) = harness::run_job(&engine, input).await;
    assert!(
        out.error_message()
            .unwrap()
            .contains("refused: localhost is a local host name"),
        "{}",
        out.to_json()
    );
    assert!(sim.prompts().is_empty() && sim.uploads().is_empty());
    assert_eq!(
        s3.keys("job-bucket"),
        ["in/photo.png"],
        "nothing was written"
    );

    // The same job with the opt-in runs, reading its input from that endpoint.
    let open = engine_with_inputs(&sim, private_ok(), InputPolicy::default());
    let mut input =
        with_inputs(json!([{"name": "p.png", "image": "s3://job-bucket/in/photo.png"}]));
    input["s3Config"] = s3.s3_config("job-access", "job-secret-3c2d", "job-bucket");
    let (out, _) = harness::run_job(&open, input).await;
    assert!(!out.is_error(), "{}", out.to_json());
    assert_eq!(sim.input_file("", "p.png"), Some(png_bytes(9)));
}

/// The real binary: a job's loopback `s3Config` fails the job unless the worker opts in; the env
/// bucket, also on loopback, is trusted and serves an `s3://` input.
#[tokio::test]
async fn serverless_checks_the_jobs_endpoint_not_the_env_bucket() {
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    s3.put(ACCESS, SECRET, BUCKET, "in/photo.png", png_bytes(33))
        .await;
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let env: Vec<(&str, String)> = s3.env(SECRET);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker = WorkerProcess::start(&platform, &sim, &env);
    platform.push_raw_job(json!({
        "id": "refused",
        "input": job_input(12, 2),
        "s3Config": s3.s3_config(ACCESS, SECRET, BUCKET),
    }));
    let body = final_of(&platform, "refused").await;
    assert_eq!(platform.status("refused")["status"], "FAILED", "{body}");
    assert_eq!(
        body["error"],
        "Invalid s3Config: s3Config.endpointUrl refused: 127.0.0.1 is a loopback address (set ALLOW_PRIVATE_S3_ENDPOINTS=true to allow it)"
    );
    platform.push_job(
        "env-input",
        with_inputs(json!([{"name": "in.png", "image": format!("s3://{BUCKET}/in/photo.png")}])),
    );
    let body = final_of(&platform, "env-input").await;
    assert_eq!(
        platform.status("env-input")["status"],
        "COMPLETED",
        "{body}"
    );
    assert_eq!(sim.input_file("", "in.png"), Some(png_bytes(33)));
    assert!(!worker.log().contains(SECRET), "the secret was logged");
}

/// A model brought with the job as an object of its bucket (`s3://bucket/key` in
/// `input.models`): streamed into the cache and linked into ComfyUI's model folder before the
/// prompt is queued; another bucket's object is refused clearly, with nothing installed.
#[tokio::test]
async fn models_come_from_the_jobs_bucket() {
    harness::init_logs();
    let s3 = S3Server::start(ACCESS, SECRET, &[BUCKET]);
    let model: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s3.put(
        ACCESS,
        SECRET,
        BUCKET,
        "models/mine.safetensors",
        model.clone(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(1),
            models_dir: Some(dir.path().join("models")),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let mut settings = harness::settings(&sim.host());
    settings.storage = StorageSettings {
        bucket: Some(s3.bucket(SECRET)),
        ..StorageSettings::default()
    };
    settings.models = comfy_worker::config::ModelPolicy {
        models_dir: dir.path().join("models"),
        cache_dir: dir.path().join("cache"),
        ..comfy_worker::config::ModelPolicy::default()
    };
    let engine = Engine::new(settings).unwrap();
    let job = |ckpt: &str, url: String| {
        let mut input = harness::test_input()["input"].clone();
        input["workflow"]["4"]["inputs"]["ckpt_name"] = json!(ckpt);
        input["models"] = json!([{"url": url, "folder": "checkpoints", "name": ckpt}]);
        input
    };

    let (out, _) = harness::run_job(
        &engine,
        job(
            "mine.safetensors",
            format!("s3://{BUCKET}/models/mine.safetensors"),
        ),
    )
    .await;
    assert!(!out.is_error(), "{}", out.to_json());
    let installed = dir.path().join("models/checkpoints/mine.safetensors");
    assert_eq!(std::fs::read(&installed).unwrap(), model);
    assert_eq!(sim.prompts().len(), 1);

    let (out, _) = harness::run_job(
        &engine,
        job(
            "theirs.safetensors",
            "s3://someone-elses/models/theirs.safetensors".into(),
        ),
    )
    .await;
    let error = out.error_message().unwrap_or_default().to_owned();
    assert!(
        error.contains("s3:// models are read from the job's bucket only"),
        "{error}"
    );
    assert!(!dir
        .path()
        .join("models/checkpoints/theirs.safetensors")
        .exists());
    assert_eq!(sim.prompts().len(), 1, "nothing queued for the refused job");
}
