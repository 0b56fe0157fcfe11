//! The client-to-server frame checker of the authority front: pure, no I/O.
//!
//! Owns the HTTP/2 framing rules the front must enforce itself because it buffers and
//! rewrites header blocks (RFC 9113): the preface must be followed by a SETTINGS frame
//! (section 3.4); no frame may exceed the server's SETTINGS_MAX_FRAME_SIZE, 16,384 until
//! the server announces more (section 4.2); a header block is HEADERS on an odd, non-zero
//! stream followed only by CONTINUATION frames on the same stream until END_HEADERS
//! (sections 6.2, 6.10); a client never sends PUSH_PROMISE (section 8.4); a header block,
//! its number of CONTINUATION frames and its decoded header list are bounded (the
//! server's SETTINGS_MAX_HEADER_LIST_SIZE, as h2 bounds CONTINUATION floods). Any
//! violation is a connection error with the RFC's error code; nothing after it is
//! forwarded. It must not judge frames it does not rewrite (DATA, SETTINGS, PING,
//! WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY, unknown types): they pass through for
//! h2 to check, bounded in size only.

use loona_hpack::{Decoder, Encoder};

/// Frame types the checker names (RFC 9113 section 6).
pub const FRAME_HEADERS: u8 = 0x1;
/// SETTINGS frame type.
pub const FRAME_SETTINGS: u8 = 0x4;
/// PUSH_PROMISE frame type.
pub const FRAME_PUSH_PROMISE: u8 = 0x5;
/// GOAWAY frame type.
pub const FRAME_GOAWAY: u8 = 0x7;
/// CONTINUATION frame type.
pub const FRAME_CONTINUATION: u8 = 0x9;
/// END_STREAM flag of HEADERS.
pub const FLAG_END_STREAM: u8 = 0x1;
/// ACK flag of SETTINGS and PING.
pub const FLAG_ACK: u8 = 0x1;
/// END_HEADERS flag of HEADERS and CONTINUATION.
pub const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The initial SETTINGS_MAX_FRAME_SIZE (RFC 9113 section 6.5.2); frames the front
/// writes never exceed it.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE a peer may announce (2^24 - 1).
const MAX_MAX_FRAME: usize = (1 << 24) - 1;
/// Header list bound until the server announces SETTINGS_MAX_HEADER_LIST_SIZE: the
/// value hyper's HTTP/2 server announces (16 KiB).
pub const DEFAULT_HEADER_LIST: usize = 16 * 1024;
/// Ceiling on any announced header list size the front buffers for (1 MiB).
const MAX_HEADER_LIST: usize = 1 << 20;
/// The initial SETTINGS_HEADER_TABLE_SIZE (RFC 9113 section 6.5.2).
const DEFAULT_TABLE: usize = 4_096;
/// Authority every rewritten request carries.
pub const AUTHORITY: &[u8] = b"localhost";

/// HTTP/2 error codes the front sends in GOAWAY (RFC 9113 section 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// PROTOCOL_ERROR (0x1): framing or ordering broken.
    Protocol = 0x1,
    /// FRAME_SIZE_ERROR (0x6): a frame longer than SETTINGS_MAX_FRAME_SIZE.
    FrameSize = 0x6,
    /// COMPRESSION_ERROR (0x9): an undecodable header block.
    Compression = 0x9,
    /// ENHANCE_YOUR_CALM (0xb): a header block over the front's bounds.
    Calm = 0xb,
}

/// A connection error: the front sends GOAWAY with `reason` and closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 connection error {reason:?}: {what}")]
pub struct ConnError {
    /// GOAWAY error code.
    pub reason: Reason,
    /// What was wrong, for the log.
    pub what: String,
}

fn fail(reason: Reason, what: impl Into<String>) -> ConnError {
    ConnError {
        reason,
        what: what.into(),
    }
}

/// A decoded 9-byte frame header (RFC 9113 section 4.1); `stream` without the reserved bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// Payload length in bytes (24 bits).
    pub len: usize,
    /// Frame type.
    pub kind: u8,
    /// Frame flags.
    pub flags: u8,
    /// Stream identifier (31 bits).
    pub stream: u32,
}

