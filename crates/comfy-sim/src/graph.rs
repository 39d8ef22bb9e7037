//! Prompt validation, a port of `execution.py`'s `validate_prompt` / `validate_inputs` (ComfyUI 0.3.64) over
//! the recorded object_info: the `invalid_prompt` / `prompt_no_outputs` checks, then per output node a
//! recursive walk that reports `node_errors` with the real types, messages and details. Like the original it
//! converts literal INT/FLOAT/STRING/BOOLEAN values in place (the queued prompt holds the converted values)
//! and turns Python exceptions (a link to a missing node is a `KeyError`) into `exception_during_*` reasons.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::catalog::InputDef;
use super::pyfmt::{py_eq, py_repr, py_str, type_name};
use super::{lock, Shared};

/// Python's default recursion limit, minus the frames the server itself uses.
const RECURSION_LIMIT: usize = 980;
/// Validation recursion needs a big stack for deep (or cyclic) graphs; it runs on its own thread.
const VALIDATION_STACK: usize = 64 * 1024 * 1024;
/// Classes whose `VALIDATE_INPUTS(image)` replaces the combo check of `image`.
const IMAGE_FILE_VALIDATORS: [&str; 2] = ["LoadImage", "LoadImageMask"];

/// What `POST /prompt` does with a prompt.
pub(crate) enum Validation {
    /// Queue it: the outputs that passed, and errors of the ones that did not (may be non-empty).
    Valid {
        outputs: Vec<String>,
        node_errors: Map<String, Value>,
    },
    /// Answer 400 `{"error", "node_errors"}`.
    Rejected {
        error: Value,
        node_errors: Map<String, Value>,
    },
    /// The real server raises outside the validation handlers and answers 500.
    Internal,
}

/// Validate `prompt` the way the real server does, on a thread with a large stack. Returns the prompt with
/// the in-place conversions applied.
pub(crate) async fn validate(
    shared: Arc<Shared>,
    prompt: Value,
    partial: Option<Value>,
) -> (Validation, Value) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("sim-validate".into())
        .stack_size(VALIDATION_STACK)
        .spawn(move || {
            let mut prompt = prompt;
            let result = validate_prompt(&shared, &mut prompt, partial.as_ref());
            let _ = tx.send((result, prompt));
        });
    if spawned.is_err() {
        return (Validation::Internal, Value::Null);
    }
    rx.await.unwrap_or((Validation::Internal, Value::Null))
}

