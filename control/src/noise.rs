//! The ts2021 transport: a Noise IK handshake whose first message travels in the upgrade
//! request, then records of at most 4096 bytes (`[type=4][len u16 BE][ciphertext+tag]`)
//! sealed with ChaCha20-Poly1305 under a **big-endian** 64-bit counter nonce. (Standard Noise
//! transport messages use a little-endian nonce, which is why the handshake is done with
//! `snow` but the records are sealed here.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::keys::{MachineKeyPair, MachinePublic};
use crate::ControlError;

const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE_PREFIX: &str = "Tailscale Control Protocol v";

const MSG_INITIATION: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_ERROR: u8 = 3;
const MSG_RECORD: u8 = 4;

/// Length of the initiation message: version (2), type (1), length (2), payload (96).
pub const INITIATION_LEN: usize = 101;
/// Length of the response message: type (1), length (2), payload (48).
pub const RESPONSE_LEN: usize = 51;
/// Largest frame on the wire.
pub const MAX_FRAME: usize = 4096;
const HEADER: usize = 3;
const TAG: usize = 16;
/// Largest plaintext in one record.
pub const MAX_PLAINTEXT: usize = MAX_FRAME - HEADER - TAG;

pub(crate) fn builder() -> Result<snow::Builder<'static>, ControlError> {
    let params = PATTERN
        .parse()
        .map_err(|e| ControlError::Handshake(format!("{PATTERN}: {e:?}")))?;
    Ok(snow::Builder::new(params))
}

fn prologue(version: u16) -> Vec<u8> {
    format!("{PROLOGUE_PREFIX}{version}").into_bytes()
}

fn hs_err(e: snow::Error) -> ControlError {
    ControlError::Handshake(e.to_string())
}

/// The result of a completed handshake: the transport keys and who the peer is.
#[derive(Clone)]
pub struct Established {
    /// The protocol version the client announced (its capability version).
    pub version: u16,
    /// The peer's machine key (the client's, on the server side).
    pub peer: MachinePublic,
    tx: [u8; 32],
    rx: [u8; 32],
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("version", &self.version)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Established {
    /// Wraps `inner` in the record layer keyed by this handshake.
    pub fn into_stream<S>(self, inner: S) -> NoiseStream<S> {
        NoiseStream::new(inner, &self.tx, &self.rx)
    }
}

/// A refused handshake: the message to send the client (an error frame) and why.
#[derive(Debug)]
pub struct Refusal {
    /// The error frame for the client.
    pub frame: Vec<u8>,
    /// Why the handshake was refused.
    pub error: ControlError,
}

fn error_frame(msg: &str) -> Vec<u8> {
    let m = &msg.as_bytes()[..msg.len().min(u16::MAX as usize)];
    let mut f = Vec::with_capacity(HEADER + m.len());
    f.push(MSG_ERROR);
    f.extend_from_slice(&(m.len() as u16).to_be_bytes());
    f.extend_from_slice(m);
    f
}

/// Server side: answers an initiation message. Returns the response message to write and the
/// established session, or an error frame to send back.
pub fn accept(
    init: &[u8],
    server: &MachineKeyPair,
) -> Result<([u8; RESPONSE_LEN], Established), Refusal> {
    let refuse = |msg: &str, error: ControlError| Refusal {
        frame: error_frame(msg),
        error,
    };
    if init.len() != INITIATION_LEN {
        return Err(refuse(
            "wrong handshake initiation size",
            ControlError::Handshake(format!(
                "initiation of {} bytes, want {INITIATION_LEN}",
                init.len()
            )),
        ));
    }
    let version = u16::from_be_bytes([init[0], init[1]]);
    if init[2] != MSG_INITIATION {
        return Err(refuse(
            "unexpected handshake message type",
            ControlError::Handshake(format!("message type {}", init[2])),
        ));
    }
    if usize::from(u16::from_be_bytes([init[3], init[4]])) != INITIATION_LEN - 5 {
        return Err(refuse(
            "wrong handshake initiation length",
            ControlError::Handshake("initiation length field".into()),
        ));
    }
    let run = || -> Result<([u8; RESPONSE_LEN], Established), ControlError> {
        let plog = prologue(version);
        let mut hs = builder()?
            .local_private_key(&server.private)
            .prologue(&plog)
            .build_responder()
            .map_err(hs_err)?;
        let mut scratch = [0u8; 128];
        let n = hs.read_message(&init[5..], &mut scratch).map_err(hs_err)?;
        if n != 0 {
            return Err(ControlError::Handshake(
                "unexpected initiation payload".into(),
            ));
        }
        let peer = hs
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(MachinePublic)
            .ok_or_else(|| ControlError::Handshake("no client static key".into()))?;
        let mut resp = [0u8; RESPONSE_LEN];
        resp[0] = MSG_RESPONSE;
        resp[1..3].copy_from_slice(&((RESPONSE_LEN - HEADER) as u16).to_be_bytes());
        let n = hs.write_message(&[], &mut resp[HEADER..]).map_err(hs_err)?;
        if n != RESPONSE_LEN - HEADER {
            return Err(ControlError::Handshake(format!("response of {n} bytes")));
        }
        let (c1, c2) = hs.dangerously_get_raw_split();
        Ok((
            resp,
            Established {
                version,
                peer,
                tx: c2,
                rx: c1,
            },
        ))
    };
    run().map_err(|e| refuse("handshake failed", e))
}

/// Client side, first half: the initiation message (sent in the upgrade request) and the
/// state that reads the server's response.
pub struct Initiator {
    hs: snow::HandshakeState,
    version: u16,
    server: MachinePublic,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake with the server's public key.
    pub fn start(
        machine: &MachineKeyPair,
        server: MachinePublic,
        version: u16,
    ) -> Result<(Vec<u8>, Initiator), ControlError> {
        let plog = prologue(version);
        let mut hs = builder()?
            .local_private_key(&machine.private)
            .remote_public_key(&server.0)
            .prologue(&plog)
            .build_initiator()
            .map_err(hs_err)?;
        let mut msg = vec![0u8; INITIATION_LEN];
        msg[0..2].copy_from_slice(&version.to_be_bytes());
        msg[2] = MSG_INITIATION;
        msg[3..5].copy_from_slice(&((INITIATION_LEN - 5) as u16).to_be_bytes());
        let n = hs.write_message(&[], &mut msg[5..]).map_err(hs_err)?;
        if n != INITIATION_LEN - 5 {
            return Err(ControlError::Handshake(format!("initiation of {n} bytes")));
        }
        Ok((
            msg,
            Initiator {
                hs,
                version,
                server,
            },
        ))
    }

