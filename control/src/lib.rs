//! netmap-control: the wire side of Tailscale's control protocol ("ts2021"), as spoken by
//! unmodified Tailscale clients, in small layers that know nothing of netmap's engine:
//!
//! - [`keys`]: machine, node and disco public keys and their text forms (`mkey:…`).
//! - [`noise`]: the Noise IK handshake (done by the `snow` library) and Tailscale's record
//!   layer over it (ChaCha20-Poly1305 with a **big-endian** nonce, frames of at most 4096 bytes),
//!   as an `AsyncRead + AsyncWrite` stream that HTTP/2 runs on.
//! - [`codec`]: map-response framing: a 4-byte little-endian length, then a zstd frame of JSON.
//! - [`tailcfg`]: the JSON shapes of register and map requests and responses.
//! - [`client`]: a protocol client (key fetch, upgrade, handshake, HTTP/2, register, map
//!   stream) for tests and benchmarks.
//!
//! The server side that turns these messages into netmap's engine changes and views lives in
//! the `netmap` server (`server/src/control`).

pub mod client;
pub mod codec;
pub mod keys;
pub mod noise;
pub mod tailcfg;

/// The capability version of the client this crate was checked against (Tailscale v1.102.5).
pub const CAPABILITY_VERSION: u16 = 142;

/// Why a control-protocol operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The peer sent bytes that do not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The Noise handshake failed (bad keys, wrong message).
    #[error("noise handshake: {0}")]
    Handshake(String),
    /// A record could not be decrypted (wrong key, tampering, replay).
    #[error("record decryption failed")]
    Decrypt,
    /// A key in text form is malformed.
    #[error("invalid key {text:?}: {reason}")]
    Key {
        /// The text.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// zstd or JSON (de)coding failed.
    #[error("codec: {0}")]
    Codec(String),
    /// HTTP failed.
    #[error("http: {0}")]
    Http(String),
    /// I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
