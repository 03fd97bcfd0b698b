//! ListVolumes / ListSnapshots paging tokens.
//!
//! A token names the last entry of the previous page, so it stays valid when
//! entries are added or removed between pages (listings are in ID order).

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
    let invalid = || CoreError::BadToken {
        token: token.chars().take(64).collect(),
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(PREFIX).ok_or_else(invalid)?;
    if !is_valid_name(id) {
        return Err(invalid());
    }
    Ok(Some(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_tokens() {
        assert_eq!(decode(&encode("pvc-1")).unwrap().as_deref(), Some("pvc-1"));
        assert_eq!(decode("").unwrap(), None);
        for bad in ["invalid-token", "12", &URL_SAFE_NO_PAD.encode("hpc1:../x")] {
            assert!(
                matches!(decode(bad), Err(CoreError::BadToken { .. })),
                "{bad}"
            );
        }
    }
}
