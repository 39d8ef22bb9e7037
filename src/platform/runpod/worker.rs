//! The job loop and its two companions: the heartbeat and the stop channel, each on its own task
//! so job work never delays them. A job's progress webhook, if it names one, is fed from the same
//! snapshots as the relay and never delays the job or its result either.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::client::{Delivery, PlatformClient, PostError, Take, TakeError};
use super::job::PlatformJob;
use super::metrics_listener::MetricsListener;
use super::relay::Relay;
use super::relay_sink::RelaySink;
use super::result_body::ResultBody;
use super::take_pacing::TakePacing;
use crate::config::FreeMemory;
use crate::housekeeping::warmup::{WarmupError, WarmupState};
use crate::job::{Completed, DeadlineSource, JobFailure, JobOutput};
use crate::metrics::Metrics;
use crate::progress::{preview_body, NodeEvent, ProgressKind, ProgressSnapshot};
use crate::runner::{job_span, Controls, Deadline, Pool, ProgressSink, Runner};
use crate::webhook::{ProgressHook, Webhooks};

/// How a job ended, for logs and tests.
#[derive(Debug)]
pub enum JobEnd {
    /// The result was posted.
    Posted(Delivery),
    /// Stopped by the platform; nothing posted.
    Stopped,
}

/// What one turn of the loop did ([`Worker::step`]).
#[derive(Debug)]
pub enum Step {
    /// Jobs were taken and run, each to its end.
    Ran(Vec<JobEnd>),
    /// The platform had nothing.
    NoJob,
    /// HTTP 429: wait before polling again.
    RateLimited,
    /// The job-take failed; retried with backoff.
    Failed(TakeError),
    /// Shutdown came during the job-take.
    ShutDown,
}

#[derive(Default)]
struct State {
    /// Taken but unfinished jobs (what the ping reports).
    held: BTreeSet<String>,
    /// The jobs being run now, by id, with their cancel (what the stop channel fires).
    running: HashMap<String, CancellationToken>,
}

/// The RunPod worker: a job loop plus heartbeat and stop-channel tasks. It translates the
/// platform's wire format to and from the [`Runner`]s of its ComfyUIs, and nothing else.
pub struct Worker {
    pool: Pool,
    client: PlatformClient,
    webhooks: Webhooks,
    state: Arc<Mutex<State>>,
    metrics: Metrics,
    /// The `METRICS_PORT` listener, bound by [`Worker::bind_metrics`] and served by
    /// [`Worker::run`].
    metrics_listener: tokio::sync::Mutex<Option<MetricsListener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Worker {
    /// A worker running jobs on `runner` for the platform behind `client`, delivering jobs'
    /// progress webhooks through `webhooks`. When the runner's settings name several ComfyUIs
    /// (`COMFY_HOST=a,b`), each runs one job at a time (see [`Pool`]).
    pub fn new(runner: Runner, client: PlatformClient, webhooks: Webhooks) -> Worker {
        let pool = Pool::new(runner);
        let metrics = pool.metrics();
        Worker {
            pool,
            client: client.with_metrics(metrics.clone()),
            webhooks,
            state: Arc::new(Mutex::new(State::default())),
            metrics,
            metrics_listener: tokio::sync::Mutex::new(None),
        }
    }

    /// The runner of its first ComfyUI.
    pub fn runner(&self) -> &Runner {
        self.pool.first()
    }

    /// The metrics the worker counts in (what `METRICS_PORT` serves).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Binds the `METRICS_PORT` listener now (else [`Worker::run`] does) and returns where it
    /// listens; `None` without `METRICS_PORT`.
    pub async fn bind_metrics(&self) -> std::io::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = self.client.settings().metrics_addr else {
            return Ok(None);
        };
        let mut slot = self.metrics_listener.lock().await;
        if let Some(bound) = slot.as_ref() {
            return Ok(Some(bound.local_addr()));
        }
        let bound = MetricsListener::bind(addr).await?;
        let local = bound.local_addr();
        *slot = Some(bound);
        Ok(Some(local))
    }

