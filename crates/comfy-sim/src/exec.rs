//! The prompt worker (`main.py prompt_worker` + `execution.PromptExecutor`): one prompt at a time in queue
//! order, the classic output cache (a node is cached when its signature — class, inputs, ancestors, and for
//! LoadImage the file's bytes — was computed by the previous prompt), the real `ExecutionList` order, and
//! every WebSocket message with the real shapes, order and routing: `execution_start`, `execution_cached`,
//! cumulative `progress_state`, `executing`, `progress`, previews, `executed`, the terminal events, then the
//! history entry, `status` and `executing{node: null}`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::catalog::NodeClass;
use super::nodes::{self, NodeCtx, NodeObject, OutValue};
pub(crate) use super::prompt_run::{now_ms, Failure, PromptRun};
use super::store::{Files, QueueItem};
use super::{lock, pyfmt, Pause, Shared};

/// Run prompts until the simulator shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut executor = Executor {
        shared: shared.clone(),
        cache: HashMap::new(),
        objects: HashMap::new(),
    };
    loop {
        if shared.control.free_memory.swap(false, Ordering::SeqCst) {
            executor.cache.clear();
            executor.objects.clear();
        }
        let item = {
            let mut store = lock(&shared.store);
            let item = store.queue.take_next();
            if item.is_some() {
                shared.announce_queue(&store);
            }
            item
        };
        match item {
            Some(item) => {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = executor.run_prompt(item) => {}
                }
            }
            None => {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = shared.control.wake.notified() => {}
                }
            }
        }
    }
}

/// The worker's state that outlives a prompt.
struct Executor {
    shared: Arc<Shared>,
    /// Output cache by node signature.
    cache: HashMap<String, CacheEntry>,
    /// Per `(node id, class)` node instances (PreviewImage keeps its random file prefix).
    objects: HashMap<(String, String), NodeObject>,
}

/// A cached node result.
#[derive(Clone)]
struct CacheEntry {
    outputs: Arc<Vec<OutValue>>,
    ui: Option<Map<String, Value>>,
}

