//! Self-tests of the fake platform, driven by a raw reqwest client that speaks the SDK's wire
//! format (`runpod-protocol.md` §1) from the URL templates of [`FakePlatform::env`]. No sleeps as
//! synchronisation: every wait is on the fake's state, and every test is bounded by [`LIMIT`].

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_platform::{FakePlatform, Fault, PlatformOptions, PostKind};

/// Upper bound for any single test.
const LIMIT: Duration = Duration::from_secs(30);
/// A long-poll the tests never wait out: a poll answered well before it was woken up.
const LONG: Duration = Duration::from_secs(20);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test did not finish in time");
}

/// What the worker does on the wire, built from the fake's environment like the SDK builds it.
struct Sdk {
    http: reqwest::Client,
    env: HashMap<String, String>,
}

impl Sdk {
    fn new(fake: &FakePlatform) -> Sdk {
        Sdk {
            http: reqwest::Client::new(),
            env: fake.env().into_iter().collect(),
        }
    }

    fn var(&self, name: &str) -> &str {
        self.env.get(name).map_or("", String::as_str)
    }

    fn worker_id(&self) -> &str {
        self.var("RUNPOD_POD_ID")
    }

    fn job_get_url(&self) -> String {
        self.var("RUNPOD_WEBHOOK_GET_JOB")
            .replace("$ID", self.worker_id())
    }

    fn take_url(&self) -> String {
        format!("{}&job_in_progress=0", self.job_get_url())
    }

    fn stop_url(&self) -> String {
        self.job_get_url().replace("/job-take/", "/job-stop/")
    }

    fn done_url(&self, job: &str, is_stream: bool) -> String {
        format!(
            "{}&isStream={is_stream}",
            self.var("RUNPOD_WEBHOOK_POST_OUTPUT")
                .replace("$RUNPOD_POD_ID", self.worker_id())
                .replace("$ID", job)
        )
    }

    fn stream_url(&self, job: &str) -> String {
        format!(
            "{}&isStream=false",
            self.var("RUNPOD_WEBHOOK_POST_STREAM")
                .replace("$RUNPOD_POD_ID", self.worker_id())
                .replace("$ID", job)
        )
    }

    fn ping_url(&self, query: &str) -> String {
        format!(
            "{}&{query}",
            self.var("RUNPOD_WEBHOOK_PING")
                .replace("$RUNPOD_POD_ID", self.worker_id())
        )
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .header("Authorization", self.var("RUNPOD_AI_API_KEY"))
            .send()
            .await
            .expect("GET")
    }

    /// `GET job-take` → (status, JSON body if any).
    async fn take(&self) -> (u16, Option<Value>) {
        let r = self.get(&self.take_url()).await;
        let status = r.status().as_u16();
        let json = r
            .headers()
            .get("content-type")
            .is_some_and(|c| c == "application/json");
        let bytes = r.bytes().await.expect("take body");
        let body = json.then(|| serde_json::from_slice(&bytes).expect("take body is JSON"));
        (status, body)
    }

    /// A post with the SDK's per-post headers (§1.7).
    fn post(&self, url: String, job: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(url)
            .header("Authorization", self.var("RUNPOD_AI_API_KEY"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .header("X-Request-ID", job)
            .body(body.to_string())
    }

    async fn progress(&self, job: &str, output: Value) -> u16 {
        let body = json!({"status": "IN_PROGRESS", "output": output});
        self.post(self.done_url(job, false), job, &body)
            .send()
            .await
            .expect("progress post")
            .status()
            .as_u16()
    }

    async fn result(&self, job: &str, body: &Value) -> Result<u16, reqwest::Error> {
        let r = self
            .post(self.done_url(job, false), job, body)
            .send()
            .await?;
        Ok(r.status().as_u16())
    }
}

async fn start(opts: PlatformOptions) -> (FakePlatform, Sdk) {
    let fake = FakePlatform::start(opts).await;
    let sdk = Sdk::new(&fake);
    (fake, sdk)
}

/// Pushes a job and takes it, as the worker would.
async fn take_job(fake: &FakePlatform, sdk: &Sdk, id: &str) {
    fake.push_job(id, json!({"workflow": {}}));
    let (status, body) = sdk.take().await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("job")["id"], id);
}

fn assert_no_violations(fake: &FakePlatform) {
    let v = fake.violations();
    assert!(v.is_empty(), "violations: {v:#?}");
}

/// Whether an `io::ErrorKind::ConnectionReset` is somewhere in the error's source chain.
fn is_connection_reset(err: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        source = e.source();
    }
    false
}

