//! The ComfyUIs a worker runs jobs on: one [`Runner`] per ComfyUI that `COMFY_HOST` names (one
//! per GPU with `COMFY_HOST=a,b`), which of them take jobs, and their warm-ups.
//!
//! A ComfyUI whose job failed talking to it (it crashed, was killed or stopped answering) is set
//! aside at once and probed every second until it answers again; meanwhile its front end gives
//! jobs to the others. When every ComfyUI is set aside, jobs go to them anyway and fail or wait
//! for them as they would with a single ComfyUI. With one ComfyUI nothing is ever set aside.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Runner;
use crate::housekeeping::warmup::{WarmupError, WarmupState};
use crate::job::{Completed, JobFailure};
use crate::metrics::Metrics;

/// How often a ComfyUI set aside is asked whether it answers again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The runners of a worker, one per ComfyUI; cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    instances: Vec<Instance>,
    /// Bumped whenever a ComfyUI is set aside or comes back.
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct Instance {
    runner: Runner,
    /// Set aside: its last job could not talk to it, and it has not answered since.
    aside: AtomicBool,
}

impl Pool {
    /// One runner per ComfyUI `runner`'s engine names (see [`crate::job::Engine::instances`]),
    /// each with `runner`'s shutdown grace and metrics; `runner` itself when it names one.
    pub fn new(runner: Runner) -> Pool {
        let engines = runner.engine().instances();
        let runners = if engines.len() == 1 {
            vec![runner]
        } else {
            engines
                .into_iter()
                .map(|engine| runner.for_engine(engine))
                .collect()
        };
        let metrics = runners[0].metrics();
        for r in &runners {
            metrics.instance_up(r.engine().comfy().host(), true);
        }
        if runners.len() > 1 {
            let hosts: Vec<&str> = runners.iter().map(|r| r.engine().comfy().host()).collect();
            info!(instances = runners.len(), comfy = ?hosts, "one job at a time on each ComfyUI");
        }
        Pool {
            inner: Arc::new(Inner {
                instances: runners
                    .into_iter()
                    .map(|runner| Instance {
                        runner,
                        aside: AtomicBool::new(false),
                    })
                    .collect(),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// How many ComfyUIs.
    pub fn len(&self) -> usize {
        self.inner.instances.len()
    }

    /// Never empty; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The runner of ComfyUI `i` (`0..len()`).
    pub fn runner(&self, i: usize) -> &Runner {
        &self.inner.instances[i].runner
    }

    /// The first ComfyUI's runner: the one for what is not a job's (settings, the page's
    /// ComfyUI checks).
    pub fn first(&self) -> &Runner {
        self.runner(0)
    }

    /// The metrics every runner counts in.
    pub fn metrics(&self) -> Metrics {
        self.first().metrics()
    }

    /// Runs every ComfyUI's warm-up at once (each loads its own GPU); the first failure, if
    /// any, is the reason the worker is unhealthy.
    pub async fn warm_up(&self, shutdown: &CancellationToken) -> Result<(), WarmupError> {
        join_all(
            self.inner
                .instances
                .iter()
                .map(|i| i.runner.warm_up(shutdown)),
        )
        .await
        .into_iter()
        .collect()
    }

    /// Where the warm-ups are, as one: failed when one failed, running while one runs, else
    /// the first's (all done, or all off).
    pub fn warmup_state(&self) -> WarmupState {
        let states: Vec<WarmupState> = self
            .inner
            .instances
            .iter()
            .map(|i| i.runner.warmup_state())
            .collect();
        if let Some(failed) = states.iter().find(|s| matches!(s, WarmupState::Failed(_))) {
            return failed.clone();
        }
        if states.iter().any(|s| matches!(s, WarmupState::Running)) {
            return WarmupState::Running;
        }
        states.into_iter().next().unwrap_or(WarmupState::Off)
    }

    /// Whether ComfyUI `i` takes jobs now: it is not set aside, or every one is.
    pub fn takes_jobs(&self, i: usize) -> bool {
        let aside = |x: &Instance| x.aside.load(Ordering::SeqCst);
        !aside(&self.inner.instances[i]) || self.inner.instances.iter().all(aside)
    }

    /// A receiver that changes whenever a ComfyUI is set aside or comes back.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Tells the pool how a job on ComfyUI `i` ended: one that failed talking to ComfyUI sets
    /// it aside (with several ComfyUIs) until it answers again.
    pub fn job_ended(&self, i: usize, result: &Result<Completed, JobFailure>) {
        let lost = matches!(
            result,
            Err(JobFailure::Comfy(_) | JobFailure::ComfyUnreachable(_))
        );
        if lost && self.len() > 1 {
            self.set_aside(i);
        }
    }

    fn set_aside(&self, i: usize) {
        let instance = &self.inner.instances[i];
        if instance.aside.swap(true, Ordering::SeqCst) {
            return; // already being probed
        }
        let host = instance.runner.engine().comfy().host().to_owned();
        warn!(comfy = %host, "a job could not talk to this ComfyUI: it takes no jobs until it answers again; the others take them");
        instance.runner.metrics().instance_up(&host, false);
        self.inner.changed.send_modify(|n| *n += 1);
        tokio::spawn(probe(Arc::downgrade(&self.inner), i));
    }
}

/// Asks ComfyUI `i` every [`PROBE_EVERY`] whether it answers; once it does, it takes jobs again.
/// Ends with the pool.
async fn probe(pool: Weak<Inner>, i: usize) {
    loop {
        let Some(comfy) = pool
            .upgrade()
            .map(|p| p.instances[i].runner.engine().comfy().clone())
        else {
            return;
        };
        let answered = matches!(
            tokio::time::timeout(PROBE_EVERY, comfy.system_stats()).await,
            Ok(Ok(_))
        );
        if answered {
            if let Some(inner) = pool.upgrade() {
                let instance = &inner.instances[i];
                instance.aside.store(false, Ordering::SeqCst);
                instance.runner.metrics().instance_up(comfy.host(), true);
                info!(comfy = %comfy.host(), "ComfyUI answers again and takes jobs");
                inner.changed.send_modify(|n| *n += 1);
            }
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
