//! The contract's `JobError` of a job that ended badly, from the runner's typed result: one
//! code per kind of failure (`node_execution_error` with the node, its class and ComfyUI's
//! traceback; `invalid_workflow` with ComfyUI's node errors in `details`; ...). A client cancel
//! has no error (its status says it all). The codes avoid the Comfy Router's bucket names, which
//! the Comfy SDK turns into other exception classes.

use serde_json::{json, Map, Value};

use crate::comfy::ExecutionFailure;
use crate::job::{Completed, JobFailure};

/// The `JobError` object, or `None` for a job that succeeded or was cancelled by its client.
/// `node_failure` is the node failure ComfyUI reported during the prompt, if any: a job that
/// still returned outputs then fails too.
pub(crate) fn job_error(
    result: &Result<Completed, JobFailure>,
    node_failure: Option<&ExecutionFailure>,
) -> Option<Value> {
    let failure = match result {
        Ok(_) => return node_failure.map(node_error),
        Err(f) => f,
    };
    let (code, details) = match failure {
        JobFailure::Cancelled(_) => return None,
        JobFailure::NodeError(_) => match node_failure {
            Some(f) => return Some(node_error(f)),
            None => ("node_execution_error", None),
        },
        JobFailure::Rejected(_, nodes) => {
            let node_errors: Map<String, Value> = nodes
                .iter()
                .map(|n| (n.node_id.clone(), n.to_json()))
                .collect();
            (
                "invalid_workflow",
                Some(json!({ "node_errors": node_errors })),
            )
        }
        JobFailure::BadInput(_) | JobFailure::Conversion(_) => ("invalid_workflow", None),
        JobFailure::InputFiles(_) | JobFailure::Upload(_) => ("input_unavailable", None),
        JobFailure::Storage(_) => ("storage_error", None),
        JobFailure::ComfyUnreachable(_) => ("upstream_unreachable", None),
        JobFailure::Comfy(_) => ("upstream_error", None),
        JobFailure::Interrupted(_) => ("interrupted", None),
        JobFailure::NoOutput(_) => ("no_outputs", None),
        JobFailure::OutputTooLarge(_) => ("output_too_large", None),
        JobFailure::Deadline { .. } => ("job_timeout", None),
        JobFailure::Shutdown { .. } => ("shutdown", None),
        JobFailure::Panic(_) => ("worker_error", None),
    };
    let mut error = json!({"code": code, "message": failure.message()});
    if let Some(details) = details {
        error["details"] = details;
    } else if let Some(lines) = failure.details() {
        error["details"] = json!({ "lines": lines });
    }
    Some(error)
}

/// The error of a job that never ran (the endpoint shut down first, or its warm-up failed).
pub(crate) fn not_run(why: &str) -> Value {
    json!({"code": "not_started", "message": why})
}

fn node_error(f: &ExecutionFailure) -> Value {
    let message = if f.message.is_empty() {
        "execution failed".to_owned()
    } else if f.exception_type.is_empty() {
        f.message.clone()
    } else {
        format!("{}: {}", f.exception_type, f.message)
    };
    let traceback = (!f.traceback.is_empty()).then(|| f.traceback.concat());
    json!({
        "code": "node_execution_error",
        "message": message,
        "node_id": (!f.node_id.is_empty()).then_some(&f.node_id),
        "class_type": (!f.node_type.is_empty()).then_some(&f.node_type),
        "traceback": traceback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::{NodeErrors, ValidationReason};
    use crate::job::Report;

    #[test]
    fn failures_get_codes_and_node_detail() {
        let failure = ExecutionFailure {
            node_id: "3".into(),
            node_type: "KSampler".into(),
            exception_type: "RuntimeError".into(),
            message: "boom".into(),
            traceback: vec!["  File x\n".into(), "RuntimeError: boom\n".into()],
        };
        let e = job_error(
            &Err(JobFailure::NodeError(Report::new("x"))),
            Some(&failure),
        )
        .unwrap();
        assert_eq!(e["code"], "node_execution_error");
        assert_eq!(e["message"], "RuntimeError: boom");
        assert_eq!(e["node_id"], "3");
        assert_eq!(e["class_type"], "KSampler");
        assert_eq!(e["traceback"], "  File x\nRuntimeError: boom\n");
        let nodes = vec![NodeErrors {
            node_id: "1".into(),
            class_type: Some("EmptyImage".into()),
            errors: vec![ValidationReason {
                kind: "value_smaller_than_min".into(),
                message: "Value 0 smaller than min of 1".into(),
                details: "width".into(),
                input_name: Some("width".into()),
            }],
            dependent_outputs: vec!["3".into()],
        }];
        let e = job_error(&Err(JobFailure::Rejected(Report::new("bad"), nodes)), None).unwrap();
        assert_eq!(e["code"], "invalid_workflow");
        assert_eq!(
            e["details"]["node_errors"]["1"]["errors"][0]["type"],
            "value_smaller_than_min"
        );
        assert_eq!(
            job_error(&Err(JobFailure::Cancelled(Report::new("c"))), None),
            None
        );
    }
}