    /// Reads the server's response (or error frame) and finishes the handshake.
    pub fn finish(mut self, resp: &[u8]) -> Result<Established, ControlError> {
        if resp.first() == Some(&MSG_ERROR) {
            let msg = resp.get(HEADER..).unwrap_or_default();
            return Err(ControlError::Handshake(format!(
                "server error: {}",
                String::from_utf8_lossy(msg)
            )));
        }
        if resp.len() != RESPONSE_LEN || resp[0] != MSG_RESPONSE {
            return Err(ControlError::Handshake("malformed response".into()));
        }
        let mut scratch = [0u8; 64];
        self.hs
            .read_message(&resp[HEADER..], &mut scratch)
            .map_err(hs_err)?;
        let (c1, c2) = self.hs.dangerously_get_raw_split();
        Ok(Established {
            version: self.version,
            peer: self.server,
            tx: c1,
            rx: c2,
        })
    }
}

/// One direction's cipher and counter.
struct Cipher {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl Cipher {
    fn new(key: &[u8; 32]) -> Cipher {
        Cipher {
            aead: ChaCha20Poly1305::new(key.into()),
            counter: 0,
        }
    }

    fn nonce(&mut self) -> io::Result<Nonce> {
        if self.counter == u64::MAX {
            return Err(io::Error::other("noise: nonces exhausted"));
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(n.into())
    }
}

/// The record layer as a byte stream (what HTTP/2 runs on).
pub struct NoiseStream<S> {
    inner: S,
    tx: Cipher,
    rx: Cipher,
    /// Raw bytes read from `inner` (at most one frame and a bit).
    rbuf: Box<[u8; MAX_FRAME]>,
    rlen: usize,
    /// Decrypted bytes not yet handed out.
    plain: Vec<u8>,
    ppos: usize,
    /// Sealed bytes not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    eof: bool,
}

impl<S> std::fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStream").finish_non_exhaustive()
    }
}

/// Sealed bytes buffered before a write waits for the socket.
const WRITE_HIGH_WATER: usize = 4 * MAX_FRAME;

impl<S> NoiseStream<S> {
    fn new(inner: S, tx: &[u8; 32], rx: &[u8; 32]) -> NoiseStream<S> {
        NoiseStream {
            inner,
            tx: Cipher::new(tx),
            rx: Cipher::new(rx),
            rbuf: Box::new([0u8; MAX_FRAME]),
            rlen: 0,
            plain: Vec::new(),
            ppos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            eof: false,
        }
    }