impl FrameHead {
    /// Decodes the wire form.
    pub fn parse(b: &[u8; 9]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// The wire form; `len` must fit 24 bits.
    pub fn encode(&self) -> [u8; 9] {
        let s = self.stream.to_be_bytes();
        let len = self.len.to_be_bytes();
        let n = len.len();
        [
            len[n - 3],
            len[n - 2],
            len[n - 1],
            self.kind,
            self.flags,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }
}

/// What the server announced in its SETTINGS, as far as the front cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// SETTINGS_MAX_FRAME_SIZE: the longest client frame accepted, bytes.
    pub max_frame: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE, capped at 1 MiB: bound on a header block and on
    /// its decoded list (names + values + 32 per field, RFC 9113 section 6.5.2), bytes.
    pub header_list: usize,
    /// SETTINGS_HEADER_TABLE_SIZE: the largest HPACK table the client may use, bytes.
    pub table: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            header_list: DEFAULT_HEADER_LIST,
            table: DEFAULT_TABLE,
        }
    }
}

impl Limits {
    /// Applies a server SETTINGS payload (6-byte entries, section 6.5.1). The client
    /// must honour new values only once it acknowledges them; the front applies them
    /// when it sees them, which is at most as lenient as the server itself. A malformed
    /// payload is left for h2 to reject and changes nothing.
    pub fn apply_settings(&mut self, payload: &[u8]) {
        if !payload.len().is_multiple_of(6) {
            return;
        }
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]) as usize;
            match id {
                0x1 => self.table = value,
                0x5 if (DEFAULT_MAX_FRAME..=MAX_MAX_FRAME).contains(&value) => {
                    self.max_frame = value;
                }
                0x6 => self.header_list = value.min(MAX_HEADER_LIST),
                _ => {}
            }
        }
    }

    /// CONTINUATION frames allowed in one block: as h2 computes it, the frames a
    /// maximal header list needs plus a quarter, at least 5.
    fn max_continuations(&self) -> usize {
        let frames = (self.header_list / self.max_frame).max(1);
        frames.saturating_add(frames >> 2).max(5)
    }
}

struct Pending {
    stream: u32,
    end_stream: u8,
    block: Vec<u8>,
    continuations: usize,
}

/// Checks and rewrites one connection's client-to-server frames, after the preface.
pub struct ClientFrames {
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    pending: Option<Pending>,
    settings_seen: bool,
    last_stream: u32,
}

