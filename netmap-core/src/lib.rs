//! netmap-core: the tailnet model, resolution of policy selectors against it, per-node views
//! (packet filter, peers, routes, SSH rules, capabilities), evaluation of the policy's
//! `tests`/`sshTests`, and the incremental engine.

mod addr;
mod bits;
mod build;
mod compute;
mod engine;
mod error;
mod node_set;
mod resolve;
mod routes;
mod rules;
mod slot_hash;
mod ssh;
mod state_file;
mod tailnet;
mod tests_eval;
mod validate;
pub mod wire;

pub use build::{compute_all, Computed};
pub use engine::{diff_views, load_policy, Change, ChangeSet, Engine, NodeDelta, Snapshot};
pub use error::CoreError;
pub use routes::{auto_approve, elect_primaries};
pub use state_file::{read_state, StateDocument, StateOptions};
pub use tailnet::{
    format_rfc3339, parse_rfc3339, Node, PostureValue, Tailnet, TailnetSettings, User,
};
pub use tests_eval::{check_policy_for_tailnet, run_tests, TestOutcome, TestReport};
pub use validate::{
    check_settings, is_ipv6_only, valid_name, validate_tailnet, StateError, StateErrorKind,
    StateIndex, Subject, MAX_POSTURE, MAX_ROUTES, MAX_TAGS, NAME_RULE, ROLES,
};