impl Executor {
    async fn run_prompt(&mut self, item: QueueItem) {
        let shared = self.shared.clone();
        shared.control.interrupt.store(false, Ordering::SeqCst);
        let client_id = route_of(item.extra_data.get("client_id"));
        {
            let mut current = lock(&shared.control.current);
            current.client_id = client_id.clone();
            current.last_node = None;
        }
        let mut run = PromptRun::new(shared.clone(), item.prompt_id.clone(), client_id);
        let prompt = &item.prompt;
        run.add_message(
            "execution_start",
            json!({"prompt_id": item.prompt_id}),
            false,
        );
        lock(&shared.log).executions.push(super::ExecutionMark {
            prompt_id: item.prompt_id.clone(),
            started_us: super::wall_clock_us(),
            succeeded_us: None,
        });

        let signatures = signatures(&shared, prompt);
        let live: HashSet<&String> = signatures.values().collect();
        self.cache.retain(|key, _| live.contains(key));
        self.objects.retain(|(id, class), _| {
            prompt
                .get(id)
                .and_then(|n| n.get("class_type"))
                .and_then(Value::as_str)
                == Some(class.as_str())
        });
        let cached: HashSet<String> = prompt
            .keys()
            .filter(|id| {
                signatures
                    .get(*id)
                    .is_some_and(|s| self.cache.contains_key(s))
            })
            .cloned()
            .collect();
        let cached_in_order: Vec<&String> =
            prompt.keys().filter(|id| cached.contains(*id)).collect();
        run.add_message(
            "execution_cached",
            json!({"nodes": cached_in_order, "prompt_id": item.prompt_id}),
            false,
        );

        // Cached nodes do not run, but their outputs feed the nodes that do (`get_input_data`
        // reads the output cache).
        let results = cached
            .iter()
            .filter_map(|id| {
                let entry = self.cache.get(signatures.get(id)?)?;
                Some((id.clone(), entry.outputs.clone()))
            })
            .collect();
        let mut state = RunState {
            results,
            executed: Vec::new(),
            ui_outputs: Map::new(),
            meta: Map::new(),
        };
        let outcome = self
            .execute_outputs(&mut run, &mut state, &item, &signatures, &cached)
            .await;
        let success = outcome.is_ok();
        if let Err((node_id, failure)) = outcome {
            self.report_failure(&mut run, &state, &item, &node_id, failure);
        } else {
            run.add_message(
                "execution_success",
                json!({"prompt_id": item.prompt_id}),
                false,
            );
            let at = super::wall_clock_us();
            if let Some(mark) = lock(&shared.log)
                .executions
                .iter_mut()
                .rev()
                .find(|m| m.prompt_id == item.prompt_id)
            {
                mark.succeeded_us = Some(at);
            }
            // One line per prompt, with the wall-clock stamp of its `execution_success`, so a
            // benchmark in another process can measure from ComfyUI's own end.
            tracing::info!(prompt_id = %item.prompt_id, unix_us = at, "execution_success sent");
        }
        lock(&shared.control.current).last_node = None;
        hold_before_history(&shared).await;

        let entry = json!({
            "prompt": item.to_history_json(),
            "outputs": state.ui_outputs,
            "status": {
                "status_str": if success { "success" } else { "error" },
                "completed": success,
                "messages": run.messages,
            },
            "meta": state.meta,
        });
        {
            let mut store = lock(&shared.store);
            store.queue.task_done(&item.prompt_id, entry);
            shared.announce_queue(&store);
        }
        shared.reached(super::DropPoint::BeforeCompletion);
        run.to_client_only(
            "executing",
            json!({"node": null, "prompt_id": item.prompt_id}),
        );
        lock(&shared.log)
            .completions
            .push((item.prompt_id.clone(), std::time::Instant::now()));
        tracing::debug!(prompt_id = %item.prompt_id, success, "prompt finished");
    }

    /// `execute_async`'s loop over the `ExecutionList`.
    async fn execute_outputs(
        &mut self,
        run: &mut PromptRun,
        state: &mut RunState,
        item: &QueueItem,
        signatures: &HashMap<String, String>,
        cached: &HashSet<String>,
    ) -> Result<(), (String, Failure)> {
        let shared = self.shared.clone();
        let catalog = &shared.catalog;
        let prompt = &item.prompt;
        let mut list = ExecList::default();
        for output in &item.outputs {
            list.add_node(output, |id| dependencies(catalog, prompt, id), cached);
        }
        let is_output = |id: &str| node_class(catalog, prompt, id).is_some_and(|c| c.is_output());
        while !list.pending.is_empty() {
            let Some(id) = list.stage(is_output) else {
                let blamed = list.pending.first().cloned().unwrap_or_default();
                let failure = Failure::Error {
                    exception_type: "graph.DependencyCycleError".into(),
                    message: "Dependency cycle detected".into(),
                    traceback: Vec::new(),
                };
                return Err((blamed, failure));
            };
            if let Err(failure) = self
                .execute_node(run, state, item, &id, signatures, cached)
                .await
            {
                return Err((id, failure));
            }
            list.complete(&id);
        }
        Ok(())
    }