fn validate_prompt(shared: &Shared, prompt: &mut Value, partial: Option<&Value>) -> Validation {
    let map = match prompt {
        Value::Object(map) => map,
        Value::Array(items) if items.is_empty() => return no_outputs(),
        Value::String(s) if s.is_empty() => return no_outputs(),
        _ => return Validation::Internal,
    };

    let mut outputs = Vec::new();
    for (id, node) in map.iter() {
        let has_class_type = match node {
            Value::Object(o) => o.contains_key("class_type"),
            Value::String(s) => s.contains("class_type"),
            Value::Array(items) => items.iter().any(|v| v.as_str() == Some("class_type")),
            _ => return Validation::Internal,
        };
        if !has_class_type {
            return invalid_prompt(
                "Cannot execute because a node is missing the class_type property.",
                id,
            );
        }
        let Some(class_type) = node.as_object().and_then(|o| o.get("class_type")) else {
            return Validation::Internal;
        };
        if class_type.is_array() || class_type.is_object() {
            return Validation::Internal;
        }
        let Some(class) = class_type.as_str().and_then(|c| shared.catalog.class(c)) else {
            if shared.config.profile == super::Profile::Current {
                // Today's ComfyUI names the node by the title the user sees.
                let title = node
                    .get("_meta")
                    .and_then(|m| m.get("title"))
                    .and_then(Value::as_str)
                    .map_or_else(|| py_str(class_type), str::to_owned);
                return Validation::Rejected {
                    error: json!({
                        "type": "missing_node_type",
                        "message": format!("Node '{title}' not found. The custom node may not be installed."),
                        "details": format!("Node ID '#{id}'"),
                        "extra_info": {"node_id": id, "class_type": class_type, "node_title": title},
                    }),
                    node_errors: Map::new(),
                };
            }
            let message = format!(
                "Cannot execute because node {} does not exist.",
                py_str(class_type)
            );
            return invalid_prompt(&message, id);
        };
        if class.is_output() {
            let targeted = match partial {
                None | Some(Value::Null) => true,
                Some(Value::Array(targets)) => targets.iter().any(|t| t.as_str() == Some(id)),
                Some(Value::String(targets)) => targets.contains(id.as_str()),
                Some(_) => return Validation::Internal,
            };
            if targeted {
                outputs.push(id.clone());
            }
        }
    }
    if outputs.is_empty() {
        return no_outputs();
    }

    let mut validator = Validator {
        shared,
        prompt: map,
        validated: Vec::new(),
        index: HashMap::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<Vec<Value>> = Vec::new();
    let mut node_errors = Map::new();
    for output in &outputs {
        let (valid, reasons) = match validator.validate_inputs(output, 0) {
            Ok(result) => result,
            Err(ex) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": ex.message,
                    "extra_info": {"exception_type": ex.kind, "traceback": ex.traceback("validate_prompt")},
                })];
                validator.set_validated(output, false, reasons.clone());
                (false, reasons)
            }
        };
        if valid {
            good.push(output.clone());
            continue;
        }
        failed.push(reasons);
        for (node_id, ok, reasons) in &validator.validated {
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                let class_type = validator
                    .prompt
                    .get(node_id)
                    .and_then(|n| n.get("class_type"))
                    .cloned();
                json!({"errors": reasons, "dependent_outputs": [], "class_type": class_type})
            });
            if let Some(deps) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                deps.push(Value::String(output.clone()));
            }
        }
    }

    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flatten()
            .map(|r| format!("{}: {}", str_field(r, "message"), str_field(r, "details")))
            .collect();
        let error = json!({
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details.join("\n"),
            "extra_info": {},
        });
        return Validation::Rejected { error, node_errors };
    }
    Validation::Valid {
        outputs: good,
        node_errors,
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn invalid_prompt(message: &str, id: &str) -> Validation {
    Validation::Rejected {
        error: json!({"type": "invalid_prompt", "message": message, "details": format!("Node ID '#{id}'"), "extra_info": {}}),
        node_errors: Map::new(),
    }
}

fn no_outputs() -> Validation {
    Validation::Rejected {
        error: json!({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}),
        node_errors: Map::new(),
    }
}

/// A Python exception raised during validation.
struct PyExc {
    /// `full_type_name(type(ex))`, e.g. `KeyError`.
    kind: &'static str,
    /// `str(ex)`.
    message: String,
    /// The source line that raised, for the traceback.
    line: &'static str,
}

impl PyExc {
    fn new(kind: &'static str, message: String, line: &'static str) -> PyExc {
        PyExc {
            kind,
            message,
            line,
        }
    }

    fn traceback(&self, caller: &str) -> Vec<String> {
        let call = match caller {
            "validate_prompt" => (
                1102,
                "m = await validate_inputs(prompt_id, prompt, o, validated)",
            ),
            _ => (
                866,
                "r = await validate_inputs(prompt_id, prompt, o_id, validated)",
            ),
        };
        vec![
            format!(
                "  File \"/comfyui/execution.py\", line {}, in {caller}\n    {}\n",
                call.0, call.1
            ),
            format!(
                "  File \"/comfyui/execution.py\", line 850, in validate_inputs\n    {}\n",
                self.line
            ),
        ]
    }
}

/// `validate_inputs` with its `validated` dict.
struct Validator<'a> {
    shared: &'a Shared,
    prompt: &'a mut Map<String, Value>,
    /// `validated`, in insertion order: `(node_id, valid, reasons)`.
    validated: Vec<(String, bool, Vec<Value>)>,
    index: HashMap<String, usize>,
}

