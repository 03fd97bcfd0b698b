//! Validation of names and IDs that arrive in requests.
//!
//! Every volume ID and snapshot ID is also a single path component inside a
//! pool, so the pattern is strict: it can never contain `/`, never be `.` or
//! `..`, and never start with `.` (which also keeps the private `.hostpath-csi`
//! area out of reach).

use crate::error::CoreError;

/// Longest accepted name, in bytes (CSI names are at least this long).
pub const MAX_NAME_LEN: usize = 128;

/// Returns true when `name` is acceptable as a volume or snapshot ID.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN || bytes[0] == b'.' {
        return false;
    }
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks `name` and explains what is wrong with it; `field` names the
/// request field it came from.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), CoreError> {
    if name.is_empty() {
        return Err(CoreError::Required { field });
    }
    if is_valid_name(name) {
        return Ok(());
    }
    Err(CoreError::invalid(
        field,
        name,
        format!(
            "use 1-{MAX_NAME_LEN} ASCII letters, digits, '-', '_' or '.', not starting with '.'"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_pv_names() {
        assert!(is_valid_name("pvc-3f6c2a8e-9b1d-4c1e-8d2a-0e6f1b2c3d4e"));
        assert!(is_valid_name("snapshot-1.2_a"));
        assert!(is_valid_name(&"a".repeat(MAX_NAME_LEN)));
    }

    #[test]
    fn refuses_path_like_and_odd_names() {
        for bad in [
            "", ".", "..", "a/b", "/abs", ".hidden", "a\0b", "ü", "a b", "a\\b",
        ] {
            assert!(!is_valid_name(bad), "{bad:?} should be refused");
        }
        assert!(!is_valid_name(&"a".repeat(MAX_NAME_LEN + 1)));
    }
}