    /// `execution.execute` for one node.
    async fn execute_node(
        &mut self,
        run: &mut PromptRun,
        state: &mut RunState,
        item: &QueueItem,
        id: &str,
        signatures: &HashMap<String, String>,
        cached: &HashSet<String>,
    ) -> Result<(), Failure> {
        let shared = self.shared.clone();
        let prompt = &item.prompt;
        let class_type = prompt
            .get(id)
            .and_then(|n| n.get("class_type"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let signature = signatures.get(id).cloned().unwrap_or_default();

        if cached.contains(id) {
            let entry = self.cache.get(&signature).cloned().unwrap_or(CacheEntry {
                outputs: Arc::new(Vec::new()),
                ui: None,
            });
            let ui = entry.ui.map(|ui| run.enrich(ui));
            run.to_client_only(
                "executed",
                json!({"node": id, "display_node": id, "output": ui, "prompt_id": run.prompt_id}),
            );
            if let Some(ui) = ui {
                state.record_ui(id, ui);
            }
            run.progress_cached(id);
            state.results.insert(id.to_owned(), entry.outputs);
            return Ok(());
        }

        run.progress_start(id);
        if run.client_id.is_some() {
            lock(&shared.control.current).last_node = Some(id.to_owned());
            run.to_client_only(
                "executing",
                json!({"node": id, "display_node": id, "prompt_id": run.prompt_id}),
            );
        }
        if shared.interrupted() {
            return Err(Failure::Interrupted);
        }

        let Some(class) = shared.catalog.class(class_type) else {
            return Err(Failure::Error {
                exception_type: "KeyError".into(),
                message: pyfmt::str_repr(class_type),
                traceback: Vec::new(),
            });
        };
        let inputs = resolve_inputs(class, prompt.get(id), &state.results);
        let object = self
            .objects
            .entry((id.to_owned(), class_type.to_owned()))
            .or_default();
        let node = NodeCtx {
            id,
            class_type,
            class,
            inputs: &inputs,
            prompt,
            extra_data: &item.extra_data,
        };
        let output = nodes::run(&node, run, object).await?;

        let outputs = Arc::new(output.outputs);
        let ui = output.ui.filter(|ui| !ui.is_empty());
        self.cache.insert(
            signature,
            CacheEntry {
                outputs: outputs.clone(),
                ui: ui.clone(),
            },
        );
        state.results.insert(id.to_owned(), outputs);
        if let Some(ui) = ui.map(|ui| run.enrich(ui)) {
            run.to_client_only(
                "executed",
                json!({"node": id, "display_node": id, "output": ui, "prompt_id": run.prompt_id}),
            );
            state.record_ui(id, ui);
        }
        run.progress_finish(id);
        state.executed.push(id.to_owned());
        Ok(())
    }

    /// `handle_execution_error`.
    fn report_failure(
        &self,
        run: &mut PromptRun,
        state: &RunState,
        item: &QueueItem,
        node_id: &str,
        failure: Failure,
    ) {
        let prompt = &item.prompt;
        let node_type = prompt
            .get(node_id)
            .and_then(|n| n.get("class_type"))
            .cloned()
            .unwrap_or(Value::Null);
        let executed: Vec<&String> = state.executed.iter().rev().collect();
        match failure {
            Failure::Interrupted => {
                let data = json!({
                    "prompt_id": item.prompt_id,
                    "node_id": node_id,
                    "node_type": node_type,
                    "executed": executed,
                });
                run.add_message("execution_interrupted", data, true);
            }
            Failure::Error {
                exception_type,
                message,
                traceback,
            } => {
                let current_inputs = if exception_type == "graph.DependencyCycleError" {
                    json!([])
                } else {
                    current_inputs(
                        &self.shared,
                        prompt,
                        node_id,
                        &item.extra_data,
                        &state.results,
                    )
                };
                let current_outputs: Vec<&String> = prompt.keys().rev().collect();
                let data = json!({
                    "prompt_id": item.prompt_id,
                    "node_id": node_id,
                    "node_type": node_type,
                    "executed": executed,
                    "exception_message": format!("{message}\n"),
                    "exception_type": exception_type,
                    "traceback": traceback,
                    "current_inputs": current_inputs,
                    "current_outputs": current_outputs,
                });
                run.add_message("execution_error", data, false);
            }
        }
    }
}

/// Results of the nodes of the running prompt.
struct RunState {
    results: HashMap<String, Arc<Vec<OutValue>>>,
    /// Nodes that actually ran (cached ones excluded), in order.
    executed: Vec<String>,
    ui_outputs: Map<String, Value>,
    meta: Map<String, Value>,
}

impl RunState {
    fn record_ui(&mut self, id: &str, ui: Map<String, Value>) {
        self.ui_outputs.insert(id.to_owned(), Value::Object(ui));
        self.meta.insert(
            id.to_owned(),
            json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}),
        );
    }
}