impl Validator<'_> {
    fn set_validated(&mut self, id: &str, valid: bool, reasons: Vec<Value>) {
        match self.index.get(id) {
            Some(&i) => self.validated[i] = (id.to_owned(), valid, reasons),
            None => {
                self.index.insert(id.to_owned(), self.validated.len());
                self.validated.push((id.to_owned(), valid, reasons));
            }
        }
    }

    fn set_input(&mut self, id: &str, name: &str, value: Value) {
        if let Some(inputs) = self
            .prompt
            .get_mut(id)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            inputs.insert(name.to_owned(), value);
        }
    }

    fn validate_inputs(&mut self, id: &str, depth: usize) -> Result<(bool, Vec<Value>), PyExc> {
        if let Some(&i) = self.index.get(id) {
            let (_, valid, reasons) = &self.validated[i];
            return Ok((*valid, reasons.clone()));
        }
        if depth > RECURSION_LIMIT {
            return Err(PyExc::new(
                "RecursionError",
                "maximum recursion depth exceeded".into(),
                "r = await validate_inputs(prompt_id, prompt, o_id, validated)",
            ));
        }
        let node = self.prompt.get(id).cloned().unwrap_or(Value::Null);
        let inputs = match node.get("inputs") {
            Some(Value::Object(inputs)) => inputs.clone(),
            Some(_) => Map::new(),
            None => {
                return Err(PyExc::new(
                    "KeyError",
                    "'inputs'".into(),
                    "inputs = prompt[unique_id]['inputs']",
                ))
            }
        };
        let class_type = node
            .get("class_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let catalog = &self.shared.catalog;
        let Some(class) = catalog.class(&class_type) else {
            return Err(PyExc::new(
                "KeyError",
                py_repr(&json!(class_type)),
                "obj_class = nodes.NODE_CLASS_MAPPINGS[class_type]",
            ));
        };
        let custom_validated: &[&str] = if IMAGE_FILE_VALIDATORS.contains(&class_type.as_str()) {
            &["image"]
        } else {
            &[]
        };

        let mut errors = Vec::new();
        let mut valid = true;
        for def in class.inputs() {
            let x = def.name;
            let Some(val) = inputs.get(x) else {
                if def.required {
                    errors.push(json!({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": x,
                        "extra_info": {"input_name": x},
                    }));
                }
                continue;
            };
            let info = def.config_json();
            if let Value::Array(link) = val {
                if link.len() != 2 {
                    errors.push(json!({
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": x,
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    }));
                    continue;
                }
                let o_id = self.linked_node(&link[0])?;
                let o_class = self
                    .prompt
                    .get(&o_id)
                    .and_then(|n| n.get("class_type"))
                    .and_then(Value::as_str)
                    .and_then(|c| catalog.class(c));
                let returns = o_class.map_or(&[][..], |c| c.return_types());
                let received_type = return_type(returns, &link[1])?;
                if !validate_node_input(received_type, def.kind) {
                    errors.push(json!({
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": format!("{x}, received_type({}) mismatch input_type({})", py_str(received_type), py_str(def.kind)),
                        "extra_info": {"input_name": x, "input_config": info, "received_type": received_type, "linked_node": val},
                    }));
                    continue;
                }
                match self.validate_inputs(&o_id, depth + 1) {
                    Ok((true, _)) => {}
                    Ok((false, _)) => valid = false,
                    Err(ex) => {
                        valid = false;
                        let reasons = vec![json!({
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": ex.message,
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "exception_message": ex.message,
                                "exception_type": ex.kind,
                                "traceback": ex.traceback("validate_inputs"),
                                "linked_node": val,
                            },
                        })];
                        self.set_validated(&o_id, false, reasons);
                    }
                }
                continue;
            }

            let mut val = val.clone();
            if let Some(inner) = val.get("__value__").filter(|_| val.is_object()).cloned() {
                val = inner;
                self.set_input(id, x, val.clone());
            }
            let kind = def.kind_str().unwrap_or_default();
            let converted = match kind {
                "INT" => py_int(&val),
                "FLOAT" => py_float(&val),
                "STRING" => Ok(Value::String(py_str(&val))),
                "BOOLEAN" => Ok(Value::Bool(super::pyfmt::truthy(&val))),
                _ => Ok(val.clone()),
            };
            match converted {
                Ok(v) => {
                    if matches!(kind, "INT" | "FLOAT" | "STRING" | "BOOLEAN") {
                        self.set_input(id, x, v.clone());
                    }
                    val = v;
                }
                Err(message) => {
                    errors.push(json!({
                        "type": "invalid_input_type",
                        "message": format!("Failed to convert an input value to a {kind} value"),
                        "details": format!("{x}, {}, {message}", py_str(&val)),
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val, "exception_message": message},
                    }));
                    continue;
                }
            }
            if custom_validated.contains(&x) {
                continue;
            }
            if let Some(error) = range_error(&def, &val, &info)? {
                errors.push(error);
                continue;
            }
            if let Some(options) = def.combo_options() {
                let on_disk = val
                    .as_str()
                    .is_some_and(|name| self.shared.model_on_disk(x, name));
                if !on_disk && !options.iter().any(|o| py_eq(o, &val)) {
                    let (list_info, config) = if options.len() > 20 {
                        (format!("(list of length {})", options.len()), Value::Null)
                    } else {
                        (py_repr(&Value::Array(options.to_vec())), info.clone())
                    };
                    errors.push(json!({
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": format!("{x}: '{}' not in {list_info}", py_str(&val)),
                        "extra_info": {"input_name": x, "input_config": config, "received_value": val},
                    }));
                }
            }
        }

        if !custom_validated.is_empty() {
            let current = self
                .prompt
                .get(id)
                .and_then(|n| n.get("inputs"))
                .and_then(|i| i.get("image"))
                .cloned();
            match current {
                None => {
                    return Err(PyExc::new(
                        "TypeError",
                        format!("{class_type}.VALIDATE_INPUTS() missing 1 required positional argument: 'image'"),
                        "ret = await _async_map_node_over_list(prompt_id, unique_id, obj_class, input_filtered, validate_function_name, v3_data=v3_data)",
                    ))
                }
                // A linked image is only known at run time; the simulator does not check it.
                Some(Value::Array(_)) => {}
                Some(Value::String(name)) => {
                    let exists = lock(&self.shared.store).files.exists_annotated(&name);
                    if !exists {
                        errors.push(json!({
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": format!("image - Invalid image file: {name}"),
                            "extra_info": {"input_name": "image"},
                        }));
                    }
                }
                Some(other) => {
                    return Err(PyExc::new(
                        "AttributeError",
                        format!("'{}' object has no attribute 'endswith'", type_name(&other)),
                        "if name.endswith(\"[output]\"):",
                    ))
                }
            }
        }

        let result = if errors.is_empty() && valid {
            (true, Vec::new())
        } else {
            (false, errors)
        };
        self.set_validated(id, result.0, result.1.clone());
        Ok(result)
    }

    /// `prompt[o_id]` for the first element of a link.
    fn linked_node(&self, o_id: &Value) -> Result<String, PyExc> {
        const LINE: &str = "o_class_type = prompt[o_id]['class_type']";
        match o_id {
            Value::String(s) if self.prompt.contains_key(s) => Ok(s.clone()),
            Value::Array(_) | Value::Object(_) => Err(PyExc::new(
                "TypeError",
                format!("unhashable type: '{}'", type_name(o_id)),
                LINE,
            )),
            other => Err(PyExc::new("KeyError", py_repr(other), LINE)),
        }
    }
}

