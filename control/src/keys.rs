//! Curve25519 public keys in Tailscale's text forms: `mkey:` (machine), `nodekey:` (node,
//! WireGuard) and `discokey:` (disco) followed by 64 lowercase hex digits.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ControlError;

/// Writes bytes as lowercase hex.
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses exactly 32 bytes of hex.
pub fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (hex_digit(b[2 * i])? << 4) | hex_digit(b[2 * i + 1])?;
    }
    Some(out)
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The text prefix (`mkey:` and so on).
            pub const PREFIX: &'static str = $prefix;

            /// Whether the key is all zeroes (Go's "zero value": absent).
            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; 32]
            }

            /// Parses the text form.
            pub fn parse(s: &str) -> Result<$name, ControlError> {
                let hex = s.strip_prefix($prefix).ok_or_else(|| ControlError::Key {
                    text: s.to_string(),
                    reason: concat!("missing ", $prefix, " prefix"),
                })?;
                from_hex32(hex).map($name).ok_or_else(|| ControlError::Key {
                    text: s.to_string(),
                    reason: "expected 64 hex digits",
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, to_hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = String::deserialize(d)?;
                if s.is_empty() {
                    // Go marshals some zero keys as "" in older messages.
                    return Ok($name::default());
                }
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

key_type!(
    /// A machine public key (`mkey:`): the Noise static key of a client or of the server.
    MachinePublic,
    "mkey:"
);
key_type!(
    /// A node public key (`nodekey:`): a node's WireGuard key, its identity in map requests.
    NodePublic,
    "nodekey:"
);
key_type!(
    /// A disco public key (`discokey:`), used by peers for path discovery.
    DiscoPublic,
    "discokey:"
);

/// A Curve25519 key pair (the server's machine key).
#[derive(Clone)]
pub struct MachineKeyPair {
    /// The private scalar.
    pub private: [u8; 32],
    /// The public point.
    pub public: MachinePublic,
}

impl fmt::Debug for MachineKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MachineKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl MachineKeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Result<MachineKeyPair, ControlError> {
        let kp = crate::noise::builder()?
            .generate_keypair()
            .map_err(|e| ControlError::Handshake(format!("key generation: {e}")))?;
        let (Ok(private), Ok(public)) = (
            <[u8; 32]>::try_from(kp.private.as_slice()),
            <[u8; 32]>::try_from(kp.public.as_slice()),
        ) else {
            return Err(ControlError::Handshake(
                "key generation: wrong key size".into(),
            ));
        };
        Ok(MachineKeyPair {
            private,
            public: MachinePublic(public),
        })
    }

    /// The private key as `privkey:HEX` (how the server stores it).
    pub fn private_text(&self) -> String {
        format!("privkey:{}", to_hex(&self.private))
    }

    /// Restores a key pair from its stored private and public text forms.
    pub fn from_text(private: &str, public: &str) -> Result<MachineKeyPair, ControlError> {
        let hex = private
            .strip_prefix("privkey:")
            .ok_or_else(|| ControlError::Key {
                text: "<private key>".into(),
                reason: "missing privkey: prefix",
            })?;
        let private = from_hex32(hex).ok_or_else(|| ControlError::Key {
            text: "<private key>".into(),
            reason: "expected 64 hex digits",
        })?;
        Ok(MachineKeyPair {
            private,
            public: MachinePublic::parse(public)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_round_trip_and_errors() {
        let k = NodePublic([0xab; 32]);
        let s = k.to_string();
        assert!(s.starts_with("nodekey:abab"));
        assert_eq!(NodePublic::parse(&s).unwrap(), k);
        assert!(NodePublic::parse("mkey:00").is_err());
        assert!(NodePublic::parse(&format!("nodekey:{}", "g".repeat(64))).is_err());
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<NodePublic>(&j).unwrap(), k);
        assert!(serde_json::from_str::<DiscoPublic>("\"\"")
            .unwrap()
            .is_zero());
        let kp = MachineKeyPair::generate().unwrap();
        let back = MachineKeyPair::from_text(&kp.private_text(), &kp.public.to_string()).unwrap();
        assert_eq!(back.private, kp.private);
    }
}