/// Stops at an armed [`super::Simulator::hold_history`] until it is released.
async fn hold_before_history(shared: &Shared) {
    let hold = &shared.control.history;
    let stopped = hold.send_if_modified(|p| {
        if matches!(*p, Pause::Armed(_)) {
            *p = Pause::Paused;
            true
        } else {
            false
        }
    });
    if stopped {
        let mut rx = hold.subscribe();
        let _ = rx.wait_for(|p| *p != Pause::Paused).await;
    }
}

/// A node's declared input values for the simulated implementation.
fn resolve_inputs(
    class: NodeClass<'_>,
    node: Option<&Value>,
    results: &HashMap<String, Arc<Vec<OutValue>>>,
) -> Vec<(String, Option<OutValue>)> {
    let Some(inputs) = node
        .and_then(|n| n.get("inputs"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let declared: HashSet<&str> = class.inputs().iter().map(|d| d.name).collect();
    inputs
        .iter()
        .filter(|(name, _)| declared.contains(name.as_str()))
        .map(|(name, value)| {
            let resolved = match as_link(value) {
                Some((from, slot)) => results
                    .get(from)
                    .and_then(|outs| slot_of(outs, slot))
                    .cloned(),
                None => Some(OutValue::Json(value.clone())),
            };
            (name.clone(), resolved)
        })
        .collect()
}

fn slot_of(outputs: &[OutValue], slot: i64) -> Option<&OutValue> {
    let index = if slot < 0 {
        slot + outputs.len() as i64
    } else {
        slot
    };
    usize::try_from(index).ok().and_then(|i| outputs.get(i))
}

/// `is_link`: `[node_id: str, slot: int]`.
pub(crate) fn as_link(value: &Value) -> Option<(&str, i64)> {
    let link = value.as_array()?;
    if link.len() != 2 {
        return None;
    }
    let from = link[0].as_str()?;
    let slot = match &link[1] {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
        _ => return None,
    };
    Some((from, slot))
}

fn node_class<'a>(
    catalog: &'a super::catalog::Catalog,
    prompt: &Map<String, Value>,
    id: &str,
) -> Option<NodeClass<'a>> {
    let class_type = prompt.get(id)?.get("class_type")?.as_str()?;
    catalog.class(class_type)
}