    /// Runs until `shutdown` is cancelled (then the job in progress finishes and is posted) or,
    /// with `REFRESH_WORKER`, until the first job is done.
    ///
    /// With `WARMUP_WORKFLOW`, the warm-up runs first, before the heartbeat and the first
    /// job-take (as the SDK's start-up checks do). If it fails, no job is taken: one
    /// `status=unhealthy&check=warmup` ping is sent (the SDK's fitness-check report) and the
    /// error is returned, for the process to exit non-zero so the platform replaces the worker.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WarmupError> {
        let settings = self.client.settings().clone();
        info!(
            worker_id = %settings.worker_id,
            progress = settings.relay_progress,
            heartbeat = settings.ping_url_for(&[]).is_some(),
            stop_channel = settings.stop_url().is_some(),
            "RunPod worker started"
        );
        let warmed = self.pool.warm_up(&shutdown).await;
        if shutdown.is_cancelled() && !matches!(self.pool.warmup_state(), WarmupState::Off) {
            info!("RunPod worker stopped during the warm-up");
            return Ok(());
        }
        if let Err(why) = warmed {
            self.client
                .report_unhealthy("warmup", &why.to_string())
                .await;
            error!(error = %why, "the worker is unhealthy and takes no job; exiting");
            return Err(why);
        }
        // No `/free` after the warm-up: the point is to keep what it loaded.
        // Results an earlier run could not deliver go out beside the new jobs.
        let spooled = {
            let client = self.client.clone();
            tokio::spawn(async move { client.redeliver_spooled().await })
        };
        let companions = CancellationToken::new();
        // A metrics port that cannot be bound is logged; the worker still takes jobs.
        if let Err(e) = self.bind_metrics().await {
            error!(error = %e, addr = ?settings.metrics_addr, "METRICS_PORT cannot be bound; no metrics are served");
        }
        let metrics_server = self
            .metrics_listener
            .lock()
            .await
            .take()
            .map(|l| tokio::spawn(l.serve(self.metrics.clone(), companions.clone())));
        let heartbeat = tokio::spawn(self.heartbeat(companions.clone()));
        let stops = tokio::spawn(self.stop_channel(companions.clone()));
        let pipelined = self.pipelined();
        if settings.refresh_worker || (self.pool.len() == 1 && !pipelined) {
            self.run_one_at_a_time(&shutdown).await;
        } else {
            self.run_concurrent(&shutdown, pipelined).await;
        }
        companions.cancel();
        spooled.abort();
        let _ = heartbeat.await;
        let _ = stops.await;
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        info!("RunPod worker stopped");
        Ok(())
    }

    /// Whether the loop pipelines (`PIPELINE`, on by default): not with `REFRESH_WORKER` (one
    /// job, then exit) nor `FREE_MEMORY_AFTER_JOB` (the memory is freed between two jobs).
    fn pipelined(&self) -> bool {
        let settings = self.client.settings();
        let frees = self
            .pool
            .first()
            .engine()
            .settings()
            .housekeeping
            .free_memory_after_job
            != FreeMemory::Off;
        let on = settings.pipeline && !settings.refresh_worker && !frees;
        info!(
            pipeline = on,
            "{}",
            if on {
                "pipelining: the next job is taken while the running one is close to done"
            } else {
                "one job at a time"
            }
        );
        on
    }

    /// The loop without pipelining: one job-take, its jobs run to their end, the next take.
    async fn run_one_at_a_time(&self, shutdown: &CancellationToken) {
        let settings = self.client.settings();
        let mut pacing = TakePacing::new();
        while !shutdown.is_cancelled() {
            let polled = tokio::time::Instant::now();
            let pause = match self.step(shutdown).await {
                Step::ShutDown => break,
                Step::Ran(_) if settings.refresh_worker => {
                    info!("REFRESH_WORKER is set: exiting after the job");
                    break;
                }
                Step::Ran(_) => pacing.jobs(),
                Step::NoJob => pacing.no_job(polled),
                Step::RateLimited => pacing.rate_limited(),
                Step::Failed(e) => pacing.failed(&e, &self.metrics),
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// The loop with several ComfyUIs, or with pipelining. Each ComfyUI runs one job at a time;
    /// a job-take asks for as many jobs as there are ComfyUIs with room
    /// (`job-take-batch` with `batch_size` when more than one), and each job goes to an idle
    /// ComfyUI first. With pipelining, a ComfyUI whose job is close to done ([`close_to_done`])
    /// has room too: the job it takes (`job_in_progress=1`) starts at once, its inputs fetched and
    /// uploaded and its prompt queued in that ComfyUI behind the running one, so ComfyUI starts it
    /// the moment the first ends, while the first one's outputs are collected and posted. At most
    /// one job waits in a ComfyUI beyond the one running; each keeps its own progress relay,
    /// webhook, deadline, stop and result. A ComfyUI set aside by the [`Pool`] gets no job until
    /// it answers again. Jobs a take brought beyond the room wait their turn. On shutdown the
    /// take is abandoned, the jobs started finish within the grace and are posted, and jobs not
    /// started are answered at once.
    async fn run_concurrent(&self, shutdown: &CancellationToken, pipeline: bool) {
        let mut running = FuturesUnordered::new();
        // The jobs running, by their place in the loop: their ComfyUI and near-done flag.
        let mut placed: HashMap<u64, (usize, Arc<AtomicBool>)> = HashMap::new();
        let wake = Arc::new(Notify::new());
        let mut health = self.pool.subscribe();
        let mut waiting: VecDeque<PlatformJob> = VecDeque::new();
        let mut take: Option<Pin<Box<dyn Future<Output = Take> + Send + '_>>> = None;
        let mut not_before: Option<tokio::time::Instant> = None;
        let mut pacing = TakePacing::new();
        // When the take under way was sent (the 250 ms floor counts from there).
        let mut polled = tokio::time::Instant::now();
        let mut serial = 0u64;
        let instances = self.pool.len();
        loop {
            let stopping = shutdown.is_cancelled();
            // ComfyUI `i`'s room: 2 idle, 1 behind a job close to done (with pipelining), 0 none.
            let room = |placed: &HashMap<u64, (usize, Arc<AtomicBool>)>, i: usize| -> u8 {
                if !self.pool.takes_jobs(i) {
                    return 0;
                }
                let mut on = placed.values().filter(|(at, _)| *at == i);
                match (on.next(), on.next()) {
                    (None, _) => 2,
                    (Some((_, near)), None) if pipeline && near.load(Ordering::SeqCst) => 1,
                    _ => 0,
                }
            };
            // Start what may start: each waiting job on the roomiest ComfyUI, or every waiting
            // job at shutdown (each is answered "not started" at once).
            loop {
                let at = if stopping {
                    0
                } else {
                    match (0..instances)
                        .map(|i| (room(&placed, i), i))
                        .filter(|(r, _)| *r > 0)
                        .max_by_key(|(r, i)| (*r, std::cmp::Reverse(*i)))
                    {
                        Some((_, i)) => i,
                        None => break,
                    }
                };
                let Some(job) = waiting.pop_front() else {
                    break;
                };
                serial += 1;
                let flag = Arc::new(AtomicBool::new(false));
                placed.insert(serial, (at, flag.clone()));
                let signal = NearDone {
                    flag,
                    wake: wake.clone(),
                };
                let id = serial;
                running.push(async move {
                    self.run_job_on(at, job, shutdown, Some(signal)).await;
                    id
                });
            }
            if stopping {
                take = None;
                if running.is_empty() {
                    return;
                }
            }
            let free = (0..instances).filter(|&i| room(&placed, i) > 0).count();
            let paused = not_before.is_some_and(|t| t > tokio::time::Instant::now());
            if take.is_none() && !stopping && !paused && waiting.is_empty() && free > 0 {
                let in_progress = !lock(&self.state).held.is_empty();
                polled = tokio::time::Instant::now();
                take = Some(Box::pin(self.client.take(in_progress, free)));
            }
            let taking = async {
                match take.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            };
            let pause = async {
                match not_before {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(id) = running.next(), if !running.is_empty() => {
                    placed.remove(&id);
                }
                _ = wake.notified() => {}
                Ok(()) = health.changed() => {}
                _ = shutdown.cancelled(), if !stopping => {}
                _ = pause, if paused => {
                    not_before = None;
                }
                taken = taking => {
                    take = None;
                    let pause = match taken {
                        Take::Jobs(jobs) => {
                            lock(&self.state)
                                .held
                                .extend(jobs.iter().map(|j| j.id.clone()));
                            waiting.extend(jobs);
                            pacing.jobs()
                        }
                        Take::NoJob => pacing.no_job(polled),
                        Take::RateLimited => pacing.rate_limited(),
                        Take::Failed(e) => pacing.failed(&e, &self.metrics),
                    };
                    not_before = (!pause.is_zero()).then(|| tokio::time::Instant::now() + pause);
                }
            }
        }
    }

    /// One turn of the loop: one job-take, and every job it gave run to its end (result
    /// posted). Tests drive the worker with this, one job-take at a time.
    pub async fn step(&self, shutdown: &CancellationToken) -> Step {
        let in_progress = !lock(&self.state).held.is_empty();
        let take = tokio::select! {
            _ = shutdown.cancelled() => return Step::ShutDown,
            t = self.client.take(in_progress, 1) => t,
        };
        match take {
            Take::Jobs(jobs) => {
                lock(&self.state)
                    .held
                    .extend(jobs.iter().map(|j| j.id.clone()));
                let mut ends = Vec::with_capacity(jobs.len());
                for job in jobs {
                    ends.push(self.run_job(job, shutdown).await);
                }
                Step::Ran(ends)
            }
            Take::NoJob => Step::NoJob,
            Take::RateLimited => Step::RateLimited,
            Take::Failed(e) => Step::Failed(e),
        }
    }

    fn heartbeat(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let client = self.client.clone();
        let state = self.state.clone();
        async move {
            if client.settings().ping_url_for(&[]).is_none() {
                return;
            }
            let mut tick = tokio::time::interval(client.settings().ping_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let held: Vec<String> = lock(&state).held.iter().cloned().collect();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = client.ping(&held) => {}
                }
            }
        }
    }

    fn stop_channel(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let client = self.client.clone();
        let state = self.state.clone();
        async move {
            if client.settings().stop_url().is_none() {
                return;
            }
            loop {
                let polled = Instant::now();
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = client.stopped_jobs() => r,
                };
                let pause = match result {
                    Ok(ids) => {
                        let st = lock(&state);
                        for id in &ids {
                            if let Some(cancel) = st.running.get(id) {
                                info!(job_id = %id, "the platform stopped the job");
                                cancel.cancel();
                            }
                        }
                        // The SDK's 1 s floor between polls that return at once.
                        Duration::from_secs(1).saturating_sub(polled.elapsed())
                    }
                    Err(why) => {
                        warn!(error = %why, "job-stop poll failed");
                        why.retry_after().min(Duration::from_secs(30))
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Runs one job (on the first ComfyUI) and posts its result (unless the platform stopped it).
    pub async fn run_job(&self, job: PlatformJob, shutdown: &CancellationToken) -> JobEnd {
        self.run_job_on(0, job, shutdown, None).await
    }

    /// [`Worker::run_job`] on ComfyUI `at`, raising `near_done` once the job is close to done.
    async fn run_job_on(
        &self,
        at: usize,
        job: PlatformJob,
        shutdown: &CancellationToken,
        near_done: Option<NearDone>,
    ) -> JobEnd {
        let span = job_span(&job.id);
        // Whether ComfyUI gets to run anything for it (else there is nothing to free).
        let runs = job.unreadable.is_none() && !shutdown.is_cancelled();
        let end = self
            .run_job_inner(at, &job, shutdown, near_done)
            .instrument(span.clone())
            .await;
        lock(&self.state).held.remove(&job.id);
        if runs {
            // After the result post (no delay for the client), before the next job-take.
            self.pool.runner(at).after_job().instrument(span).await;
        }
        end
    }

    async fn run_job_inner(
        &self,
        at: usize,
        job: &PlatformJob,
        shutdown: &CancellationToken,
        near_done: Option<NearDone>,
    ) -> JobEnd {
        let settings = self.client.settings();
        if let Some(why) = &job.unreadable {
            // Its id is all that could be read: answer it at once rather than leave it hanging.
            warn!(error = %why, "the job cannot be read; answering it with an error");
            return self
                .post_result(job, JobOutput::error(why.to_string()))
                .await;
        }
        if shutdown.is_cancelled() {
            // The rest of a batch taken before SIGTERM: answered at once, so no job is left
            // waiting for a worker that is going away.
            info!("not started: the worker is shutting down");
            JobWebhook::start(&self.webhooks, job, false).end_with_error(NOT_STARTED);
            return self.post_result(job, JobOutput::error(NOT_STARTED)).await;
        }
        let runner = self.pool.runner(at);
        if self.pool.len() > 1 {
            info!(comfy = %runner.engine().comfy().host(), "Started.");
        } else {
            info!("Started.");
        }
        let cancel = CancellationToken::new();
        lock(&self.state)
            .running
            .insert(job.id.clone(), cancel.clone());
        let request = job.request();
        let deadline = job_deadline(settings.job_timeout, request.timeout);
        let relay = settings
            .relay_progress
            .then(|| Relay::start(self.client.clone(), job.id.clone()));
        let mut webhook = JobWebhook::start(&self.webhooks, job, request.previews);
        let previews = request.previews || runner.engine().settings().previews.runpod;
        let mut relay_sink = RelaySink::new(relay.as_ref(), previews);
        // Pipelining: the loop may take the next job once this one is close to done.
        let mut near_done_sink = |s: &ProgressSnapshot| {
            if let Some(near) = near_done.as_ref().filter(|_| close_to_done(s)) {
                near.raise();
            }
        };
        let controls = Controls {
            cancel,
            shutdown: Some(shutdown.clone()),
            deadlines: deadline.into_iter().collect(),
        };
        let result = runner
            .run(
                &request,
                controls,
                &mut [&mut webhook, &mut relay_sink, &mut near_done_sink],
            )
            .await;
        lock(&self.state).running.remove(&job.id);
        self.pool.job_ended(at, &result);
        // Only the stop channel cancels a job here: the platform stopped it.
        let stopped = matches!(result, Err(JobFailure::Cancelled(_)));
        // Before the relay drains, so the webhook's final event is on its way at once.
        webhook.end((!stopped).then_some(&result));
        if let Some(relay) = relay {
            // A stopped job posts nothing more; otherwise /status is brought up to date first.
            let stats = relay.finish(!stopped).await;
            self.metrics
                .progress_posts(stats.posted, stats.coalesced, stats.failed);
            info!(
                posted = stats.posted,
                failed = stats.failed,
                coalesced = stats.coalesced,
                "progress relay finished"
            );
        }
        if stopped {
            info!("Finished. (stopped by the platform; nothing posted)");
            return JobEnd::Stopped;
        }
        self.post_result(job, JobOutput::from(result)).await
    }

    /// Posts a job's result (with the platform's retries) and logs how it went. Takes the output
    /// by value: it holds megabytes of base64, never copied.
    async fn post_result(&self, job: &PlatformJob, output: JobOutput) -> JobEnd {
        let settings = self.client.settings();
        let failed = output.is_error();
        let delivery = match ResultBody::build(output, settings.refresh_worker) {
            Ok(body) => self.client.post_result_body(&job.id, body).await,
            Err(e) => Delivery::Lost(PostError::Encode(e)),
        };
        match &delivery {
            Delivery::Delivered => info!(failed, "Finished."),
            Delivery::Lost(e) => error!(error = %e, "Failed to return job results."),
        }
        JobEnd::Posted(delivery)
    }
}

/// A job's progress webhook: off, being checked (snapshots wait), or running.
enum JobWebhook {
    Off,
    Checking {
        check: JoinHandle<Option<ProgressHook>>,
        early: Vec<ProgressSnapshot>,
    },
    Ready(ProgressHook),
}

impl JobWebhook {
    /// Checks the job's `progress_webhook` on a task of its own (a DNS lookup must not hold up
    /// the job); an invalid or refused URL is logged and the job runs without it.
    fn start(webhooks: &Webhooks, job: &PlatformJob, previews: bool) -> JobWebhook {
        let Some(url) = job.progress_webhook.clone() else {
            return JobWebhook::Off;
        };
        let webhooks = webhooks.clone();
        let job_id = job.id.clone();
        let check = tokio::spawn(
            async move {
                match webhooks.validate(&url).await {
                    Ok(url) => {
                        info!("progress webhook accepted");
                        Some(webhooks.progress(url, &job_id).with_previews(previews))
                    }
                    Err(e) => {
                        warn!(error = %e, "progress webhook ignored; the job runs without it");
                        None
                    }
                }
            }
            .in_current_span(),
        );
        JobWebhook::Checking {
            check,
            early: Vec::new(),
        }
    }

    /// Passes a snapshot on, or keeps it until the check is done. Never blocks.
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        if let JobWebhook::Checking { check, early } = self {
            match check.now_or_never() {
                None => {
                    early.push(snapshot.clone());
                    return;
                }
                Some(checked) => {
                    *self = match checked.ok().flatten() {
                        Some(hook) => {
                            early.drain(..).for_each(|s| hook.snapshot(&s));
                            JobWebhook::Ready(hook)
                        }
                        None => JobWebhook::Off,
                    }
                }
            }
        }
        if let JobWebhook::Ready(hook) = self {
            hook.snapshot(snapshot);
        }
    }

    /// Sends the final event for the job's result (`None`: stopped by the platform) and lets
    /// the hook deliver what is queued, on a task of its own: the result post never waits for it.
    fn end(self, result: Option<&Result<Completed, JobFailure>>) {
        if matches!(self, JobWebhook::Off) {
            // Nothing to send: the result (megabytes of base64 perhaps) is not copied.
            return;
        }
        match result {
            Some(result) => {
                let result = result.clone();
                self.finish_with(move |hook| hook.end(&result));
            }
            None => self.finish_with(|hook| hook.failed("Job cancelled", None)),
        }
    }

    /// Sends an `error` final event with `message` (a job that never ran).
    fn end_with_error(self, message: &'static str) {
        self.finish_with(move |hook| hook.failed(message, None));
    }

    fn finish_with(self, last: impl FnOnce(&ProgressHook) + Send + 'static) {
        if matches!(self, JobWebhook::Off) {
            return;
        }
        tokio::spawn(
            async move {
                let hook = match self {
                    JobWebhook::Off => return,
                    JobWebhook::Ready(hook) => hook,
                    JobWebhook::Checking { check, early } => match check.await {
                        Ok(Some(hook)) => {
                            early.iter().for_each(|s| hook.snapshot(s));
                            hook
                        }
                        _ => return,
                    },
                };
                last(&hook);
                hook.finish().await;
            }
            .in_current_span(),
        );
    }
}

impl ProgressSink for JobWebhook {
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        JobWebhook::snapshot(self, snapshot);
    }

    /// A live preview, for a job that asked for them (the hook knows); while the URL is still
    /// being checked, previews are skipped (the next one comes soon).
    fn node_event(&mut self, event: &NodeEvent) {
        if let (
            JobWebhook::Ready(hook),
            NodeEvent::Preview {
                node, mime, data, ..
            },
        ) = (self, event)
        {
            hook.preview(preview_body(node.as_deref(), mime, data));
        }
    }
}

/// The pipelined loop's signal that a running job is close to done.
struct NearDone {
    flag: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl NearDone {
    fn raise(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

/// When the pipelined loop takes the next job: the running job's sampler has at most one step
/// left (a progress step at `max - 1` or `max`, of a node with more than one step), or a node
/// delivered outputs, or the prompt ended. From then on ComfyUI has little left to do for it, so
/// the next prompt, queued behind it, starts without a gap; taken earlier, the next job would
/// sit in this worker's queue while another worker may be idle.
fn close_to_done(s: &ProgressSnapshot) -> bool {
    match s.kind {
        ProgressKind::Progress => s.max.0 > 1.0 && s.value.0 >= s.max.0 - 1.0,
        ProgressKind::Executed
        | ProgressKind::Finished
        | ProgressKind::Error
        | ProgressKind::Interrupted => true,
        _ => false,
    }
}

/// The result of a job taken in a batch but not started before SIGTERM.
pub(crate) const NOT_STARTED: &str =
    "Worker shutting down: the job was not started; submit it again";

/// The job's deadline: `JOB_TIMEOUT_S`, or the input's `timeout_s` when shorter (or when no
/// worker-wide timeout is set).
fn job_deadline(worker: Option<Duration>, input: Option<Duration>) -> Option<Deadline> {
    let after = match (worker, input) {
        (Some(w), Some(r)) => w.min(r),
        (w, r) => w.or(r)?,
    };
    Some(Deadline::new(after, DeadlineSource::WorkerOrInput))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_is_the_shorter_of_job_timeout_s_and_timeout_s() {
        let s = Duration::from_secs;
        let after = |w, i| job_deadline(w, i).map(|d| d.after);
        assert_eq!(after(None, None), None);
        assert_eq!(after(Some(s(60)), None), Some(s(60)));
        assert_eq!(after(None, Some(s(5))), Some(s(5)));
        assert_eq!(after(Some(s(60)), Some(s(600))), Some(s(60)));
        let d = job_deadline(Some(s(1)), None).unwrap();
        assert_eq!(d.source, DeadlineSource::WorkerOrInput);
        assert_eq!(d.wind_down, None);
    }
}
