//! A `Range` request header (RFC 9110 §14), one byte range: `bytes=a-b`, `bytes=a-`,
//! `bytes=-n`. Several ranges, or another unit, are ignored (the whole content is served, as
//! the RFC allows); a range past the end is unsatisfiable (416).

/// What to serve of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ranged {
    /// Everything (200).
    Whole,
    /// `start..=end` (206).
    Part { start: u64, end: u64 },
    /// Nothing fits (416).
    Unsatisfiable,
}

/// Reads the header against a content of `size` bytes.
pub(crate) fn ranged(header: Option<&str>, size: u64) -> Ranged {
    let Some(spec) = header.map(str::trim).and_then(|h| {
        let (unit, rest) = h.split_once('=')?;
        unit.trim()
            .eq_ignore_ascii_case("bytes")
            .then_some(rest.trim())
    }) else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ranged::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // `bytes=-n`: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part {
                    start: size.saturating_sub(n),
                    end: size - 1,
                }
            }
        }
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if start >= size {
                return Ranged::Unsatisfiable;
            }
            match end {
                Some(end) if end < start => Ranged::Whole,
                Some(end) => Ranged::Part {
                    start,
                    end: end.min(size - 1),
                },
                None => Ranged::Part {
                    start,
                    end: size - 1,
                },
            }
        }
        _ => Ranged::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        let r = |h: &str| ranged(Some(h), 100);
        assert_eq!(ranged(None, 100), Ranged::Whole);
        assert_eq!(r("bytes=0-7"), Ranged::Part { start: 0, end: 7 });
        assert_eq!(r("bytes=90-"), Ranged::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=90-500"), Ranged::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-10"), Ranged::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-500"), Ranged::Part { start: 0, end: 99 });
        assert_eq!(r("bytes=100-"), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), Ranged::Whole);
        assert_eq!(r("items=0-1"), Ranged::Whole);
        assert_eq!(r("bytes=x-1"), Ranged::Whole);
        assert_eq!(r("bytes=5-1"), Ranged::Whole);
    }
}