    /// Decrypts the first complete frame in `rbuf`, if there is one.
    fn take_frame(&mut self) -> io::Result<bool> {
        if self.rlen < HEADER {
            return Ok(false);
        }
        if self.rbuf[0] != MSG_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("noise: unexpected message type {}", self.rbuf[0]),
            ));
        }
        let len = usize::from(u16::from_be_bytes([self.rbuf[1], self.rbuf[2]]));
        if HEADER + len > MAX_FRAME || len < TAG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("noise: bad record length {len}"),
            ));
        }
        if self.rlen < HEADER + len {
            return Ok(false);
        }
        let body = &self.rbuf[HEADER..HEADER + len];
        let (ct, tag) = body.split_at(len - TAG);
        self.plain.clear();
        self.plain.extend_from_slice(ct);
        self.ppos = 0;
        let nonce = self.rx.nonce()?;
        self.rx
            .aead
            .decrypt_in_place_detached(&nonce, &[], &mut self.plain, Tag::from_slice(tag))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "noise: record decryption failed",
                )
            })?;
        self.rbuf.copy_within(HEADER + len..self.rlen, 0);
        self.rlen -= HEADER + len;
        Ok(true)
    }

    fn seal(&mut self, data: &[u8]) -> io::Result<()> {
        let start = self.wbuf.len();
        self.wbuf.push(MSG_RECORD);
        self.wbuf
            .extend_from_slice(&((data.len() + TAG) as u16).to_be_bytes());
        self.wbuf.extend_from_slice(data);
        let nonce = self.tx.nonce()?;
        let tag = self
            .tx
            .aead
            .encrypt_in_place_detached(&nonce, &[], &mut self.wbuf[start + HEADER..])
            .map_err(|_| io::Error::other("noise: encryption failed"))?;
        self.wbuf.extend_from_slice(&tag);
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> NoiseStream<S> {
    /// Writes buffered sealed bytes; `Ready(Ok)` once all are written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > WRITE_HIGH_WATER + MAX_FRAME {
            self.wbuf.shrink_to(MAX_FRAME);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ppos < this.plain.len() {
                let n = (this.plain.len() - this.ppos).min(buf.remaining());
                buf.put_slice(&this.plain[this.ppos..this.ppos + n]);
                this.ppos += n;
                if this.ppos == this.plain.len() && this.plain.capacity() > MAX_FRAME {
                    this.plain = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.take_frame()? {
                continue;
            }
            if this.eof {
                return if this.rlen == 0 {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                };
            }
            let mut rb = ReadBuf::new(&mut this.rbuf[this.rlen..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        this.eof = true;
                    }
                    this.rlen += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wbuf.len() - this.wpos >= WRITE_HIGH_WATER {
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        this.seal(&buf[..n])?;
        // Start writing now; what does not fit waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn handshake_agrees_and_rejects_bad_input() {
        let server = MachineKeyPair::generate().unwrap();
        let client = MachineKeyPair::generate().unwrap();
        let (init, ini) = Initiator::start(&client, server.public, 142).unwrap();
        assert_eq!(init.len(), INITIATION_LEN);
        let (resp, srv) = accept(&init, &server).unwrap();
        assert_eq!(srv.peer, client.public);
        assert_eq!(srv.version, 142);
        let cli = ini.finish(&resp).unwrap();
        assert_eq!(cli.tx, srv.rx);
        assert_eq!(cli.rx, srv.tx);
        // A client that has the wrong server key fails; so does a truncated message.
        let other = MachineKeyPair::generate().unwrap();
        let (init2, _) = Initiator::start(&client, other.public, 142).unwrap();
        let r = accept(&init2, &server).unwrap_err();
        assert_eq!(r.frame[0], MSG_ERROR);
        assert!(accept(&init[..50], &server).is_err());
        let mut bad = init.clone();
        bad[2] = 9;
        assert!(accept(&bad, &server).is_err());
    }

    #[tokio::test]
    async fn records_round_trip_with_big_endian_nonces() {
        let server = MachineKeyPair::generate().unwrap();
        let client = MachineKeyPair::generate().unwrap();
        let (init, ini) = Initiator::start(&client, server.public, 142).unwrap();
        let (resp, srv) = accept(&init, &server).unwrap();
        let cli = ini.finish(&resp).unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = cli.clone().into_stream(a);
        let mut b = srv.into_stream(b);
        let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    a.write_all(&big).await.unwrap();
                }
                a.flush().await.unwrap();
                a
            })
        };
        let mut got = vec![0u8; big.len() * 3];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[2 * big.len()..], &big[..]);
        drop(writer.await.unwrap());

        // The second record is sealed with nonce 00000000_0000000000000001 (big-endian).
        let key = cli.tx;
        let (x, mut y) = tokio::io::duplex(1 << 16);
        let mut x = cli.into_stream(x);
        x.write_all(b"one").await.unwrap();
        x.write_all(b"two").await.unwrap();
        x.flush().await.unwrap();
        let mut raw = vec![0u8; 2 * (HEADER + 3 + TAG)];
        y.read_exact(&mut raw).await.unwrap();
        let second = &raw[HEADER + 3 + TAG..];
        assert_eq!(second[0], MSG_RECORD);
        let mut c = Cipher::new(&key);
        let _ = c.nonce().unwrap();
        let n = c.nonce().unwrap();
        assert_eq!(n.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut body = second[HEADER..HEADER + 3].to_vec();
        c.aead
            .decrypt_in_place_detached(&n, &[], &mut body, Tag::from_slice(&second[HEADER + 3..]))
            .unwrap();
        assert_eq!(body, b"two");
        // A little-endian nonce (stock Noise transport) does not open it.
        let mut le = [0u8; 12];
        le[4] = 1;
        let mut body = second[HEADER..HEADER + 3].to_vec();
        assert!(c
            .aead
            .decrypt_in_place_detached(
                &le.into(),
                &[],
                &mut body,
                Tag::from_slice(&second[HEADER + 3..])
            )
            .is_err());
    }
}