/// Source nodes of a node's declared link inputs, in input order.
fn dependencies(
    catalog: &super::catalog::Catalog,
    prompt: &Map<String, Value>,
    id: &str,
) -> Vec<String> {
    let Some(class) = node_class(catalog, prompt, id) else {
        return Vec::new();
    };
    let Some(inputs) = prompt
        .get(id)
        .and_then(|n| n.get("inputs"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let declared: HashSet<&str> = class.inputs().iter().map(|d| d.name).collect();
    inputs
        .iter()
        .filter(|(name, _)| declared.contains(name.as_str()))
        .filter_map(|(_, value)| as_link(value))
        .filter(|(from, _)| prompt.contains_key(*from))
        .map(|(from, _)| from.to_owned())
        .collect()
}

/// `comfy_execution.graph.ExecutionList`: pending nodes, how many unfinished nodes block each, and whom
/// each blocks.
#[derive(Default)]
struct ExecList {
    pending: Vec<String>,
    in_pending: HashSet<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, Vec<String>>,
}

impl ExecList {
    fn add_node(
        &mut self,
        root: &str,
        deps: impl Fn(&str) -> Vec<String>,
        cached: &HashSet<String>,
    ) {
        let mut stack = vec![root.to_owned()];
        let mut links = Vec::new();
        while let Some(id) = stack.pop() {
            if !self.in_pending.insert(id.clone()) {
                continue;
            }
            self.pending.push(id.clone());
            self.block_count.insert(id.clone(), 0);
            self.blocking.insert(id.clone(), Vec::new());
            for from in deps(&id) {
                if !cached.contains(&from) {
                    stack.push(from.clone());
                }
                links.push((from, id.clone()));
            }
        }
        for (from, to) in links {
            if cached.contains(&from) {
                continue;
            }
            let blocked = self.blocking.entry(from).or_default();
            if !blocked.contains(&to) {
                blocked.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    /// `stage_node_execution` + `ux_friendly_pick_node`; `None` when nothing is ready (a cycle).
    fn stage(&self, is_output: impl Fn(&str) -> bool) -> Option<String> {
        let ready: Vec<&String> = self
            .pending
            .iter()
            .filter(|id| self.block_count.get(*id).copied().unwrap_or(0) == 0)
            .collect();
        let blocks = |id: &str| self.blocking.get(id).map_or(&[][..], Vec::as_slice);
        ready
            .iter()
            .find(|id| is_output(id))
            .or_else(|| {
                ready
                    .iter()
                    .find(|id| blocks(id).iter().any(|b| is_output(b)))
            })
            .or_else(|| {
                ready.iter().find(|id| {
                    blocks(id)
                        .iter()
                        .any(|b| blocks(b).iter().any(|c| is_output(c)))
                })
            })
            .or_else(|| ready.first())
            .map(|id| (*id).clone())
    }

    fn complete(&mut self, id: &str) {
        self.pending.retain(|p| p != id);
        self.in_pending.remove(id);
        for to in self.blocking.get(id).cloned().unwrap_or_default() {
            if let Some(count) = self.block_count.get_mut(&to) {
                *count = count.saturating_sub(1);
            }
        }
    }
}

/// Cache keys of every prompt node: class, `IS_CHANGED`, literal inputs and the ancestors' keys (computed
/// in dependency order without recursion; nodes in or behind a cycle get a key that never matches).
fn signatures(shared: &Shared, prompt: &Map<String, Value>) -> HashMap<String, String> {
    let catalog = &shared.catalog;
    let deps: HashMap<&String, Vec<String>> = prompt
        .keys()
        .map(|id| (id, dependencies(catalog, prompt, id)))
        .collect();
    let mut waiting: HashMap<&String, usize> = deps.iter().map(|(id, d)| (*id, d.len())).collect();
    let mut dependents: HashMap<&str, Vec<&String>> = HashMap::new();
    for (id, d) in &deps {
        for from in d {
            dependents.entry(from.as_str()).or_default().push(id);
        }
    }
    let mut ready: VecDeque<&String> = prompt
        .keys()
        .filter(|id| waiting.get(id) == Some(&0))
        .collect();
    let mut sigs: HashMap<String, String> = HashMap::new();
    let files = {
        let store = lock(&shared.store);
        file_hashes(&store.files, prompt)
    };
    while let Some(id) = ready.pop_front() {
        let sig = node_signature(catalog, prompt, id, &sigs, &files);
        sigs.insert(id.clone(), sig);
        for dependent in dependents.get(id.as_str()).map_or(&[][..], Vec::as_slice) {
            if let Some(w) = waiting.get_mut(dependent) {
                *w = w.saturating_sub(1);
                if *w == 0 {
                    ready.push_back(dependent);
                }
            }
        }
    }
    for id in prompt.keys() {
        sigs.entry(id.clone())
            .or_insert_with(|| format!("uncacheable:{}", uuid::Uuid::new_v4()));
    }
    sigs
}

/// Hashes of the files LoadImage nodes name (their `IS_CHANGED` is the file's sha256).
fn file_hashes(files: &Files, prompt: &Map<String, Value>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for node in prompt.values() {
        let Some(name) = node
            .get("inputs")
            .and_then(|i| i.get("image"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        let hash = Files::resolve_annotated(name)
            .and_then(|(folder, rel)| files.get(folder, &rel))
            .map_or_else(
                || "missing".to_owned(),
                |bytes| format!("{:016x}", fnv1a(bytes)),
            );
        out.insert(name.to_owned(), hash);
    }
    out
}

fn node_signature(
    catalog: &super::catalog::Catalog,
    prompt: &Map<String, Value>,
    id: &str,
    sigs: &HashMap<String, String>,
    files: &HashMap<String, String>,
) -> String {
    let node = prompt.get(id);
    let class_type = node
        .and_then(|n| n.get("class_type"))
        .cloned()
        .unwrap_or(Value::Null);
    let class = class_type.as_str().and_then(|c| catalog.class(c));
    let is_changed = match class_type.as_str() {
        Some("LoadImage" | "LoadImageMask") => node
            .and_then(|n| n.get("inputs"))
            .and_then(|i| i.get("image"))
            .and_then(Value::as_str)
            .and_then(|name| files.get(name))
            .map_or(Value::Null, |h| Value::String(h.clone())),
        // `IS_CHANGED` returns the time: never cached.
        Some("SaveImageWebsocket") => Value::String(uuid::Uuid::new_v4().to_string()),
        _ => Value::Null,
    };
    let with_id = class.is_some_and(|c| c.hidden().iter().any(|(_, kind)| *kind == "UNIQUE_ID"));
    let mut inputs: Vec<(String, Value)> = node
        .and_then(|n| n.get("inputs"))
        .and_then(Value::as_object)
        .map(|inputs| {
            inputs
                .iter()
                .map(|(name, value)| {
                    let key = match as_link(value)
                        .and_then(|(from, slot)| Some((sigs.get(from)?, slot)))
                    {
                        Some((sig, slot)) => {
                            json!(["<link>", format!("{:016x}", fnv1a(sig.as_bytes())), slot])
                        }
                        None => value.clone(),
                    };
                    (name.clone(), key)
                })
                .collect()
        })
        .unwrap_or_default();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    let node_id = if with_id {
        Value::String(id.to_owned())
    } else {
        Value::Null
    };
    pyfmt::to_json(&json!([class_type, is_changed, node_id, inputs]))
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `execution_error.current_inputs`: `{input: [format_value(x)]}` plus the hidden inputs.
fn current_inputs(
    shared: &Shared,
    prompt: &Map<String, Value>,
    id: &str,
    extra_data: &Map<String, Value>,
    results: &HashMap<String, Arc<Vec<OutValue>>>,
) -> Value {
    let mut out = Map::new();
    let Some(class) = node_class(&shared.catalog, prompt, id) else {
        return Value::Object(out);
    };
    for (name, value) in resolve_inputs(class, prompt.get(id), results) {
        let formatted = value.map_or(Value::Null, |v| v.format_value());
        out.insert(name, json!([formatted]));
    }
    for (name, kind) in class.hidden() {
        let value = match kind {
            "PROMPT" => Value::String(pyfmt::py_repr(&Value::Object(prompt.clone()))),
            "EXTRA_PNGINFO" => extra_data
                .get("extra_pnginfo")
                .map_or(Value::Null, |v| OutValue::Json(v.clone()).format_value()),
            "UNIQUE_ID" => Value::String(id.to_owned()),
            _ => continue,
        };
        out.insert(name.to_owned(), json!([value]));
    }
    Value::Object(out)
}

/// How `client_id` routes messages: a string is a socket id, `None`/absent means "no client".
fn route_of(client_id: Option<&Value>) -> Option<String> {
    match client_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // Python compares the id with string socket keys, so a non-string id never matches a socket.
        Some(other) => Some(format!("\u{0}{}", pyfmt::py_repr(other))),
    }
}
