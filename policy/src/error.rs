use crate::hujson::{Pos, SyntaxError};

/// Why a policy file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not valid HuJSON.
    #[error("invalid HuJSON at line {}, column {}: {}", .0.pos.line, .0.pos.column, .0.message)]
    Syntax(#[from] SyntaxError),
    /// The text is HuJSON but not a valid policy.
    #[error("{message} (at {path}, line {}, column {})", pos.line, pos.column)]
    Invalid {
        /// The words a user of the hosted service would see.
        message: String,
        /// JSON path of the offending element, e.g. `acls[2].dst[0]`.
        path: String,
        /// Where the offending element starts.
        pos: Pos,
    },
}

impl PolicyError {
    /// The message without location.
    pub fn message(&self) -> &str {
        match self {
            PolicyError::Syntax(e) => &e.message,
            PolicyError::Invalid { message, .. } => message,
        }
    }

    /// Where the error is, when known.
    pub fn pos(&self) -> Pos {
        match self {
            PolicyError::Syntax(e) => e.pos,
            PolicyError::Invalid { pos, .. } => *pos,
        }
    }

    /// The JSON path of the offending element (empty for syntax errors).
    pub fn path(&self) -> &str {
        match self {
            PolicyError::Syntax(_) => "",
            PolicyError::Invalid { path, .. } => path,
        }
    }
}
