use std::time::Duration;

use loona_hpack::{Decoder, Encoder};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::frames::*;
use super::{PREFACE, front};

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn request(authority: &[u8]) -> Fields {
    vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (
            b":path".to_vec(),
            b"/pluginregistration.Registration/GetInfo".to_vec(),
        ),
        (b":authority".to_vec(), authority.to_vec()),
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
    ]
}

fn encode(encoder: &mut Encoder<'static>, fields: &Fields) -> Vec<u8> {
    encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
}

fn head(len: usize, kind: u8, flags: u8, stream: u32) -> FrameHead {
    FrameHead {
        len,
        kind,
        flags,
        stream,
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = head(payload.len(), kind, flags, stream).encode().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A checker past the client's SETTINGS frame.
fn started() -> ClientFrames {
    let mut frames = ClientFrames::new();
    let out = frames
        .frame(&head(0, FRAME_SETTINGS, 0, 0), &[], &Limits::default())
        .unwrap();
    assert_eq!(out, frame(FRAME_SETTINGS, 0, 0, &[]));
    frames
}

/// Splits a byte stream of frames into (head, payload) pairs; panics on a torn frame.
fn split_frames(mut bytes: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let raw: [u8; 9] = bytes[..9].try_into().unwrap();
        let h = FrameHead::parse(&raw);
        out.push((h, bytes[9..9 + h.len].to_vec()));
        bytes = &bytes[9 + h.len..];
    }
    out
}

/// Header blocks a server would see in `bytes`, checking their framing on the way.
fn server_blocks(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut open: Option<(u32, Vec<u8>)> = None;
    for (h, payload) in split_frames(bytes) {
        assert!(
            h.len <= DEFAULT_MAX_FRAME,
            "frame of {} bytes forwarded",
            h.len
        );
        match (&mut open, h.kind) {
            (Some((stream, block)), FRAME_CONTINUATION) => {
                assert_eq!(*stream, h.stream);
                block.extend_from_slice(&payload);
            }
            (Some(_), kind) => panic!("frame {kind:#x} forwarded inside a header block"),
            (None, FRAME_HEADERS) => open = Some((h.stream, payload)),
            (None, FRAME_CONTINUATION) => panic!("CONTINUATION forwarded without HEADERS"),
            (None, _) => {}
        }
        if matches!(h.kind, FRAME_HEADERS | FRAME_CONTINUATION) && h.flags & FLAG_END_HEADERS != 0 {
            blocks.extend(open.take());
        }
    }
    assert!(open.is_none(), "an unfinished header block was forwarded");
    blocks
}

fn sorted(mut fields: Fields) -> Fields {
    fields.sort();
    fields
}

#[test]
fn socket_path_authority_becomes_localhost_across_requests() {
    let path = b"var%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.gpu-dra.dev-reg.sock";
    let mut client = Encoder::new();
    let mut server = Decoder::new();
    let mut frames = started();
    // Twice: the second block refers to the client's dynamic table.
    for stream in [1, 3] {
        let block = encode(&mut client, &request(path));
        let out = frames
            .frame(
                &head(block.len(), FRAME_HEADERS, FLAG_END_HEADERS, stream),
                &block,
                &Limits::default(),
            )
            .unwrap();
        let blocks = server_blocks(&out);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].0, stream);
        let seen = server.decode(&blocks[0].1).unwrap();
        assert_eq!(sorted(seen), sorted(request(AUTHORITY)));
    }
    assert_eq!(frames.last_stream(), 3);
}

#[test]
fn garbage_block_is_a_compression_error() {
    let block = [0xff, 0xff, 0xff, 0xff, 0xff];
    let err = started()
        .frame(
            &head(5, FRAME_HEADERS, FLAG_END_HEADERS, 1),
            &block,
            &Limits::default(),
        )
        .unwrap_err();
    assert_eq!(err.reason, Reason::Compression);
}

