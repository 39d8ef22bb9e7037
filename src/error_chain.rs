//! An error with its causes on one line, so "connection refused" is not hidden behind "error
//! sending request".

/// `e` and its sources, joined, so "connection refused" is not hidden behind "error sending request".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
