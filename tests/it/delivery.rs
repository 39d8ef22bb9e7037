//! Delivering results to the RunPod platform whatever the job's id, the job-take reply's media
//! type or the platform's faults (issue: "ids and errors that cannot leak or break delivery",
//! "results given up too early"). The worker runs in process ([`spawn_app`]), one job-take at a
//! time.

use std::collections::HashMap;

use comfy_worker::platform::runpod::{PlatformClient, RunPodSettings, Step};
use serde_json::json;

use crate::fake_platform::Fault;
use crate::faults::instant_input;
use crate::worker_in_process::{spawn_app, TestWorker};

/// Takes and runs every queued reply (`n` job-takes).
async fn drain(app: &TestWorker, n: usize) {
    for _ in 0..n {
        let step = app.step().await;
        assert!(matches!(step, Step::Ran(_)), "{step:?}");
    }
}

fn raw_job(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id": {id}, "input": {}}}"#,
        json!(instant_input(0x20_2020))
    )
    .into_bytes()
}

#[tokio::test]
async fn ids_with_slashes_newlines_and_big_numbers_reach_their_own_job() {
    let app = spawn_app(&[]).await;
    // (the id as the platform writes it, the id it means)
    let cases = [
        (r#""../../../x""#, "../../../x"),
        (r#""a?b#c&d e""#, "a?b#c&d e"),
        ("12345678901234567890123", "12345678901234567890123"),
        ("1e3", "1e3"),
        (r#""line\nbreak""#, "line\nbreak"),
    ];
    for (written, id) in cases {
        app.platform.push_raw_bytes(raw_job(written), &[id]);
    }
    drain(&app, cases.len()).await;
    for (_, id) in &cases[..4] {
        let status = app.platform.status(id);
        assert_eq!(status["status"], "COMPLETED", "{id:?}: {status}");
    }
    // No header can carry a newline: the job is not run, and it is answered so.
    let refused = app.platform.status("line\nbreak");
    assert_eq!(refused["status"], "FAILED", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot be sent in an HTTP header"),
        "{refused}"
    );
    assert_eq!(app.sim.prompts().len(), 4, "only the usable ids ran");
    assert!(
        app.platform.violations().is_empty(),
        "{:?}",
        app.platform.violations()
    );
}

#[tokio::test]
async fn job_take_replies_of_every_json_media_type_are_taken() {
    let app = spawn_app(&[]).await;
    let types = [
        ("upper", Some("Application/JSON; charset=UTF-8")),
        ("text-json", Some("text/json")),
        ("none", None),
        ("vendor", Some("application/vnd.runpod+json")),
    ];
    for (id, content_type) in types {
        app.platform
            .push_raw_typed(raw_job(&format!("\"{id}\"")), &[id], content_type);
    }
    drain(&app, types.len()).await;
    for (id, _) in types {
        assert_eq!(app.platform.status(id)["status"], "COMPLETED", "{id}");
    }
}

#[tokio::test]
async fn an_unreadable_job_that_names_its_id_is_answered() {
    let app = spawn_app(&[]).await;
    let job = String::from_utf8(raw_job("\"ID\"")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "nan",
            job.replace("\"input\":", "\"seed\": NaN, \"input\":")
                .into_bytes(),
        ),
        ("bom", [b"\xEF\xBB\xBF".as_slice(), job.as_bytes()].concat()),
        ("trailing", format!("{job} trailing").into_bytes()),
        ("two", format!("{job}{job}").into_bytes()),
        ("cut", job.as_bytes()[..job.len() / 2].to_vec()),
    ];
    for (id, body) in &cases {
        let body = String::from_utf8_lossy(body).replace("\"ID\"", &format!("\"{id}\""));
        let body = if *id == "bom" {
            [
                b"\xEF\xBB\xBF".as_slice(),
                body.trim_start_matches('\u{FEFF}').as_bytes(),
            ]
            .concat()
        } else {
            body.into_bytes()
        };
        app.platform.push_raw_bytes(body, &[id]);
    }
    drain(&app, cases.len()).await;
    for (id, _) in &cases {
        let status = app.platform.status(id);
        assert_eq!(status["status"], "FAILED", "{id}: {status}");
        let error = status["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("cannot be read, so it was not run"),
            "{id}: {status}"
        );
    }
    assert!(app.sim.prompts().is_empty());
}

#[tokio::test]
async fn a_result_the_platform_never_takes_is_spooled_and_delivered_after_a_restart() {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().to_str().unwrap();
    let env = [
        ("RUNPOD_RESULT_RETRY_WINDOW_S", "0.3"),
        ("RUNPOD_RESULT_SPOOL_DIR", dir),
    ];
    let app = spawn_app(&env).await;
    app.platform.push_fault_run(Fault::Status(503), 100);
    app.platform.push_job("kept", instant_input(0x30_3030));
    drain(&app, 1).await;
    assert_eq!(app.platform.status("kept")["status"], "IN_PROGRESS");
    let spooled: Vec<_> = std::fs::read_dir(spool.path()).unwrap().collect();
    assert_eq!(spooled.len(), 1, "the result is kept on disk");

    // The platform is healthy again; a new worker (same spool) delivers it at start.
    app.platform.clear_faults();
    restarted_client(&app, &env).redeliver_spooled().await;
    let status = app.platform.status("kept");
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
}

/// A platform client for `app`'s platform, as a restarted worker process builds it (the same
/// settings, so the same spool).
fn restarted_client(app: &TestWorker, extra: &[(&str, &str)]) -> PlatformClient {
    let mut env: HashMap<String, String> = app.platform.env().into_iter().collect();
    env.insert("RUNPOD_RESULT_RETRY_DELAY_MS".into(), "20".into());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = RunPodSettings::from_lookup(|k| env.get(k).cloned())
        .expect("platform settings")
        .expect("a RunPod environment");
    PlatformClient::new(settings).expect("platform client")
}
