//! gRPC messages framed by hand, for the long-lived streams (FetchX509SVID,
//! SDS StreamSecrets) that a node holds by the thousand.
//!
//! tonic encodes a response stream through a per-stream buffer that keeps the
//! allocation of the largest message sent until the stream ends, and decodes
//! a request stream through a buffer that keeps the largest request received
//! (an Envoy `DiscoveryRequest` carries its whole node description, tens of
//! kilobytes). Here each response message becomes one exactly-sized frame
//! that is freed once HTTP/2 has written it, and a request buffer is given
//! back as soon as it holds no partial message, so an idle stream holds no
//! encoded bytes at all.
//!
//! The rules are tonic's: an uncompressed 5-byte prefix (flag, big-endian
//! length), a request message larger than the limit is OutOfRange, an
//! undecodable one Internal, and the stream's final status goes in trailers.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Frame;
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::Status;
use tonic::body::Body;

/// A gRPC message's prefix: compression flag and big-endian length.
pub const HEADER_LEN: usize = 5;

/// A `200 application/grpc` response whose body is the messages of `stream`,
/// ended by trailers with the stream's final status (OK when it just ends).
pub fn streaming_response<S, M>(stream: S) -> http::Response<Body>
where
    S: Stream<Item = Result<M, Status>> + Unpin + Send + 'static,
    M: Message + 'static,
{
    let mut http = http::Response::new(Body::new(MessageFrames {
        stream: Some(stream),
    }));
    http.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    http
}

/// Reads the one request message of a unary or server-streaming call.
pub async fn read_unary<M: Message + Default>(body: Body, limit: usize) -> Result<M, Status> {
    // The length prefix is checked below; this bounds what is buffered.
    let bytes = http_body_util::Limited::new(body, limit + HEADER_LEN)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Status::out_of_range(format!("request message larger than {limit} bytes"))
            } else {
                Status::internal(format!("reading the request: {e}"))
            }
        })?
        .to_bytes();
    if bytes.len() < HEADER_LEN {
        return Err(Status::internal("Missing request message."));
    }
    let len = message_len(&bytes, limit)?;
    if bytes.len() != HEADER_LEN + len {
        return Err(Status::internal(
            "expected exactly one request message in a server-streaming call",
        ));
    }
    decode(&bytes[HEADER_LEN..])
}

/// The length a message prefix announces, checked against `limit`.
fn message_len(prefix: &[u8], limit: usize) -> Result<usize, Status> {
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not supported",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > limit {
        return Err(Status::out_of_range(format!(
            "request message of {len} bytes; the limit is {limit}"
        )));
    }
    Ok(len)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, Status> {
    M::decode(bytes)
        .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))
}

