//! The Tailscale policy language: a HuJSON reader that keeps positions, the typed policy model,
//! and strict validation whose errors carry the JSON path, line:column and the words the
//! hosted service uses.
//!
//! ```
//! let p = netmap_policy::parse_policy(r#"{
//!   // comments and trailing commas are fine
//!   "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},],
//! }"#).unwrap();
//! assert_eq!(p.acls.len(), 1);
//! ```

mod error;
pub mod hujson;
mod model;
mod selector;

pub use error::PolicyError;
pub use model::{
    go_duration, parse_policy, parse_prefix, Acl, AclTest, AutoApprovers, Grant, IpSetItem,
    Located, NodeAttr, Policy, SshAction, SshRule, SshTest, SshUser,
};
pub use selector::{
    parse_alias, parse_ip_spec, parse_ports, parse_proto, split_host_ports, Alias, AliasContext,
    AutoGroup, IpSpec, PortRange,
};