fn has_violation(fake: &FakePlatform, needle: &str) -> bool {
    fake.violations().iter().any(|v| v.contains(needle))
}

#[tokio::test]
async fn env_holds_the_platform_templates() {
    bounded(async {
        let fake = FakePlatform::start(PlatformOptions::default()).await;
        let env: HashMap<String, String> = fake.env().into_iter().collect();
        let base = fake.base_url();
        assert_eq!(
            env["RUNPOD_WEBHOOK_GET_JOB"],
            format!("{base}/job-take/$ID?gpu=test")
        );
        assert_eq!(
            env["RUNPOD_WEBHOOK_POST_OUTPUT"],
            format!("{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test")
        );
        assert_eq!(
            env["RUNPOD_WEBHOOK_POST_STREAM"],
            format!("{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test")
        );
        assert_eq!(
            env["RUNPOD_WEBHOOK_PING"],
            format!("{base}/ping/$RUNPOD_POD_ID?gpu=test")
        );
        assert_eq!(env["RUNPOD_POD_ID"], fake.worker_id());
        assert_eq!(env["RUNPOD_AI_API_KEY"], fake.api_key());
        assert_eq!(env["RUNPOD_PING_INTERVAL"], "100");
        assert!(std::path::Path::new(&env["RUNPOD_RESULT_SPOOL_DIR"]).is_dir());
        assert_eq!(env.len(), 8);
    })
    .await;
}

