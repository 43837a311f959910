//! Validation of ids before they enter a subject or a key.
//!
//! An id is 1..=128 characters of `[A-Za-z0-9_-]`. Anything else — a `*`, `>` or `.` that
//! would turn a subject into a wildcard or add a token, whitespace, an empty string — is a bad
//! request, never a pattern.

use crate::error::ApiError;

pub const MAX_ID_LEN: usize = 128;

/// Checks that `value` is a valid id; `kind` names it in the error ("endpoint id", "job id").
pub fn validate_id(kind: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::bad_request(format!("{kind} must not be empty")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ApiError::bad_request(format!(
            "{kind} is {} characters long; the limit is {MAX_ID_LEN}",
            value.len()
        )));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(ApiError::bad_request(format!(
            "{kind} {value:?} contains {bad:?}; ids may only use letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_runpod_style_ids() {
        validate_id("job id", "8d4f0c3e-1a2b-4c5d-9e8f-0123456789ab-u1").expect("valid");
        validate_id("job id", "sync-8d4f0c3e-u1").expect("valid");
        validate_id("endpoint id", "echo_py").expect("valid");
    }

    #[test]
    fn rejects_wildcards_tokens_and_whitespace() {
        for bad in ["*", ">", "a.b", "a b", "a\tb", "", "ep*", "ep>", "é"] {
            let err = validate_id("endpoint id", bad).expect_err(bad);
            assert_eq!(err.code, crate::ErrorCode::BadRequest, "{bad}");
            assert!(err.message.contains("endpoint id"), "{}", err.message);
        }
        assert!(validate_id("job id", &"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_are_single_plain_subject_tokens(s in "\\PC{0,140}") {
            if validate_id("id", &s).is_ok() {
                prop_assert!(!s.contains('.') && !s.contains('*') && !s.contains('>'));
                prop_assert!(!s.chars().any(char::is_whitespace));
                prop_assert!(!s.is_empty() && s.len() <= MAX_ID_LEN);
            }
        }
    }
}