/// The request messages of a client-streaming or bidirectional call, read
/// one at a time. Between messages it holds no buffer.
pub struct RequestMessages<M> {
    body: Body,
    /// Bytes of an incomplete message; empty (unallocated) between messages.
    pending: BytesMut,
    limit: usize,
    ended: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: Message + Default> RequestMessages<M> {
    pub fn new(body: Body, limit: usize) -> Self {
        Self {
            body,
            pending: BytesMut::new(),
            limit,
            ended: false,
            _message: std::marker::PhantomData,
        }
    }

    /// The next message; `None` when the client has closed its side cleanly.
    /// An error (oversized, undecodable, truncated, transport failure) ends
    /// the request stream. Cancel-safe: bytes read are kept across calls.
    pub async fn next(&mut self) -> Option<Result<M, Status>> {
        if self.ended {
            return None;
        }
        let result = self.read().await;
        if !matches!(result, Some(Ok(_))) {
            self.ended = true;
            self.pending = BytesMut::new();
        }
        result
    }

    async fn read(&mut self) -> Option<Result<M, Status>> {
        loop {
            if self.pending.len() >= HEADER_LEN {
                let len = match message_len(&self.pending[..HEADER_LEN], self.limit) {
                    Ok(len) => len,
                    Err(status) => return Some(Err(status)),
                };
                if self.pending.len() >= HEADER_LEN + len {
                    let message = decode(&self.pending[HEADER_LEN..HEADER_LEN + len]);
                    self.pending.advance(HEADER_LEN + len);
                    if self.pending.is_empty() {
                        // Give the allocation back while the stream idles.
                        self.pending = BytesMut::new();
                    }
                    return Some(message);
                }
            }
            match self.body.frame().await {
                None if self.pending.is_empty() => return None,
                None => {
                    return Some(Err(Status::internal(
                        "the request stream ended inside a message",
                    )));
                }
                Some(Err(status)) => return Some(Err(status)),
                // At most one message (its prefix was checked against the
                // limit above) plus one HTTP/2 frame is ever buffered.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// A response body of gRPC messages from `stream`, ended by trailers with the
/// stream's final status (OK when it simply ends).
pub struct MessageFrames<S> {
    /// None once the trailers are out.
    stream: Option<S>,
}

impl<S, M> hyper::body::Body for MessageFrames<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: Message,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(None);
        };
        let end = match ready!(stream.poll_next_unpin(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(frame(&message))))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.stream = None;
        let mut trailers = http::HeaderMap::new();
        if end.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }
}

/// One length-prefixed, uncompressed gRPC message in a buffer of exactly its
/// size.
pub fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for the whole message.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(bytes: &'static [u8]) -> Body {
        Body::new(http_body_util::Full::new(Bytes::from_static(bytes)))
    }

    /// A body delivered in the given chunks (as HTTP/2 DATA frames).
    fn chunked(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    /// A message with one string field (number 1).
    fn text(s: &str) -> Vec<u8> {
        let mut m = vec![0x0a, s.len() as u8];
        m.extend(s.as_bytes());
        m
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Text {
        #[prost(string, tag = "1")]
        value: String,
    }

    #[tokio::test]
    async fn unary_framing_errors_get_grpc_codes() {
        let code = |r: Result<Text, Status>| r.unwrap_err().code();
        assert!(read_unary::<Text>(body(&[0, 0, 0, 0, 0]), 64).await.is_ok());
        assert_eq!(code(read_unary(body(&[]), 64).await), tonic::Code::Internal);
        assert_eq!(
            code(read_unary(body(&[1, 0, 0, 0, 0]), 64).await),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code(read_unary(body(&[0, 0, 0, 1, 0]), 64).await),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            code(read_unary(body(&[0; 100]), 64).await),
            tonic::Code::OutOfRange
        );
        // Two messages, or a length that runs past the body.
        assert_eq!(
            code(read_unary(body(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 64).await),
            tonic::Code::Internal
        );
        assert_eq!(
            code(read_unary(body(&[0, 0, 0, 0, 3, 0]), 64).await),
            tonic::Code::Internal
        );
        // Field 1 as a truncated varint: not protobuf.
        assert_eq!(
            code(read_unary(body(&[0, 0, 0, 0, 2, 0x08, 0x80]), 64).await),
            tonic::Code::Internal
        );
    }

    #[tokio::test]
    async fn request_messages_split_across_frames_and_packed_in_one() {
        let mut bytes = framed(&text("first"));
        bytes.extend(framed(&text("second")));
        bytes.extend(framed(&text("third")));
        // Every split point: one byte per frame, and everything in one frame.
        for size in [1, 3, 7, bytes.len()] {
            let chunks = bytes.chunks(size).map(<[u8]>::to_vec).collect();
            let mut messages = RequestMessages::<Text>::new(chunked(chunks), 64);
            for want in ["first", "second", "third"] {
                let got = messages.next().await.unwrap().unwrap();
                assert_eq!(got.value, want, "chunks of {size}");
            }
            assert!(messages.next().await.is_none());
            assert!(messages.next().await.is_none(), "stays ended");
        }
    }

    #[tokio::test]
    async fn request_messages_hold_no_buffer_between_messages() {
        let big = "x".repeat(200);
        let mut bytes = framed(&{
            let mut m = vec![0x0a, 0xc8, 0x01];
            m.extend(big.as_bytes());
            m
        });
        bytes.extend(framed(&text("half")));
        let split = bytes.len() - 3;
        let chunks = vec![bytes[..split].to_vec(), bytes[split..].to_vec()];
        let mut messages = RequestMessages::<Text>::new(chunked(chunks), 1024);
        assert_eq!(messages.next().await.unwrap().unwrap().value, big);
        // The second message is incomplete in the first frame: it stays.
        assert!(messages.pending.capacity() > 0);
        assert_eq!(messages.next().await.unwrap().unwrap().value, "half");
        assert_eq!(messages.pending.capacity(), 0, "released once empty");
    }

    #[tokio::test]
    async fn request_message_errors_end_the_stream() {
        let code = |chunks: Vec<Vec<u8>>| async move {
            let mut messages = RequestMessages::<Text>::new(chunked(chunks), 16);
            let status = loop {
                match messages.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => break status,
                    None => panic!("ended without an error"),
                }
            };
            assert!(messages.next().await.is_none(), "ended after an error");
            status.code()
        };
        // Larger than the limit, announced in the prefix.
        assert_eq!(
            code(vec![vec![0, 0, 0, 0, 17]]).await,
            tonic::Code::OutOfRange
        );
        assert_eq!(
            code(vec![vec![1, 0, 0, 0, 0]]).await,
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code(vec![framed(&text("ok")), vec![0, 0, 0, 0, 4, 0x0a]]).await,
            tonic::Code::Internal,
            "ends inside a message"
        );
        assert_eq!(
            code(vec![vec![0, 0, 0, 0, 2, 0x08, 0x80]]).await,
            tonic::Code::Internal,
            "not protobuf"
        );
    }

    #[test]
    fn frames_are_length_prefixed_and_exactly_sized() {
        let message = Text {
            value: "abc".into(),
        };
        let f = frame(&message);
        assert_eq!(f.len(), HEADER_LEN + message.encoded_len());
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            message.encoded_len()
        );
        assert_eq!(Text::decode(&f[HEADER_LEN..]).unwrap(), message);
    }
}
