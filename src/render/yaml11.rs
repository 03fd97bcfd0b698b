//! serde_norway writes YAML 1.2, where `yes`, `on` or `1_000` are plain
//! strings. kubectl reads YAML 1.1, where they are a bool or a number, so a
//! pool named `on` would break its StorageClass. This quotes such scalars in
//! serde_norway's output; the caller checks the result still parses back
//! to the same value.

use std::collections::BTreeSet;

use serde_json::Value;

/// Plain scalars that YAML 1.1 resolves to something other than a string,
/// but YAML 1.2 (and so serde_norway) leaves plain.
pub(crate) fn is_yaml11_only_special(s: &str) -> bool {
    const BOOLS: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    if BOOLS.contains(&s) {
        return true;
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits =
        |t: &str, ok: fn(char) -> bool| t.chars().any(ok) && t.chars().all(|c| ok(c) || c == '_');
    // 1_000, 0b101, 0x_1F, 1:30 (base 60), 1_0.5
    (body.contains('_') && digits(&body.replace('.', ""), |c| c.is_ascii_digit()))
        || body
            .strip_prefix("0b")
            .is_some_and(|t| digits(t, |c| c == '0' || c == '1'))
        || body
            .strip_prefix("0x")
            .is_some_and(|t| t.contains('_') && digits(t, |c| c.is_ascii_hexdigit()))
        || (body.contains(':')
            && body
                .split(':')
                .all(|p| digits(p, |c| c.is_ascii_digit() || c == '.')))
}

fn collect(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) if is_yaml11_only_special(s) => {
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if is_yaml11_only_special(k) {
                    out.insert(k.clone());
                }
                collect(v, out);
            }
        }
        _ => {}
    }
}

/// Quotes the YAML-1.1-only specials of `doc` in `yaml` (its serde_norway text).
pub(crate) fn quote_for_yaml11(doc: &Value, yaml: String) -> String {
    let mut risky = BTreeSet::new();
    collect(doc, &mut risky);
    if risky.is_empty() {
        return yaml;
    }
    let quote = |t: &str| {
        if risky.contains(t) {
            format!("'{t}'")
        } else {
            t.to_owned()
        }
    };
    let mut out = String::with_capacity(yaml.len() + 16);
    // Lines of a literal block scalar are text, never structure.
    let mut literal_indent: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(block) = literal_indent {
            if indent > block || line.trim().is_empty() {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            literal_indent = None;
        }
        let mut rest = &line[indent..];
        let mut prefix = line[..indent].to_owned();
        while let Some(r) = rest.strip_prefix("- ") {
            prefix.push_str("- ");
            rest = r;
        }
        let fixed = if let Some((key, value)) = rest.split_once(": ") {
            format!("{}: {}", quote(key), quote(value))
        } else if let Some(key) = rest.strip_suffix(':') {
            format!("{}:", quote(key))
        } else {
            quote(rest)
        };
        if rest.ends_with('|') || rest.ends_with("|-") || rest.ends_with("|+") {
            literal_indent = Some(indent);
        }
        out.push_str(&prefix);
        out.push_str(&fixed);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_yaml11_specials() {
        for s in [
            "yes", "Off", "y", "N", "1_000", "0b101", "0x_1F", "1:30", "-1_0.5",
        ] {
            assert!(is_yaml11_only_special(s), "{s}");
        }
        for s in [
            "yesterday",
            "linux",
            "5Gi",
            "1.5",
            "0x1F",
            "true",
            "10",
            "a:b",
            "_",
            "1:a",
            "",
        ] {
            assert!(!is_yaml11_only_special(s), "{s}");
        }
    }

    #[test]
    fn quotes_keys_values_and_items_and_round_trips() {
        let doc = serde_json::json!({
            "on": "yes",
            "list": ["no", "ok", {"y": "1_000"}],
            "text": "line one\non: not a key\n",
            "plain": "off-road",
        });
        let yaml = serde_norway::to_string(&doc).unwrap();
        let fixed = quote_for_yaml11(&doc, yaml);
        assert!(fixed.contains("'on': 'yes'"), "{fixed}");
        assert!(fixed.contains("- 'no'"), "{fixed}");
        assert!(fixed.contains("- 'y': '1_000'"), "{fixed}");
        assert!(fixed.contains("  on: not a key"), "{fixed}");
        let back: Value = serde_norway::from_str(&fixed).unwrap();
        assert_eq!(back, doc);
    }
}
