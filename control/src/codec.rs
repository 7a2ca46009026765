//! Map-response framing: each message on a `/machine/map` stream is a 4-byte little-endian
//! length followed by that many bytes: a zstd frame of the MapResponse JSON (when the client
//! asked for `Compress: "zstd"`, which every current client does) or the JSON itself.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ControlError;

/// Largest decompressed message this side accepts.
pub const MAX_MESSAGE: usize = 64 << 20;

/// zstd level: the fastest one (maps are compressed once per client per change).
const LEVEL: i32 = 1;

/// Encodes one message: JSON, compressed when `zstd`, with the length prefix.
pub fn encode_frame<T: Serialize>(msg: &T, zstd: bool) -> Result<Bytes, ControlError> {
    let json = serde_json::to_vec(msg).map_err(|e| ControlError::Codec(e.to_string()))?;
    frame_json(&json, zstd)
}

/// Frames JSON bytes already encoded.
pub fn frame_json(json: &[u8], zstd: bool) -> Result<Bytes, ControlError> {
    let body = if zstd {
        zstd::bulk::compress(json, LEVEL).map_err(|e| ControlError::Codec(e.to_string()))?
    } else {
        json.to_vec()
    };
    let len = u32::try_from(body.len())
        .map_err(|_| ControlError::Codec(format!("message of {} bytes", body.len())))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(Bytes::from(out))
}

/// Splits complete frames off the front of `buf`: returns each frame's payload (still
/// compressed) and leaves a partial frame in `buf`.
pub fn split_frames(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, ControlError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 4 {
        let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(ControlError::Codec(format!("frame of {len} bytes")));
        }
        if buf.len() - pos - 4 < len {
            break;
        }
        out.push(buf[pos + 4..pos + 4 + len].to_vec());
        pos += 4 + len;
    }
    buf.drain(..pos);
    Ok(out)
}

/// Decodes one frame payload (as [`split_frames`] returns it).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8], zstd: bool) -> Result<T, ControlError> {
    let json = if zstd {
        zstd::bulk::decompress(payload, MAX_MESSAGE)
            .map_err(|e| ControlError::Codec(e.to_string()))?
    } else {
        payload.to_vec()
    };
    serde_json::from_slice(&json).map_err(|e| ControlError::Codec(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn frames_round_trip_across_splits() {
        let a = json!({"KeepAlive": true});
        let b = json!({"Peers": [{"ID": 1, "Name": "x"}], "PacketFilter": []});
        let mut wire = encode_frame(&a, true).unwrap().to_vec();
        wire.extend_from_slice(&encode_frame(&b, true).unwrap());
        assert!(u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize + 4 < wire.len());
        // Feed byte by byte: frames come out whole and in order.
        let mut buf = Vec::new();
        let mut got: Vec<Value> = Vec::new();
        for x in wire {
            buf.push(x);
            for f in split_frames(&mut buf).unwrap() {
                got.push(decode_payload(&f, true).unwrap());
            }
        }
        assert_eq!(got, vec![a, b]);
        assert!(buf.is_empty());
        let mut huge = vec![0xff, 0xff, 0xff, 0x7f];
        assert!(split_frames(&mut huge).is_err());
        assert!(decode_payload::<Value>(b"not zstd", true).is_err());
    }
}