impl Default for ClientFrames {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientFrames {
    /// State at the start of a connection (right after the preface).
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_TABLE);
        Self {
            decoder,
            encoder: Encoder::new(),
            pending: None,
            settings_seen: false,
            last_stream: 0,
        }
    }

    /// Highest stream id of a header block forwarded: the GOAWAY's last stream id.
    pub fn last_stream(&self) -> u32 {
        self.last_stream
    }

    /// Judges a frame header before its payload is read, so no oversized or misplaced
    /// payload is ever buffered. Errors: see the module doc.
    pub fn check_head(&self, head: &FrameHead, limits: &Limits) -> Result<(), ConnError> {
        if head.len > limits.max_frame {
            return Err(fail(
                Reason::FrameSize,
                format!(
                    "frame of {} bytes over SETTINGS_MAX_FRAME_SIZE {}",
                    head.len, limits.max_frame
                ),
            ));
        }
        if !self.settings_seen && (head.kind != FRAME_SETTINGS || head.flags & FLAG_ACK != 0) {
            return Err(fail(Reason::Protocol, "preface not followed by SETTINGS"));
        }
        match (&self.pending, head.kind) {
            (Some(p), FRAME_CONTINUATION) if p.stream != head.stream => Err(fail(
                Reason::Protocol,
                format!(
                    "CONTINUATION on stream {} inside a block of stream {}",
                    head.stream, p.stream
                ),
            )),
            (Some(p), FRAME_CONTINUATION) if p.continuations >= limits.max_continuations() => {
                Err(fail(Reason::Calm, "too many CONTINUATION frames"))
            }
            (Some(p), FRAME_CONTINUATION) if p.block.len() + head.len > limits.header_list => {
                Err(fail(
                    Reason::Calm,
                    "header block over SETTINGS_MAX_HEADER_LIST_SIZE",
                ))
            }
            (Some(_), FRAME_CONTINUATION) => Ok(()),
            (Some(p), _) => Err(fail(
                Reason::Protocol,
                format!(
                    "frame type {:#x} inside the header block of stream {}",
                    head.kind, p.stream
                ),
            )),
            (None, FRAME_CONTINUATION) => {
                Err(fail(Reason::Protocol, "CONTINUATION without HEADERS"))
            }
            (None, FRAME_PUSH_PROMISE) => Err(fail(Reason::Protocol, "PUSH_PROMISE from a client")),
            (None, FRAME_HEADERS) if head.stream == 0 || head.stream.is_multiple_of(2) => {
                Err(fail(
                    Reason::Protocol,
                    format!("HEADERS on stream {}, not a client stream", head.stream),
                ))
            }
            (None, FRAME_HEADERS) if head.len > limits.header_list + 256 + 6 => Err(fail(
                Reason::Calm,
                "header block over SETTINGS_MAX_HEADER_LIST_SIZE",
            )),
            (None, _) => Ok(()),
        }
    }

    /// Takes one frame that passed [`ClientFrames::check_head`] with its payload and
    /// returns the bytes to forward to the server (possibly none, while a header block
    /// is incomplete). Errors: see the module doc.
    pub fn frame(
        &mut self,
        head: &FrameHead,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Vec<u8>, ConnError> {
        self.check_head(head, limits)?;
        if head.kind == FRAME_SETTINGS {
            self.settings_seen = true;
        }
        match head.kind {
            FRAME_HEADERS => {
                let fragment = header_fragment(payload, head.flags)?;
                if fragment.len() > limits.header_list {
                    return Err(fail(
                        Reason::Calm,
                        "header block over SETTINGS_MAX_HEADER_LIST_SIZE",
                    ));
                }
                self.pending = Some(Pending {
                    stream: head.stream,
                    end_stream: head.flags & FLAG_END_STREAM,
                    block: fragment.to_vec(),
                    continuations: 0,
                });
            }
            FRAME_CONTINUATION => {
                if let Some(p) = self.pending.as_mut() {
                    p.block.extend_from_slice(payload);
                    p.continuations += 1;
                }
            }
            _ => {
                let mut out = Vec::with_capacity(9 + payload.len());
                out.extend_from_slice(&head.encode());
                out.extend_from_slice(payload);
                return Ok(out);
            }
        }
        if head.flags & FLAG_END_HEADERS == 0 {
            return Ok(Vec::new());
        }
        let Some(p) = self.pending.take() else {
            return Ok(Vec::new());
        };
        self.decoder.set_max_allowed_table_size(limits.table);
        let block = self.rewrite(&p.block, limits.header_list)?;
        self.last_stream = self.last_stream.max(p.stream);
        Ok(header_frames(&block, p.stream, p.end_stream))
    }

    /// Decodes one complete header block, sets `:authority` to [`AUTHORITY`], and
    /// encodes the result with the connection's encoder state.
    fn rewrite(&mut self, block: &[u8], limit: usize) -> Result<Vec<u8>, ConnError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(block, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= limit {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|err| fail(Reason::Compression, format!("HPACK: {err:?}")))?;
        if size > limit {
            return Err(fail(
                Reason::Calm,
                format!("header list of {size} bytes over {limit}"),
            ));
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" {
                AUTHORITY.clone_into(value);
            }
        }
        Ok(self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))))
    }
}

/// The header block fragment of a HEADERS frame payload, without padding and priority
/// (section 6.2). Errors: padding or priority longer than the payload.
fn header_fragment(payload: &[u8], flags: u8) -> Result<&[u8], ConnError> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| fail(Reason::FrameSize, "empty padded HEADERS"))?,
        );
        start = 1;
        end = end
            .checked_sub(pad)
            .ok_or_else(|| fail(Reason::Protocol, "HEADERS padding too long"))?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    payload
        .get(start..end)
        .ok_or_else(|| fail(Reason::Protocol, "HEADERS padding or priority too long"))
}

/// HEADERS (plus CONTINUATION when needed) frames carrying `block` on `stream`, none
/// longer than [`DEFAULT_MAX_FRAME`].
pub fn header_frames(block: &[u8], stream: u32, end_stream: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 9);
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![block]
    } else {
        block.chunks(DEFAULT_MAX_FRAME).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let (kind, mut flags) = if i == 0 {
            (FRAME_HEADERS, end_stream)
        } else {
            (FRAME_CONTINUATION, 0)
        };
        if i + 1 == chunks.len() {
            flags |= FLAG_END_HEADERS;
        }
        let head = FrameHead {
            len: chunk.len(),
            kind,
            flags,
            stream,
        };
        out.extend_from_slice(&head.encode());
        out.extend_from_slice(chunk);
    }
    out
}

/// A GOAWAY frame (section 6.8) with `last_stream` and `reason`, no debug data.
pub fn goaway(last_stream: u32, reason: Reason) -> Vec<u8> {
    let head = FrameHead {
        len: 8,
        kind: FRAME_GOAWAY,
        flags: 0,
        stream: 0,
    };
    let mut out = head.encode().to_vec();
    out.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&(reason as u32).to_be_bytes());
    out
}
