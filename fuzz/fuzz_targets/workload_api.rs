//! Workload API request decoding, as the agent's gRPC server does it: the
//! gRPC length-prefixed framing of a request body, split into arbitrary HTTP/2
//! DATA frames, through the agent's `SmallBufferCodec` into each request
//! message, plus plain prost decoding of every request message.
//!
//! Input: byte 0 picks the request type (mod 7), byte 1 the DATA frame size
//! (1..=256 bytes); the rest is the request body.
//!
//! Properties beyond "no panic": a message that decodes re-encodes to bytes
//! that decode to the same message; the decoder never yields more messages
//! than the body has bytes / 5 (each needs a 5-byte header).
#![no_main]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::StreamBody;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_workload_api as api;
use tessera_workload_api::codec::SmallBufferCodec;
use tonic::codec::{Codec, Streaming};

fuzz_target!(|data: &[u8]| {
    let [kind, frame, body @ ..] = data else {
        return;
    };
    let frame = usize::from(*frame) + 1;
    match kind % 7 {
        0 => run::<api::X509svidRequest, api::X509svidResponse>(body, frame),
        1 => run::<api::X509BundlesRequest, api::X509BundlesResponse>(body, frame),
        2 => run::<api::JwtsvidRequest, api::JwtsvidResponse>(body, frame),
        3 => run::<api::JwtBundlesRequest, api::JwtBundlesResponse>(body, frame),
        4 => run::<api::ValidateJwtsvidRequest, api::ValidateJwtsvidResponse>(body, frame),
        5 => run::<api::WitsvidRequest, api::WitsvidResponse>(body, frame),
        _ => run::<api::WitBundlesRequest, api::WitBundlesResponse>(body, frame),
    }
});

fn run<Req, Resp>(body: &[u8], frame: usize)
where
    Req: Message + Default + PartialEq + Send + 'static,
    Resp: Message + Send + 'static,
{
    // Plain prost decoding of the whole body as one message.
    if let Ok(msg) = Req::decode(body) {
        round_trip(&msg);
    }

    // The server path: gRPC framing + the agent's codec.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = body
        .chunks(frame)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let stream_body = StreamBody::new(futures_util::stream::iter(chunks));
    let decoder = SmallBufferCodec::<Resp, Req>::default().decoder();
    let mut streaming: Streaming<Req> = Streaming::new_request(decoder, stream_body, None, None);

    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut messages = 0usize;
    // Every frame is ready, so the stream never waits; the bound only guards
    // against a decoder that would loop.
    for _ in 0..body.len() + 16 {
        match Pin::new(&mut streaming).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(msg))) => {
                messages += 1;
                round_trip(&msg);
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => break,
            Poll::Pending => panic!("a fully buffered request body returned Pending"),
        }
    }
    assert!(
        messages <= body.len() / 5,
        "{messages} messages from {} bytes",
        body.len()
    );
}

fn round_trip<M: Message + Default + PartialEq>(msg: &M) {
    let bytes = msg.encode_to_vec();
    let again = M::decode(bytes.as_slice()).expect("re-encoded message decodes");
    assert!(again == *msg, "prost round trip changed the message");
}
