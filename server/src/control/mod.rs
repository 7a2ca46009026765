//! Tailscale's control protocol on `netmap serve`'s listener: real Tailscale clients
//! (`tailscale up --login-server http://HOST:PORT --authkey KEY`) register and stream their
//! netmaps. A thin adapter over the engine, in small parts:
//!
//! - [`preauth`]: pre-auth keys (`netmap preauthkey create`, `POST .../preauthkeys`).
//! - [`state`]: registered machines (keys, endpoints, hostinfo), persisted in the store, and
//!   who is connected.
//! - [`http`]: `GET /key`, the `/ts2021` upgrade, Noise and HTTP/2 (via `netmap-control`),
//!   `/machine/register` and `/machine/map`.
//! - [`mapper`]: a node's view in tailcfg form (self node, peers, filter, SSH policy, DNS).
//! - [`session`]: one map stream: a full map, then deltas from the engine's change sets and
//!   peer patches (online, endpoints), and keep-alives.
//!
//! The wire layers themselves (Noise, records, zstd frames, message shapes) are in the
//! `netmap-control` crate. `docs/clients.md` describes what is supported.

pub mod http;
pub mod mapper;
pub mod preauth;
pub mod session;
pub mod state;

pub use http::router;
pub use state::Control;