#[test]
fn padding_and_priority_are_stripped_and_big_blocks_split() {
    let mut client = Encoder::new();
    let block = encode(&mut client, &request(b"x"));
    let mut payload = vec![2u8, 0, 0, 0, 1, 16];
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&[0, 0]);
    let out = started()
        .frame(
            &head(
                payload.len(),
                FRAME_HEADERS,
                FLAG_END_HEADERS | 0x8 | 0x20,
                1,
            ),
            &payload,
            &Limits::default(),
        )
        .unwrap();
    let seen = Decoder::new().decode(&server_blocks(&out)[0].1).unwrap();
    assert_eq!(sorted(seen), sorted(request(AUTHORITY)));

    let err = started()
        .frame(
            &head(2, FRAME_HEADERS, FLAG_END_HEADERS | 0x8, 1),
            &[9, 1],
            &Limits::default(),
        )
        .unwrap_err();
    assert_eq!(err.reason, Reason::Protocol);

    let frames = header_frames(&vec![7u8; DEFAULT_MAX_FRAME + 10], 3, FLAG_END_STREAM);
    let parts = split_frames(&frames);
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0].0.kind, parts[0].0.flags),
        (FRAME_HEADERS, FLAG_END_STREAM)
    );
    assert_eq!(
        (parts[1].0.kind, parts[1].0.flags),
        (FRAME_CONTINUATION, FLAG_END_HEADERS)
    );
}

#[test]
fn frames_over_the_max_frame_size_are_refused_before_their_payload() {
    let limits = Limits::default();
    let frames = started();
    let err = frames
        .check_head(&head(DEFAULT_MAX_FRAME + 1, 0x0, 0, 1), &limits)
        .unwrap_err();
    assert_eq!(err.reason, Reason::FrameSize);
    assert!(
        frames
            .check_head(&head(DEFAULT_MAX_FRAME, 0x0, 0, 1), &limits)
            .is_ok()
    );
    // Once the server announces a larger SETTINGS_MAX_FRAME_SIZE, it applies.
    let mut raised = limits;
    raised.apply_settings(&[0, 5, 0, 0, 0x80, 0]);
    assert_eq!(raised.max_frame, 32_768);
    assert!(frames.check_head(&head(32_768, 0x0, 0, 1), &raised).is_ok());
    // Out-of-range announcements are ignored (RFC 9113 section 6.5.2).
    raised.apply_settings(&[0, 5, 0, 0, 0x10, 0]);
    raised.apply_settings(&[0, 5, 0x01, 0, 0, 0]);
    assert_eq!(raised.max_frame, 32_768);
}

#[test]
fn header_block_ordering_is_enforced() {
    let limits = Limits::default();
    let mut client = Encoder::new();
    let block = encode(&mut client, &request(b"x"));
    let (a, b) = block.split_at(3);
    let open = |frames: &mut ClientFrames| {
        assert!(
            frames
                .frame(&head(a.len(), FRAME_HEADERS, 0, 1), a, &limits)
                .unwrap()
                .is_empty()
        );
    };
    // CONTINUATION on another stream.
    let mut frames = started();
    open(&mut frames);
    let err = frames
        .frame(
            &head(b.len(), FRAME_CONTINUATION, FLAG_END_HEADERS, 3),
            b,
            &limits,
        )
        .unwrap_err();
    assert_eq!(err.reason, Reason::Protocol);
    // Any other frame inside the block, even on the same stream.
    let mut frames = started();
    open(&mut frames);
    let err = frames
        .frame(&head(4, 0x8, 0, 1), &[0, 0, 1, 0], &limits)
        .unwrap_err();
    assert_eq!(err.reason, Reason::Protocol);
    // CONTINUATION with no block open, HEADERS on stream 0 or an even stream, PUSH_PROMISE.
    for (kind, stream) in [
        (FRAME_CONTINUATION, 1),
        (FRAME_HEADERS, 0),
        (FRAME_HEADERS, 2),
        (FRAME_PUSH_PROMISE, 1),
    ] {
        let err = started()
            .frame(&head(b.len(), kind, FLAG_END_HEADERS, stream), b, &limits)
            .unwrap_err();
        assert_eq!(
            err.reason,
            Reason::Protocol,
            "kind {kind:#x} on stream {stream}"
        );
    }
    // The preface must be followed by SETTINGS.
    let err = ClientFrames::new()
        .frame(&head(8, 0x6, 0, 0), &[0; 8], &limits)
        .unwrap_err();
    assert_eq!(err.reason, Reason::Protocol);
    // The split block itself is fine.
    let mut frames = started();
    open(&mut frames);
    let out = frames
        .frame(
            &head(b.len(), FRAME_CONTINUATION, FLAG_END_HEADERS, 1),
            b,
            &limits,
        )
        .unwrap();
    assert_eq!(server_blocks(&out).len(), 1);
}