/// `RETURN_TYPES[val[1]]` with Python indexing rules.
fn return_type<'a>(returns: &'a [Value], slot: &Value) -> Result<&'a Value, PyExc> {
    const LINE: &str = "received_type = r[val[1]]";
    let index = match slot {
        Value::Bool(b) => i64::from(*b),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.as_i64().unwrap_or(i64::MAX),
        other => {
            return Err(PyExc::new(
                "TypeError",
                format!(
                    "tuple indices must be integers or slices, not {}",
                    type_name(other)
                ),
                LINE,
            ))
        }
    };
    let len = returns.len() as i64;
    let resolved = if index < 0 { index + len } else { index };
    usize::try_from(resolved)
        .ok()
        .and_then(|i| returns.get(i))
        .ok_or_else(|| PyExc::new("IndexError", "tuple index out of range".into(), LINE))
}

/// `comfy_execution.validation.validate_node_input` (non-strict).
fn validate_node_input(received: &Value, expected: &Value) -> bool {
    if received == expected {
        return true;
    }
    let (Some(received), Some(expected)) = (received.as_str(), expected.as_str()) else {
        return false;
    };
    if received == "*" || expected == "*" {
        return true;
    }
    let split = |s: &str| {
        s.split(',')
            .map(|t| t.trim().to_owned())
            .collect::<Vec<_>>()
    };
    let expected = split(expected);
    split(received).iter().any(|r| expected.contains(r))
}

