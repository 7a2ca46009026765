//! The Tailscale policy language: a HuJSON reader that keeps positions, the typed policy model,
//! and strict validation whose errors carry the JSON path, line:column and the words the
//! hosted service uses.
//!
//! ```
//! let p = netmap_policy::parse_policy(r#"{
//!   // comments and trailing commas are fine; field names match in any case
//!   "ACLs": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},],
//! }"#).unwrap();
//! assert_eq!(p.acls.len(), 1);
//! ```

mod decode;
mod error;
pub mod hujson;
mod ipset;
mod model;
mod posture;
mod selector;

pub use error::PolicyError;
pub use model::{
    go_duration, parse_policy, parse_policy_spans, parse_prefix, reparse_policy, Acl, AclTest,
    AutoApprovers, Grant, GroupSpans, Located, NodeAttr, Policy, PolicyWarning, SshAction, SshRule,
    SshTest, SshUser, TestDst,
};
pub use posture::{
    compare_versions, Posture, PostureAttrs, PostureCondition, PostureOp, PostureValue,
};
pub use selector::{
    parse_alias, parse_ip_spec, parse_ports, parse_proto, proto_has_ports, split_host_ports, Alias,
    AliasContext, AutoGroup, IpSpec, PortRange,
};

/// `autogroup:internet`: these prefixes ...
pub(crate) const INTERNET_PREFIXES: &[&str] = &["0.0.0.0/0", "2000::/3"];
/// ... minus these.
pub(crate) const NON_INTERNET_PREFIXES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];
