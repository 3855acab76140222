//! The API's errors have a stable code beside their message
//! (`{"error": "...", "code": "not_found"}`): what the CLI, the dashboard
//! and scripts match on, never the wording, which is free to improve.

use http::StatusCode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No token, or not one of this cluster's.
    Unauthorized,
    /// The read-only token asked for a change or a backup.
    ReadOnly,
    /// A browser's request from another site's page (or a rebound name).
    CrossOrigin,
    NoSuchEndpoint,
    /// A service file with mistakes (each with its line and field).
    InvalidService,
    BadRequest,
    /// No service of that name.
    NotFound,
    NoSuchNode,
    /// The record changed under the request, or something is in the way
    /// (a backup running): try again.
    Conflict,
    /// The node failed (its store, a hook): not the caller's fault.
    Internal,
    /// A code from another version of halo.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The HTTP status the code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::ReadOnly | ErrorCode::CrossOrigin => StatusCode::FORBIDDEN,
            ErrorCode::NoSuchEndpoint | ErrorCode::NotFound | ErrorCode::NoSuchNode => StatusCode::NOT_FOUND,
            ErrorCode::InvalidService | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Internal | ErrorCode::Other => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_and_unknown_ones_are_other() {
        assert_eq!(serde_json::to_string(&ErrorCode::NotFound).unwrap(), "\"not_found\"");
        assert_eq!(serde_json::from_str::<ErrorCode>("\"read_only\"").unwrap(), ErrorCode::ReadOnly);
        assert_eq!(serde_json::from_str::<ErrorCode>("\"a_new_code\"").unwrap(), ErrorCode::Other);
    }
}
