//! An HTTP/2 front for the plugin's Unix sockets that rewrites the `:authority` header.
//!
//! Owns nothing but bytes in flight. Why it exists: the kubelet's plugin watcher dials the
//! registration socket with grpc-go's passthrough target (the socket path) and no
//! `WithAuthority` option (kubernetes pkg/kubelet/pluginmanager/operationexecutor,
//! v1.36), so the request carries the socket path, percent-encoded, as `:authority`. The
//! `h2` server under tonic rejects that as a malformed authority and resets the stream
//! (PROTOCOL_ERROR), so registration would never succeed. Kubernetes fixed the same for
//! CSI and device plugins by sending `localhost` (kubernetes PR 112597); this front does
//! the equivalent on our side: each client-to-server HEADERS block is HPACK-decoded, its
//! `:authority` set to `localhost`, re-encoded and forwarded; every other frame, and the
//! whole server-to-client direction, passes through unchanged (RFC 9113 framing,
//! RFC 7541 HPACK with per-connection decoder and encoder state).

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tracing::debug;

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce; our frames never exceed it.
const MAX_FRAME: usize = 16_384;
/// Authority every rewritten request carries.
pub const AUTHORITY: &[u8] = b"localhost";

/// Puts the front between an accepted client connection and the gRPC server: returns the
/// stream to hand to the server; two tasks shuttle bytes until either side closes.
pub fn front<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, proxy_side) = tokio::io::duplex(64 * 1024);
    let (client_read, mut client_write) = tokio::io::split(client);
    let (proxy_read, proxy_write) = tokio::io::split(proxy_side);
    tokio::spawn(async move {
        if let Err(err) = rewrite_stream(client_read, proxy_write).await {
            debug!(error = %err, "plugin socket connection closed");
        }
    });
    tokio::spawn(async move {
        let mut proxy_read = proxy_read;
        let _ = tokio::io::copy(&mut proxy_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    server_side
}

/// Copies an HTTP/2 client byte stream from `from` to `to`, rewriting header blocks.
async fn rewrite_stream<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client preface"));
    }
    to.write_all(&preface).await?;
    let mut headers = HeaderRewriter::new();
    // Header block being collected: (stream id, END_STREAM of its HEADERS frame, bytes).
    let mut pending: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match kind {
            FRAME_HEADERS => {
                let fragment = header_fragment(&payload, flags)?;
                pending = Some((stream, flags & FLAG_END_STREAM, fragment.to_vec()));
            }
            FRAME_CONTINUATION => match pending.as_mut() {
                Some((_, _, block)) => block.extend_from_slice(&payload),
                None => return Err(invalid("CONTINUATION without HEADERS")),
            },
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
            }
        }
        if matches!(kind, FRAME_HEADERS | FRAME_CONTINUATION) && flags & FLAG_END_HEADERS != 0 {
            let (stream, end_stream, block) = pending.take().ok_or_else(|| invalid("no header block"))?;
            let rewritten = headers.rewrite(&block)?;
            to.write_all(&header_frames(&rewritten, stream, end_stream)).await?;
        }
        to.flush().await?;
    }
    to.shutdown().await
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The header block fragment of a HEADERS frame payload, without padding and priority.
fn header_fragment(payload: &[u8], flags: u8) -> io::Result<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(*payload.first().ok_or_else(|| invalid("empty padded HEADERS"))?);
        start = 1;
        end = end.checked_sub(pad).ok_or_else(|| invalid("HEADERS padding too long"))?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end).ok_or_else(|| invalid("HEADERS frame too short"))
}

/// HEADERS (plus CONTINUATION when needed) frames carrying `block` on `stream`.
fn header_frames(block: &[u8], stream: u32, end_stream: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 9);
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![block]
    } else {
        block.chunks(MAX_FRAME).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, mut flags) = if i == 0 {
            (FRAME_HEADERS, end_stream)
        } else {
            (FRAME_CONTINUATION, 0)
        };
        if last {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Per-connection HPACK state: decodes the client's blocks, encodes ours.
pub struct HeaderRewriter {
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl Default for HeaderRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderRewriter {
    /// Fresh state, as at the start of a connection.
    pub fn new() -> Self {
        Self {
            decoder: Decoder::new(),
            encoder: Encoder::new(),
        }
    }

    /// Decodes one complete header block, sets `:authority` to [`AUTHORITY`] when present,
    /// and encodes the result. Errors on an undecodable block (the connection is closed).
    pub fn rewrite(&mut self, block: &[u8]) -> io::Result<Vec<u8>> {
        let mut fields = self
            .decoder
            .decode(block)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {err}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/pluginregistration.Registration/GetInfo".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
        ]
    }

    #[test]
    fn socket_path_authority_becomes_localhost_across_requests() {
        let path = b"var%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.gpu-dra.dev-reg.sock";
        let mut client = Encoder::new();
        let mut server = Decoder::new();
        let mut front = HeaderRewriter::new();
        // Twice: the second block refers to the client's dynamic table.
        for _ in 0..2 {
            let fields = request(path);
            let block = client.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let seen = server.decode(&front.rewrite(&block).unwrap()).unwrap();
            let mut want = request(AUTHORITY);
            want.sort();
            let mut seen = seen;
            seen.sort();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn garbage_block_is_an_error() {
        assert!(HeaderRewriter::new().rewrite(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn padding_and_priority_are_stripped_and_big_blocks_split() {
        let payload = [2u8, 0, 0, 0, 1, 16, 0xaa, 0xbb, 0, 0];
        assert_eq!(
            header_fragment(&payload, FLAG_PADDED | FLAG_PRIORITY).unwrap(),
            &[0xaa, 0xbb]
        );
        assert!(header_fragment(&[9, 1], FLAG_PADDED).is_err());
        let frames = header_frames(&vec![7u8; MAX_FRAME + 10], 3, FLAG_END_STREAM);
        assert_eq!(frames.len(), MAX_FRAME + 10 + 18);
        assert_eq!(frames[3], FRAME_HEADERS);
        assert_eq!(frames[4], FLAG_END_STREAM, "first frame does not end the headers");
        let second = 9 + MAX_FRAME;
        assert_eq!(frames[second + 3], FRAME_CONTINUATION);
        assert_eq!(frames[second + 4], FLAG_END_HEADERS);
    }
}
