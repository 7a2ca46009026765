/// Errors of the core library.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The policy was rejected.
    #[error(transparent)]
    Policy(#[from] netmap_policy::PolicyError),
    /// The policy is valid on its own but not for this tailnet (e.g. a domain it does not own).
    #[error("{0}")]
    PolicyForTailnet(String),
    /// A `tests` or `sshTests` entry failed.
    #[error("test(s) failed")]
    TestsFailed(crate::tests_eval::TestReport),
    /// The state document could not be read (syntax, unknown or repeated fields, wrong types).
    #[error("invalid state: {0}")]
    State(String),
    /// A value in the state is invalid or conflicts with another (names the node or user, the
    /// field and the value).
    #[error("invalid state: {0}")]
    Invalid(#[from] crate::validate::StateError),
    /// A change names something that does not exist.
    #[error("{0}")]
    NotFound(String),
}