#[test]
fn header_blocks_and_lists_are_bounded() {
    let limits = Limits::default();
    // A CONTINUATION flood of empty frames.
    let mut frames = started();
    frames
        .frame(&head(0, FRAME_HEADERS, 0, 1), &[], &limits)
        .unwrap();
    let mut reason = None;
    for _ in 0..100 {
        if let Err(err) = frames.frame(&head(0, FRAME_CONTINUATION, 0, 1), &[], &limits) {
            reason = Some(err.reason);
            break;
        }
    }
    assert_eq!(reason, Some(Reason::Calm));
    // A block longer than the header list bound.
    let mut frames = started();
    frames
        .frame(&head(10_000, FRAME_HEADERS, 0, 1), &[0x82; 10_000], &limits)
        .unwrap();
    let err = frames
        .check_head(
            &head(10_000, FRAME_CONTINUATION, FLAG_END_HEADERS, 1),
            &limits,
        )
        .unwrap_err();
    assert_eq!(err.reason, Reason::Calm);
    // A small block that decodes to a huge list: one 4 KB table entry referenced 2,000 times.
    let mut client = Encoder::new();
    let big = vec![(b"x-big".to_vec(), vec![b'a'; 4_000])];
    let mut frames = started();
    let first = encode(&mut client, &big);
    frames
        .frame(
            &head(first.len(), FRAME_HEADERS, FLAG_END_HEADERS, 1),
            &first,
            &limits,
        )
        .unwrap();
    let again = encode(&mut client, &big);
    assert!(again.len() < 4, "the encoder indexes the field");
    let bomb: Vec<u8> = again
        .iter()
        .copied()
        .cycle()
        .take(again.len() * 2_000)
        .collect();
    let err = frames
        .frame(
            &head(bomb.len(), FRAME_HEADERS, FLAG_END_HEADERS, 3),
            &bomb,
            &limits,
        )
        .unwrap_err();
    assert_eq!(err.reason, Reason::Calm);
}

fn arb_fields() -> impl Strategy<Value = Fields> {
    let name = prop::collection::vec(
        prop::sample::select(b"abcdefghijklmnopqrstuvwxyz-".to_vec()),
        1..12,
    );
    let value = prop::collection::vec(any::<u8>(), 0..300);
    (
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec((name, value), 0..8),
    )
        .prop_map(|(authority, extra)| {
            let mut fields = request(&authority);
            fields.extend(extra);
            fields
        })
}

/// One frame of a fuzzed client stream: (kind, flags, stream, payload).
fn arb_frame() -> impl Strategy<Value = (u8, u8, u32, Vec<u8>)> {
    (
        prop_oneof![
            Just(FRAME_HEADERS),
            Just(FRAME_CONTINUATION),
            Just(FRAME_SETTINGS),
            Just(FRAME_PUSH_PROMISE),
            Just(0x0u8),
            any::<u8>()
        ],
        any::<u8>(),
        0u32..6,
        prop::collection::vec(any::<u8>(), 0..64),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Valid requests, fragmented and padded at random, reach the server intact but for
    /// `:authority`, in frames the server accepts.
    #[test]
    fn fuzz_valid_requests_round_trip(
        requests in prop::collection::vec((arb_fields(), 1usize..6, 0u8..4), 1..5),
    ) {
        let limits = Limits::default();
        let mut client = Encoder::new();
        let mut server = Decoder::new();
        let mut frames = started();
        for (i, (fields, pieces, pad)) in requests.into_iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            let block = encode(&mut client, &fields);
            let size = block.len().div_ceil(pieces).max(1);
            let chunks: Vec<&[u8]> = if block.is_empty() { vec![&block[..]] } else { block.chunks(size).collect() };
            let mut out = Vec::new();
            for (j, chunk) in chunks.iter().enumerate() {
                let end = if j + 1 == chunks.len() { FLAG_END_HEADERS } else { 0 };
                let result = if j == 0 {
                    let mut payload = vec![pad];
                    payload.extend_from_slice(chunk);
                    payload.extend(std::iter::repeat_n(0, usize::from(pad)));
                    frames.frame(&head(payload.len(), FRAME_HEADERS, end | 0x8, stream), &payload, &limits)
                } else {
                    frames.frame(&head(chunk.len(), FRAME_CONTINUATION, end, stream), chunk, &limits)
                };
                out.extend(result.unwrap());
            }
            let blocks = server_blocks(&out);
            prop_assert_eq!(blocks.len(), 1);
            let mut want = fields.clone();
            for (name, value) in &mut want {
                if name.as_slice() == b":authority" {
                    *value = AUTHORITY.to_vec();
                }
            }
            prop_assert_eq!(sorted(server.decode(&blocks[0].1).unwrap()), sorted(want));
        }
    }

    /// Arbitrary frame sequences never panic, and what is forwarded before the first
    /// error is well-framed: no torn or oversized frame, no interleaved header block.
    #[test]
    fn fuzz_arbitrary_frames_forward_only_well_formed_frames(
        input in prop::collection::vec(arb_frame(), 0..24),
    ) {
        let limits = Limits::default();
        let mut frames = started();
        let mut forwarded = Vec::new();
        for (kind, flags, stream, payload) in input {
            let h = head(payload.len(), kind, flags, stream);
            match frames.frame(&h, &payload, &limits) {
                Ok(out) => forwarded.extend(out),
                Err(_) => break,
            }
        }
        server_blocks(&forwarded);
    }

    /// Arbitrary bytes after the preface, through the real front: it never hangs, and
    /// the connection always ends (both the client and the server see it close).
    #[test]
    fn fuzz_bytes_through_the_front_always_end_the_connection(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        settings_first in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (mut client, accepted) = tokio::io::duplex(4096);
            let mut server = front(accepted);
            client.write_all(PREFACE).await.unwrap();
            if settings_first {
                client.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await.unwrap();
            }
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            // The server sees the connection end; its reply direction then closes too.
            let seen = drain(&mut server).await;
            assert!(seen.starts_with(PREFACE));
            server.shutdown().await.unwrap();
            drop(server);
            drain(&mut client).await;
        });
    }
}