/// The `min`/`max` checks. Comparing a non-number with a bound raises `TypeError` in Python.
fn range_error(def: &InputDef<'_>, val: &Value, info: &Value) -> Result<Option<Value>, PyExc> {
    let x = def.name;
    for (bound, below) in [("min", true), ("max", false)] {
        let Some(limit) = def.extra_get(bound) else {
            continue;
        };
        let (Some(v), Some(l)) = (Num::of(val), Num::of(limit)) else {
            return Err(PyExc::new(
                "TypeError",
                format!(
                    "'{}' not supported between instances of '{}' and '{}'",
                    if below { "<" } else { ">" },
                    type_name(val),
                    type_name(limit)
                ),
                "if \"min\" in extra_info and val < extra_info[\"min\"]:",
            ));
        };
        let out_of_range = if below { v.lt(&l) } else { l.lt(&v) };
        if out_of_range {
            let (kind, word) = if below {
                ("value_smaller_than_min", "smaller than min")
            } else {
                ("value_bigger_than_max", "bigger than max")
            };
            return Ok(Some(json!({
                "type": kind,
                "message": format!("Value {} {word} of {}", py_str(val), py_str(limit)),
                "details": x,
                "extra_info": {"input_name": x, "input_config": info, "received_value": val},
            })));
        }
    }
    Ok(None)
}

/// A Python number (bools are ints) for comparisons.
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn of(v: &Value) -> Option<Num> {
        match v {
            Value::Bool(b) => Some(Num::Int(i128::from(*b))),
            Value::Number(n) => n
                .as_i64()
                .map(|i| Num::Int(i128::from(i)))
                .or_else(|| n.as_u64().map(|u| Num::Int(i128::from(u))))
                .or_else(|| n.as_f64().map(Num::Float)),
            _ => None,
        }
    }

    fn as_f64(&self) -> f64 {
        match self {
            Num::Int(i) => *i as f64,
            Num::Float(f) => *f,
        }
    }

    fn lt(&self, other: &Num) -> bool {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a < b,
            _ => self.as_f64() < other.as_f64(),
        }
    }
}

/// `int(val)`; the error is Python's message.
fn py_int(val: &Value) -> Result<Value, String> {
    match val {
        Value::Bool(b) => Ok(json!(i64::from(*b))),
        Value::Number(n) if n.is_f64() => Ok(int_value(n.as_f64().unwrap_or(0.0).trunc() as i128)),
        Value::Number(_) => Ok(val.clone()),
        Value::String(s) => parse_py_int(s)
            .map(int_value)
            .ok_or_else(|| format!("invalid literal for int() with base 10: {}", py_repr(val))),
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            type_name(other)
        )),
    }
}

fn int_value(i: i128) -> Value {
    if let Ok(v) = i64::try_from(i) {
        json!(v)
    } else if let Ok(v) = u64::try_from(i) {
        json!(v)
    } else {
        json!(i as f64)
    }
}

/// Python's decimal `int()` literal: whitespace, a sign, digits with single `_` separators.
fn parse_py_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let (negative, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let magnitude: i128 = clean.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// `float(val)`; the error is Python's message.
pub(crate) fn py_float(val: &Value) -> Result<Value, String> {
    let f = match val {
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => {
            let t = s.trim();
            let valid_underscores = !t.contains("__")
                && t.match_indices('_').all(|(i, _)| {
                    let before = t[..i].chars().last();
                    let after = t[i + 1..].chars().next();
                    before.is_some_and(|c| c.is_ascii_digit())
                        && after.is_some_and(|c| c.is_ascii_digit())
                });
            let parsed = valid_underscores
                .then(|| t.replace('_', ""))
                .filter(|c| !c.is_empty() && !c.contains(|ch: char| ch.is_whitespace()))
                .and_then(|c| c.parse::<f64>().ok());
            match parsed {
                Some(f) => f,
                None => {
                    return Err(format!(
                        "could not convert string to float: {}",
                        py_repr(val)
                    ))
                }
            }
        }
        other => {
            return Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                type_name(other)
            ))
        }
    };
    // NaN and infinities have no JSON form; keep what the client sent.
    Ok(serde_json::Number::from_f64(f).map_or_else(|| val.clone(), Value::Number))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn python_conversions() {
        assert_eq!(
            py_int(&json!("ten")),
            Err("invalid literal for int() with base 10: 'ten'".into())
        );
        assert_eq!(py_int(&json!(" 1_0 ")), Ok(json!(10)));
        assert_eq!(py_int(&json!(3.9)), Ok(json!(3)));
        assert_eq!(py_float(&json!(8)), Ok(json!(8.0)));
        assert_eq!(
            py_float(&json!("x")),
            Err("could not convert string to float: 'x'".into())
        );
        assert!(validate_node_input(&json!("IMAGE"), &json!("IMAGE,MASK")));
        assert!(validate_node_input(&json!("INT"), &json!("*")));
        assert!(!validate_node_input(&json!("LATENT"), &json!("IMAGE")));
    }
}
