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
//!
//! Upstream: h2 would accept such requests with hyperium/h2 pull request 487 ("Do not
//! require authority for UNIX domain sockets", <https://github.com/hyperium/h2/pull/487>,
//! open as of h2 0.4.20). Once a released h2 carries it and tonic uses that release, this
//! module and its call in `server.rs` can go.
//!
//! Strictness: because it buffers and rewrites header blocks, the front enforces what h2
//! would (see [`frames`]: frame size against the server's SETTINGS_MAX_FRAME_SIZE, read
//! from the server's SETTINGS as they pass; CONTINUATION ordering and stream ids; header
//! block, CONTINUATION count and header list bounds). A violation ends the connection
//! with GOAWAY and the RFC's error code, written between two server frames (the
//! server-to-client direction is copied frame by frame so it can be), then both sides
//! are closed. Every way a connection ends (EOF before or after the preface, a bad
//! preface, I/O errors, a violation, the server closing) drops the client socket and
//! the server's end of the pipe, so no descriptor outlives its connection.
//!
//! It must not buffer a whole server frame, judge frames it does not rewrite, or write
//! anything to the server after a violation.

mod frames;

use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Notify;
use tracing::debug;

use frames::{ClientFrames, ConnError, FLAG_ACK, FRAME_SETTINGS, FrameHead, Limits};

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a violating client gets to take its GOAWAY before the socket is closed.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// Puts the front between an accepted client connection and the gRPC server: returns the
/// stream to hand to the server; one task shuttles bytes both ways until the connection
/// ends, then drops both sides.
pub fn front<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, proxy_side) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if let Err(err) = shuttle(client, proxy_side).await {
            debug!(error = %err, "plugin socket connection closed");
        }
    });
    server_side
}

/// What both directions share: the server's limits and a violation to report.
#[derive(Default)]
struct Shared {
    limits: Mutex<Limits>,
    /// Set once by the client direction; the server direction writes it as GOAWAY.
    violation: Mutex<Option<(u32, ConnError)>>,
    abort: Notify,
}

impl Shared {
    fn limits(&self) -> Limits {
        self.limits.lock().map(|l| *l).unwrap_or_default()
    }
}

/// Runs one connection to its end. Returns why it ended when that was an error.
async fn shuttle<S>(client: S, proxy: DuplexStream) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (proxy_read, proxy_write) = tokio::io::split(proxy);
    let shared = Arc::new(Shared::default());
    let upstream = client_to_server(client_read, proxy_write, &shared);
    let downstream = server_to_client(proxy_read, client_write, &shared);
    tokio::pin!(upstream, downstream);
    tokio::select! {
        // The server closed or the client stopped taking bytes: the connection is over.
        result = &mut downstream => result,
        result = &mut upstream => match result {
            // The client half-closed after whole frames: let the server finish answering.
            Ok(()) => downstream.await,
            Err(Upstream::Violation(last_stream, err)) => {
                debug!(error = %err, "closing plugin socket connection with GOAWAY");
                if let Ok(mut slot) = shared.violation.lock() {
                    *slot = Some((last_stream, err.clone()));
                }
                shared.abort.notify_one();
                let _ = tokio::time::timeout(GOAWAY_GRACE, downstream).await;
                Err(io::Error::new(io::ErrorKind::InvalidData, err))
            }
            Err(Upstream::Io(err)) => Err(err),
        },
    }
    // Returning drops both halves of the client socket and of the server pipe.
}

enum Upstream {
    Violation(u32, ConnError),
    Io(io::Error),
}

impl From<io::Error> for Upstream {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on EOF before the first byte.
async fn read_whole<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = from.read(&mut buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    Ok(true)
}

/// Checks and copies the client's byte stream to the server, rewriting header blocks.
/// `Ok` when the client closed cleanly between frames (the server side is then shut
/// down for writing).
async fn client_to_server<R, W>(mut from: R, mut to: W, shared: &Shared) -> Result<(), Upstream>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    if !read_whole(&mut from, &mut preface).await? {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    if &preface != PREFACE {
        return Err(
            io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client preface").into(),
        );
    }
    to.write_all(&preface).await?;
    let mut frames = ClientFrames::new();
    let mut payload = Vec::new();
    loop {
        let mut raw = [0u8; 9];
        if !read_whole(&mut from, &mut raw).await? {
            break;
        }
        let head = FrameHead::parse(&raw);
        let limits = shared.limits();
        let violation = |err| Upstream::Violation(frames.last_stream(), err);
        frames.check_head(&head, &limits).map_err(violation)?;
        payload.resize(head.len, 0);
        if !read_whole(&mut from, &mut payload).await? && head.len > 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let last_stream = frames.last_stream();
        let out = frames
            .frame(&head, &payload, &limits)
            .map_err(|err| Upstream::Violation(last_stream, err))?;
        to.write_all(&out).await?;
        to.flush().await?;
    }
    to.shutdown().await?;
    Ok(())
}

/// Copies the server's frames to the client one frame at a time, noting the server's
/// SETTINGS; on a violation, writes GOAWAY at the next frame boundary and stops.
async fn server_to_client<R, W>(mut from: R, mut to: W, shared: &Shared) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut raw = [0u8; 9];
        let more = tokio::select! {
            biased;
            () = shared.abort.notified() => {
                let violation = shared.violation.lock().ok().and_then(|mut v| v.take());
                if let Some((last_stream, err)) = violation {
                    to.write_all(&frames::goaway(last_stream, err.reason)).await?;
                }
                break;
            }
            more = read_whole(&mut from, &mut raw) => more?,
        };
        if !more {
            break;
        }
        let head = FrameHead::parse(&raw);
        to.write_all(&raw).await?;
        if head.kind == FRAME_SETTINGS
            && head.stream == 0
            && head.flags & FLAG_ACK == 0
            && head.len <= 6 * 64
        {
            let mut payload = vec![0u8; head.len];
            read_whole(&mut from, &mut payload).await?;
            if let Ok(mut limits) = shared.limits.lock() {
                limits.apply_settings(&payload);
            }
            to.write_all(&payload).await?;
        } else {
            let copied = tokio::io::copy(&mut (&mut from).take(head.len as u64), &mut to).await?;
            if copied != head.len as u64 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        to.flush().await?;
    }
    to.shutdown().await
}
#[cfg(test)]
mod tests;