/// Reads `stream` to EOF (or a reset), failing the test after 10 s.
async fn drain(stream: &mut DuplexStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.read_to_end(&mut seen).await;
    });
    assert!(read.await.is_ok(), "connection did not end");
    seen
}

async fn read_frame(stream: &mut DuplexStream) -> (FrameHead, Vec<u8>) {
    let mut raw = [0u8; 9];
    stream.read_exact(&mut raw).await.unwrap();
    let h = FrameHead::parse(&raw);
    let mut payload = vec![0u8; h.len];
    stream.read_exact(&mut payload).await.unwrap();
    (h, payload)
}

#[tokio::test]
async fn a_violation_sends_goaway_and_closes_both_sides() {
    let (mut client, accepted) = tokio::io::duplex(1 << 16);
    let mut server = front(accepted);
    client.write_all(PREFACE).await.unwrap();
    client
        .write_all(&frame(FRAME_SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    let mut encoder = Encoder::new();
    let block = encode(&mut encoder, &request(b"x"));
    client
        .write_all(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block))
        .await
        .unwrap();
    // The server speaks first with its SETTINGS, announcing nothing larger.
    server
        .write_all(&frame(FRAME_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut client).await.0.kind, FRAME_SETTINGS);
    // A frame header claiming 16 MiB: refused at once, its payload never awaited.
    client
        .write_all(&head((1 << 24) - 1, 0x0, 0, 1).encode())
        .await
        .unwrap();
    let (h, payload) = read_frame(&mut client).await;
    assert_eq!((h.kind, h.stream), (FRAME_GOAWAY, 0));
    assert_eq!(payload, [0, 0, 0, 1, 0, 0, 0, Reason::FrameSize as u8]);
    drain(&mut client).await;
    let seen = drain(&mut server).await;
    let blocks = server_blocks(&seen[PREFACE.len()..]);
    assert_eq!(
        blocks.len(),
        1,
        "the request before the violation was forwarded"
    );
}

#[tokio::test]
async fn a_connection_closed_before_the_preface_ends_for_the_server() {
    for sent in [
        &b""[..],
        &b"PRI * HT"[..],
        &b"GET / HTTP/1.1\r\n\r\n\r\n\r\n\r\n"[..],
    ] {
        let (mut client, accepted) = tokio::io::duplex(4096);
        let mut server = front(accepted);
        client.write_all(sent).await.unwrap();
        client.shutdown().await.unwrap();
        let seen = drain(&mut server).await;
        assert!(seen.is_empty(), "nothing but a valid preface is forwarded");
        drain(&mut client).await;
    }
}
