//! ListVolumes / ListSnapshots paging tokens.
//!
//! A token names the last entry of the previous page, so it stays valid when
//! entries are added or removed between pages (the listing is sorted by ID).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::error::{CoreError, CoreResult};
use crate::names::is_valid_name;

const PREFIX: &str = "hpc1:";

pub fn encode(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PREFIX}{last_id}"))
}

/// Decodes a token; one this driver did not issue is ABORTED (as the spec says).
pub fn decode(token: &str) -> CoreResult<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        CoreError::Aborted(format!(
            "starting_token {token:?} was not issued by this driver"
        ))
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(PREFIX).ok_or_else(invalid)?;
    if !is_valid_name(id) {
        return Err(invalid());
    }
    Ok(Some(id.to_owned()))
}

/// Cuts one page out of `sorted` (sorted by `key`), starting after `after`.
pub fn page<T>(
    sorted: Vec<T>,
    after: Option<&str>,
    max_entries: usize,
    key: impl Fn(&T) -> &str,
) -> (Vec<T>, String) {
    let start = match after {
        Some(a) => sorted.partition_point(|v| key(v) <= a),
        None => 0,
    };
    let mut rest: Vec<T> = sorted.into_iter().skip(start).collect();
    if max_entries == 0 || rest.len() <= max_entries {
        return (rest, String::new());
    }
    rest.truncate(max_entries);
    let next = encode(key(rest.last().expect("page is not empty")));
    (rest, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_tokens() {
        assert_eq!(decode(&encode("pvc-1")).unwrap().as_deref(), Some("pvc-1"));
        assert_eq!(decode("").unwrap(), None);
        for bad in ["invalid-token", "12", &URL_SAFE_NO_PAD.encode("hpc1:../x")] {
            assert!(matches!(decode(bad), Err(CoreError::Aborted(_))), "{bad}");
        }
    }

    #[test]
    fn pages_survive_deletion_of_the_last_entry() {
        let ids = vec!["a", "b", "c", "d"];
        let (p1, t) = page(ids.clone(), None, 2, |s| s);
        assert_eq!(p1, ["a", "b"]);
        let after = decode(&t).unwrap();
        let without_b = vec!["a", "c", "d", "e"];
        let (p2, t2) = page(without_b, after.as_deref(), 2, |s| s);
        assert_eq!(p2, ["c", "d"]);
        assert!(!t2.is_empty());
    }
}