#[tokio::test]
async fn take_answers_a_queued_job_and_moves_it_in_progress() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        fake.push_job("job-1", json!({"workflow": {"1": {}}}));
        let queued = fake.status("job-1");
        assert_eq!(queued["status"], "IN_QUEUE");
        assert_eq!(queued["executionTime"], 0);

        let (status, body) = sdk.take().await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            Some(json!({"id": "job-1", "input": {"workflow": {"1": {}}}}))
        );
        let view = fake.status("job-1");
        let keys: Vec<&str> = view
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["id", "status", "delayTime", "executionTime"]);
        assert_eq!(view["status"], "IN_PROGRESS");
        assert!(view["delayTime"].is_u64());

        let takes = fake.takes();
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].job_in_progress.as_deref(), Some("0"));
        assert!(takes[0].at <= Instant::now());
        assert_eq!(fake.status("never-pushed"), Value::Null);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn held_take_wakes_up_when_a_job_is_pushed() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions {
            long_poll: LONG,
            ..PlatformOptions::default()
        })
        .await;
        let started = Instant::now();
        let (take, ()) = tokio::join!(sdk.take(), async {
            fake.wait_takes(1).await;
            fake.push_job("late", json!(1));
        });
        assert_eq!(take.0, 200);
        assert_eq!(take.1.unwrap()["id"], "late");
        assert!(started.elapsed() < LONG / 2, "the held poll was not woken");
        assert_eq!(fake.status("late")["status"], "IN_PROGRESS");
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn abandoned_take_ends_and_the_next_poll_gets_the_job() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions {
            long_poll: LONG,
            ..PlatformOptions::default()
        })
        .await;
        let started = Instant::now();
        let err = sdk
            .http
            .get(sdk.take_url())
            .header("Authorization", fake.api_key())
            .timeout(Duration::from_millis(100))
            .send()
            .await
            .expect_err("the client gives up first");
        assert!(err.is_timeout(), "{err:?}");
        fake.wait_held_takes(0).await;
        assert!(
            started.elapsed() < LONG / 2,
            "the abandoned poll was held on"
        );
        fake.push_job("after", json!({}));
        let (status, body) = sdk.take().await;
        assert_eq!(status, 200);
        assert_eq!(body.unwrap()["id"], "after");
        assert_eq!(fake.takes().len(), 2);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn empty_take_is_held_for_the_long_poll_then_204() {
    bounded(async {
        let long_poll = Duration::from_millis(300);
        let (fake, sdk) = start(PlatformOptions {
            long_poll,
            ..PlatformOptions::default()
        })
        .await;
        let started = Instant::now();
        let (status, body) = sdk.take().await;
        let held = started.elapsed();
        assert_eq!(status, 204);
        assert_eq!(body, None);
        assert!(held >= long_poll, "answered after {held:?}");
        assert!(held < LONG, "answered after {held:?}");
        assert_eq!(fake.takes().len(), 1);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn raw_job_bodies_are_served_verbatim() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        let batch = json!([{"id": "b1", "input": {}}, {"id": "b2", "input": {}}]);
        fake.push_raw_job(batch.clone());
        fake.push_raw_job(json!("garbage"));
        fake.push_raw_job(json!({"id": "no-input"}));

        assert_eq!(sdk.take().await, (200, Some(batch)));
        assert_eq!(fake.status("b1")["status"], "IN_PROGRESS");
        assert_eq!(fake.status("b2")["status"], "IN_PROGRESS");
        assert_eq!(sdk.take().await, (200, Some(json!("garbage"))));
        assert_eq!(sdk.take().await, (200, Some(json!({"id": "no-input"}))));
        assert_eq!(fake.status("no-input")["status"], "IN_PROGRESS");
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn progress_then_final_completes_the_job() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        take_job(&fake, &sdk, "job-ok").await;

        assert_eq!(sdk.progress("job-ok", json!({"percent": 10})).await, 200);
        let view = fake.status("job-ok");
        assert_eq!(view["status"], "IN_PROGRESS");
        assert_eq!(view["output"], json!({"percent": 10}));
        assert_eq!(sdk.progress("job-ok", json!({"percent": 90})).await, 200);
        let got = fake.wait_progress("job-ok", |o| o["percent"] == 90).await;
        assert_eq!(got, json!({"percent": 90}));

        let result = json!({"output": {"images": []}});
        assert_eq!(sdk.result("job-ok", &result).await.unwrap(), 200);
        assert_eq!(fake.wait_final("job-ok").await, result);

        let view = fake.status("job-ok");
        assert_eq!(view["status"], "COMPLETED");
        assert_eq!(view["output"], json!({"images": []}));
        assert!(view.get("error").is_none());
        assert!(!fake.stop_pod_requested("job-ok"));

        let history = fake.status_history("job-ok");
        let statuses: Vec<&Value> = history.iter().map(|v| &v["status"]).collect();
        assert_eq!(statuses, ["IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]);
        assert_eq!(history[0]["output"], json!({"percent": 10}));

        let posts = fake.posts("job-ok");
        let kinds: Vec<PostKind> = posts.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [PostKind::Progress, PostKind::Progress, PostKind::Final]
        );
        assert!(posts.iter().all(|p| p.accepted && p.response == Some(200)));
        assert_eq!(posts[0].url_query, "gpu=test&isStream=false");
        assert!(posts[0].at <= posts[2].at);

        // The same view over HTTP; the job is finished, so it no longer changes.
        let over_http: Value = sdk
            .http
            .get(format!("{}/status/job-ok", fake.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(over_http, fake.status("job-ok"));
        let missing = sdk
            .http
            .get(format!("{}/status/nope", fake.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn failed_result_keeps_output_next_to_error_and_records_stop_pod() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        take_job(&fake, &sdk, "job-bad").await;
        let body = json!({"output": {"details": ["x"]}, "error": "boom", "stopPod": true});
        assert_eq!(sdk.result("job-bad", &body).await.unwrap(), 200);
        let view = fake.status("job-bad");
        let keys: Vec<&str> = view
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "status",
                "delayTime",
                "executionTime",
                "output",
                "error"
            ]
        );
        assert_eq!(view["status"], "FAILED");
        assert_eq!(view["error"], "boom");
        assert_eq!(view["output"], json!({"details": ["x"]}));
        assert!(fake.stop_pod_requested("job-bad"));

        take_job(&fake, &sdk, "job-err").await;
        assert_eq!(
            sdk.result("job-err", &json!({"error": "only"}))
                .await
                .unwrap(),
            200
        );
        let view = fake.status("job-err");
        assert_eq!(view["status"], "FAILED");
        assert!(view.get("output").is_none());

        take_job(&fake, &sdk, "job-empty").await;
        assert_eq!(sdk.result("job-empty", &json!({})).await.unwrap(), 200);
        assert_eq!(fake.status("job-empty")["status"], "COMPLETED");
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn result_faults_apply_in_order_then_posts_succeed() {
    bounded(async {
        let delay = Duration::from_millis(300);
        let (fake, sdk) = start(PlatformOptions {
            result_faults: vec![Fault::Status(500), Fault::Reset, Fault::Delay(delay)],
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-f").await;
        let body = json!({"output": {"n": 1}});

        assert_eq!(sdk.result("job-f", &body).await.unwrap(), 500);
        assert_eq!(fake.status("job-f")["status"], "IN_PROGRESS");

        let err = sdk
            .result("job-f", &body)
            .await
            .expect_err("a reset gives a connection error");
        assert!(err.status().is_none() && !err.is_timeout(), "{err:?}");
        assert!(is_connection_reset(&err), "{err:?}");
        assert_eq!(fake.status("job-f")["status"], "IN_PROGRESS");

        let started = Instant::now();
        assert_eq!(sdk.result("job-f", &body).await.unwrap(), 200);
        assert!(started.elapsed() >= delay);
        assert_eq!(fake.status("job-f")["status"], "COMPLETED");

        let posts = fake.posts("job-f");
        let responses: Vec<Option<u16>> = posts.iter().map(|p| p.response).collect();
        assert_eq!(responses, [Some(500), None, Some(200)]);
        let accepted: Vec<bool> = posts.iter().map(|p| p.accepted).collect();
        assert_eq!(accepted, [false, false, true]);
        assert_eq!(fake.status_history("job-f").len(), 1);
        assert_no_violations(&fake);

        // The faults are used up. The same result again (as after an unanswered post) is
        // answered and kept once; another result is a violation.
        assert_eq!(sdk.result("job-f", &body).await.unwrap(), 200);
        assert_eq!(fake.repeated_finals("job-f"), 1);
        assert_eq!(fake.status_history("job-f").len(), 1);
        assert_no_violations(&fake);
        let other = json!({"output": {"n": 2}});
        assert_eq!(sdk.result("job-f", &other).await.unwrap(), 200);
        assert!(has_violation(&fake, "result delivered twice"));
    })
    .await;
}

#[tokio::test]
async fn oversize_result_gets_400_and_leaves_the_job_running() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions {
            max_result_bytes: 1024,
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-big").await;
        let big = json!({"output": {"data": "x".repeat(2048)}});
        assert_eq!(sdk.result("job-big", &big).await.unwrap(), 400);
        assert_eq!(fake.status("job-big")["status"], "IN_PROGRESS");
        let small = json!({"error": "result too large"});
        assert_eq!(sdk.result("job-big", &small).await.unwrap(), 200);
        assert_eq!(fake.status("job-big")["status"], "FAILED");
        assert_eq!(fake.wait_final("job-big").await, small);
        let accepted: Vec<bool> = fake.posts("job-big").iter().map(|p| p.accepted).collect();
        assert_eq!(accepted, [false, true]);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn progress_after_final_reverts_the_status_and_is_a_violation() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        take_job(&fake, &sdk, "job-250").await;
        let result = json!({"output": {"images": []}});
        assert_eq!(sdk.result("job-250", &result).await.unwrap(), 200);
        assert_no_violations(&fake);
        assert_eq!(sdk.progress("job-250", json!({"percent": 99})).await, 200);
        let view = fake.status("job-250");
        assert_eq!(view["status"], "IN_PROGRESS");
        assert_eq!(view["output"], json!({"percent": 99}));
        assert!(has_violation(&fake, "progress after final"));
        // What a client polling /status saw, in order.
        let statuses: Vec<Value> = fake
            .status_history("job-250")
            .iter()
            .map(|v| v["status"].clone())
            .collect();
        assert_eq!(statuses, ["COMPLETED", "IN_PROGRESS"]);
    })
    .await;
}

#[tokio::test]
async fn slow_progress_overtaken_by_the_final_post_is_the_250_hazard() {
    bounded(async {
        let delay = Duration::from_millis(300);
        let (fake, sdk) = start(PlatformOptions {
            progress_delay: delay,
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-slow").await;
        let started = Instant::now();
        let (progress, ()) =
            tokio::join!(sdk.progress("job-slow", json!({"percent": 50})), async {
                // Only once the progress post has arrived (and is being held) does the final go out.
                let held = fake
                    .wait_post("job-slow", |p| p.kind == PostKind::Progress)
                    .await;
                assert!(!held.accepted && held.response.is_none());
                let r = sdk.result("job-slow", &json!({"output": {}})).await;
                assert_eq!(r.unwrap(), 200);
                assert_eq!(fake.status("job-slow")["status"], "COMPLETED");
            });
        assert_eq!(progress, 200);
        assert!(started.elapsed() >= delay);
        assert_eq!(fake.status("job-slow")["status"], "IN_PROGRESS");
        assert!(has_violation(&fake, "progress after final"));
    })
    .await;
}

#[tokio::test]
async fn delayed_progress_is_applied_even_if_the_worker_gives_up() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions {
            progress_delay: Duration::from_millis(300),
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-gone").await;
        let body = json!({"status": "IN_PROGRESS", "output": {"step": 1}});
        let err = sdk
            .post(sdk.done_url("job-gone", false), "job-gone", &body)
            .timeout(Duration::from_millis(50))
            .send()
            .await
            .expect_err("the client gives up first");
        assert!(err.is_timeout(), "{err:?}");
        let got = fake.wait_progress("job-gone", |_| true).await;
        assert_eq!(got, json!({"step": 1}));
        assert_eq!(fake.status("job-gone")["output"], json!({"step": 1}));
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn stream_chunks_do_not_finish_the_job() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        take_job(&fake, &sdk, "job-gen").await;
        let chunk = json!({"output": "part 1"});
        let r = sdk
            .post(sdk.stream_url("job-gen"), "job-gen", &chunk)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(fake.status("job-gen")["status"], "IN_PROGRESS");
        let r = sdk
            .post(
                sdk.done_url("job-gen", true),
                "job-gen",
                &json!({"output": []}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(fake.status("job-gen")["status"], "COMPLETED");
        let kinds: Vec<PostKind> = fake.posts("job-gen").iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [PostKind::Stream, PostKind::Final]);
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn wire_format_mistakes_are_violations_not_panics() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        take_job(&fake, &sdk, "job-w").await;
        let key = fake.api_key().to_string();

        // A JSON client's headers instead of the SDK's.
        let r = sdk
            .http
            .post(sdk.done_url("job-w", false))
            .header("Authorization", format!("Bearer {key}"))
            .json(&json!({"status": "IN_PROGRESS", "output": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the platform still takes it");
        for needle in [
            "Bearer",
            "header `content-type: application/json`",
            "no `charset` header",
            "no `x-request-id` header",
        ] {
            assert!(
                has_violation(&fake, needle),
                "{needle}: {:#?}",
                fake.violations()
            );
        }
        let before = fake.violations().len();

        // A body that is not JSON.
        let r = sdk
            .http
            .post(sdk.done_url("job-w", false))
            .header("Authorization", &key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .header("X-Request-ID", "job-w")
            .body("output=1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(has_violation(&fake, "body is not JSON"));
        let last = fake.posts("job-w").pop().unwrap();
        assert_eq!(last.body, json!("output=1"));
        assert!(!last.accepted);

        // A post for a job the platform never gave out.
        let r = sdk
            .post(sdk.done_url("ghost", false), "ghost", &json!({"output": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert!(has_violation(&fake, "unknown job \"ghost\""));

        // A status value only the platform uses, an unknown route, another worker's id, a take
        // without `job_in_progress`.
        let r = sdk
            .post(
                sdk.done_url("job-w", false),
                "job-w",
                &json!({"status": "COMPLETED"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(has_violation(&fake, "only progress posts carry one"));
        let r = sdk
            .get(&format!("{}/job-take-many/x", fake.base_url()))
            .await;
        assert_eq!(r.status(), 404);
        assert!(has_violation(&fake, "unknown route"));
        let r = sdk
            .get(&sdk.take_url().replace("/job-take/", "/job-take-batch/"))
            .await;
        assert_eq!(r.status(), 204);
        assert!(has_violation(&fake, "job-take-batch wants 2 or more"));
        let wrong = sdk.take_url().replace(fake.worker_id(), "someone-else");
        assert_eq!(sdk.get(&wrong).await.status(), 204);
        assert!(has_violation(&fake, "worker id \"someone-else\""));
        let r = sdk.get(&sdk.job_get_url()).await;
        assert_eq!(r.status(), 204);
        assert!(has_violation(&fake, "no `job_in_progress` parameter"));
        let r = sdk.get(&sdk.take_url().replace("?gpu=test", "?")).await;
        assert_eq!(r.status(), 204);
        assert!(has_violation(&fake, "`gpu=test`"));
        assert!(fake.violations().len() > before + 7);
        assert_eq!(fake.status("job-w")["status"], "IN_PROGRESS");
    })
    .await;
}

#[tokio::test]
async fn pings_record_the_decoded_job_list() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions::default()).await;
        fake.push_job("a", json!({}));
        fake.push_job("b", json!({}));
        let idle = sdk.get(&sdk.ping_url("runpod_version=1.12.0")).await;
        assert_eq!(idle.status(), 200);
        let busy = sdk
            .get(&sdk.ping_url("job_id=a%2Cb&runpod_version=1.12.0"))
            .await;
        assert_eq!(busy.status(), 200);

        let ping = fake.wait_ping(|p| p.job_ids.is_some()).await;
        assert_eq!(ping.job_ids, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(ping.query, "gpu=test&job_id=a%2Cb&runpod_version=1.12.0");
        let pings = fake.pings();
        assert_eq!(pings.len(), 2);
        assert_eq!(pings[0].job_ids, None);
        assert!(pings[0].at <= pings[1].at);
        assert_no_violations(&fake);

        sdk.get(&sdk.ping_url("job_id=zzz")).await;
        assert!(has_violation(&fake, "unknown jobs"));
        assert!(has_violation(&fake, "no `runpod_version` parameter"));
    })
    .await;
}

#[tokio::test]
async fn stop_channel_delivers_pending_stops_then_long_polls() {
    bounded(async {
        let long_poll = Duration::from_millis(300);
        let (fake, sdk) = start(PlatformOptions {
            long_poll,
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-s").await;
        fake.stop_job("job-s");
        assert_eq!(fake.status("job-s")["status"], "CANCELLED");

        let r = sdk.get(&sdk.stop_url()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"jobsToStop": ["job-s"]}));
        assert_eq!(fake.wait_stop_delivered("job-s").await.job_ids, ["job-s"]);

        let started = Instant::now();
        let r = sdk.get(&sdk.stop_url()).await;
        assert_eq!(r.status(), 204);
        assert!(started.elapsed() >= long_poll);
        let polls = fake.stop_polls();
        assert_eq!(polls.len(), 2);
        assert!(polls[1].job_ids.is_empty());
        assert!(polls[1].at - polls[0].at >= long_poll);

        // A late post for the cancelled job is answered but does not change its status.
        assert_eq!(sdk.progress("job-s", json!({"percent": 1})).await, 200);
        assert_eq!(fake.status("job-s")["status"], "CANCELLED");
        assert_no_violations(&fake);
    })
    .await;
}

#[tokio::test]
async fn held_stop_poll_wakes_up_on_stop_job() {
    bounded(async {
        let (fake, sdk) = start(PlatformOptions {
            long_poll: LONG,
            ..PlatformOptions::default()
        })
        .await;
        take_job(&fake, &sdk, "job-x").await;
        let url = sdk.stop_url();
        let started = Instant::now();
        let (r, ()) = tokio::join!(sdk.get(&url), async {
            fake.wait_stop_requests(1).await;
            fake.stop_job("job-x");
        });
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < LONG / 2, "the held poll was not woken");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"jobsToStop": ["job-x"]}));
        assert_no_violations(&fake);
    })
    .await;
}
