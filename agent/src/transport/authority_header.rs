//! Accepting the `:authority` that gRPC clients send over Unix sockets.
//!
//! grpc-java (so java-spiffe) and grpc-core (so py-spiffe) put the socket
//! *path* in the HTTP/2 `:authority` pseudo-header, e.g.
//! `/run/tessera/agent.sock`. That is not a valid URI authority, and the `h2`
//! crate under tonic resets such requests with PROTOCOL_ERROR before they reach
//! any service code (hyperium/h2#442). SPIRE (Go) accepts them, and every SPIFFE
//! client must work unchanged, so Tessera normalises the header on the way in.
//!
//! [`AuthorityRewriter`] sits between the socket and h2 on the inbound byte
//! stream. It parses HTTP/2 frames, HPACK-decodes every header block to follow
//! the client's dynamic table, and:
//! * passes frames through untouched while every `:authority` is valid (Go and
//!   Rust clients never leave this fast path);
//! * from the first invalid `:authority` on, re-encodes every header block with
//!   literal, never-indexed fields, replacing an invalid authority with
//!   `localhost`. From then on h2's dynamic table is never referenced or
//!   modified, so it cannot diverge from what the client believes.
//!
//! Anything it does not understand (HPACK errors, oversized frames, broken
//! CONTINUATION sequences) switches it to plain pass-through for the rest of the
//! connection, so h2 sees the client's original bytes and reports the error.

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// h2's default SETTINGS_MAX_FRAME_SIZE; tonic does not raise it.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// Bound on one header block (across CONTINUATION frames).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    raw_frames: Vec<u8>,
}

pub struct AuthorityRewriter {
    preface_left: usize,
    input: Vec<u8>,
    output: Vec<u8>,
    output_pos: usize,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
    rewriting: bool,
    passthrough: bool,
    /// Whether a whole header block has been seen (see `on_block`).
    seen_block: bool,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

/// An idle connection keeps its rewriter for its whole life; buffers that a
/// burst of frames grew are given back once empty, so thousands of idle
/// connections do not each hold their largest read.
fn release_if_large(buf: &mut Vec<u8>) {
    const KEEP: usize = 1024;
    if buf.is_empty() && buf.capacity() > KEEP {
        *buf = Vec::new();
    }
}

impl AuthorityRewriter {
    pub fn new() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            decoder: loona_hpack::Decoder::new(),
            pending: None,
            rewriting: false,
            passthrough: false,
            seen_block: false,
        }
    }

    /// Adds bytes read from the client.
    pub fn feed(&mut self, data: &[u8]) {
        if self.passthrough {
            self.output.extend_from_slice(data);
            return;
        }
        self.input.extend_from_slice(data);
        self.process();
    }

    /// The client closed its side: whatever is buffered goes through as is.
    pub fn finish(&mut self) {
        self.give_up();
    }

    /// Bytes ready for h2.
    pub fn ready(&self) -> &[u8] {
        &self.output[self.output_pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.output_pos += n;
        if self.output_pos == self.output.len() {
            self.output.clear();
            self.output_pos = 0;
            release_if_large(&mut self.output);
        }
    }

    /// Whether any header block has been rewritten on this connection.
    pub fn is_rewriting(&self) -> bool {
        self.rewriting
    }

    fn give_up(&mut self) {
        tracing::trace!(
            pending = self.pending.is_some(),
            buffered = self.input.len(),
            "h2 rewriter: pass-through"
        );
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw_frames);
        }
        self.output.append(&mut self.input);
        self.passthrough = true;
    }

    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.input.len());
            self.output.extend(self.input.drain(..n));
            self.preface_left -= n;
        }
        let mut start = 0;
        while self.preface_left == 0 && self.input.len() - start >= FRAME_HEADER_LEN {
            let h = &self.input[start..start + FRAME_HEADER_LEN];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if len > MAX_FRAME_PAYLOAD {
                break; // h2 will answer FRAME_SIZE_ERROR; see below
            }
            if self.input.len() - start < FRAME_HEADER_LEN + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let end = start + FRAME_HEADER_LEN + len;
            let frame = self.input[start..end].to_vec();
            start = end;
            if !self.on_frame(kind, flags, stream_id, frame) {
                self.input.drain(..start);
                self.give_up();
                return;
            }
        }
        self.input.drain(..start);
        if self.input.is_empty() {
            release_if_large(&mut self.input);
        }
        let oversized = self.input.len() >= FRAME_HEADER_LEN
            && u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize
                > MAX_FRAME_PAYLOAD;
        if oversized {
            self.give_up();
        }
    }

    /// Queues `frame` unmodified behind any pending raw frames and stops
    /// interpreting the connection.
    fn reject(&mut self, frame: &[u8]) -> bool {
        match self.pending.as_mut() {
            Some(p) => p.raw_frames.extend_from_slice(frame),
            None => self.output.extend_from_slice(frame),
        }
        false
    }

    /// Handles one whole frame; false means "stop interpreting" (the frame has
    /// then been queued raw).
    fn on_frame(&mut self, kind: u8, flags: u8, stream_id: u32, frame: Vec<u8>) -> bool {
        let payload = &frame[FRAME_HEADER_LEN..];
        match (kind, self.pending.is_some()) {
            (TYPE_HEADERS, false) => {
                let mut body = payload;
                let mut pad = 0usize;
                if flags & FLAG_PADDED != 0 {
                    let Some((&p, rest)) = body.split_first() else {
                        return self.reject(&frame);
                    };
                    pad = p as usize;
                    body = rest;
                }
                let mut priority = None;
                if flags & FLAG_PRIORITY != 0 {
                    if body.len() < 5 {
                        return self.reject(&frame);
                    }
                    priority = Some([body[0], body[1], body[2], body[3], body[4]]);
                    body = &body[5..];
                }
                if pad > body.len() {
                    return self.reject(&frame);
                }
                let fragment = body[..body.len() - pad].to_vec();
                self.pending = Some(PendingBlock {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment,
                    raw_frames: frame.clone(),
                });
            }
            (TYPE_CONTINUATION, true) => {
                let Some(p) = self.pending.as_mut() else {
                    return self.reject(&frame);
                };
                if p.stream_id != stream_id || p.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                    return self.reject(&frame);
                }
                p.fragment.extend_from_slice(payload);
                p.raw_frames.extend_from_slice(&frame);
            }
            // Out-of-sequence header frames, or anything between HEADERS and
            // END_HEADERS, are protocol errors for h2 to report.
            (TYPE_HEADERS | TYPE_CONTINUATION, _) | (_, true) => return self.reject(&frame),
            (_, false) => {
                self.output.extend_from_slice(&frame);
                return true;
            }
        }
        if flags & FLAG_END_HEADERS != 0 {
            let block = self.pending.take().expect("set above");
            return self.on_block(block);
        }
        true
    }

    fn on_block(&mut self, block: PendingBlock) -> bool {
        if !self.seen_block {
            self.seen_block = true;
            // A client keeps one `:authority` for a connection. When the first
            // block's is valid (Go and Rust clients), nothing here will ever
            // need rewriting: stop decoding HPACK for this connection. (A
            // later invalid one would be reset by h2, as without this shim.)
            if first_block_authority_ok(&block.fragment) == Some(true) {
                self.output.extend_from_slice(&block.raw_frames);
                return false;
            }
        }
        let headers = match self.decoder.decode(&block.fragment) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = ?e, "undecodable header block; passing the connection through");
                self.pending = Some(block);
                return false;
            }
        };
        tracing::trace!(headers = headers.len(), "header block");
        let bad_authority = headers.iter().any(|(n, v)| {
            n == b":authority" && http::uri::Authority::try_from(v.as_slice()).is_err()
        });
        if !bad_authority && !self.rewriting {
            self.output.extend_from_slice(&block.raw_frames);
            return true;
        }
        if !self.rewriting {
            tracing::debug!(
                "client sent a non-URI :authority (a socket path); normalising header blocks on this connection"
            );
        }
        self.rewriting = true;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 32);
        for (name, value) in &headers {
            let value: &[u8] = if name == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                REPLACEMENT_AUTHORITY
            } else {
                value
            };
            encode_literal(&mut encoded, name, value);
        }
        self.write_header_frames(&block, &encoded);
        true
    }

    fn write_header_frames(&mut self, block: &PendingBlock, encoded: &[u8]) {
        let prio_len = if block.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - prio_len);
        let (first, mut rest) = encoded.split_at(first_len);
        let mut flags = 0u8;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        let mut payload = Vec::with_capacity(prio_len + first.len());
        if let Some(p) = block.priority {
            payload.extend_from_slice(&p);
        }
        payload.extend_from_slice(first);
        self.write_frame(TYPE_HEADERS, flags, block.stream_id, &payload);
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME_PAYLOAD);
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
            self.write_frame(TYPE_CONTINUATION, flags, block.stream_id, chunk);
        }
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.output.extend_from_slice(&len.to_be_bytes()[1..]);
        self.output.push(kind);
        self.output.push(flags);
        self.output.extend_from_slice(&stream_id.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

/// Entries in the HPACK static table (RFC 7541 Appendix A); index 1 is
/// `:authority`.
const STATIC_TABLE_LEN: usize = 61;
const STATIC_AUTHORITY: usize = 1;

/// Whether the `:authority` of a connection's first header block is a valid
/// URI authority (true also when there is none), read without the full
/// decoder: no dynamic table, and only the strings that can be `:authority`
/// are Huffman-decoded. None when the block uses what this look does not
/// follow (a dynamic-table reference, the bare static `:authority`) or is
/// malformed; the full decoder then decides.
fn first_block_authority_ok(mut block: &[u8]) -> Option<bool> {
    let mut ok = true;
    while let Some(&first) = block.first() {
        let prefix = match first {
            f if f & 0x80 != 0 => {
                // Indexed field: a static entry carries no value worth checking.
                let (index, used) = hpack_integer(block, 7)?;
                if index == 0 || index == STATIC_AUTHORITY || index > STATIC_TABLE_LEN {
                    return None;
                }
                block = &block[used..];
                continue;
            }
            f if f & 0x40 != 0 => 6, // literal with incremental indexing
            f if f & 0x20 != 0 => {
                // Dynamic table size update: irrelevant once we stop decoding.
                block = &block[hpack_integer(block, 5)?.1..];
                continue;
            }
            _ => 4, // literal without indexing / never indexed
        };
        let (index, used) = hpack_integer(block, prefix)?;
        block = &block[used..];
        let is_authority = match index {
            0 => {
                let (name, used) = hpack_string(block, true)?;
                block = &block[used..];
                name.as_deref() == Some(b":authority".as_slice())
            }
            i if i <= STATIC_TABLE_LEN => i == STATIC_AUTHORITY,
            _ => return None,
        };
        let (value, used) = hpack_string(block, is_authority)?;
        block = &block[used..];
        if let Some(value) = value {
            ok &= http::uri::Authority::try_from(value.as_slice()).is_ok();
        }
    }
    Some(ok)
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1): (value, bytes).
fn hpack_integer(buf: &[u8], n: u32) -> Option<(usize, usize)> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*buf.first()?) & mask;
    if value < mask {
        return Some((value, 1));
    }
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// An HPACK string literal (RFC 7541 §5.2): its octets when `decode` is
/// set (Huffman-decoded if need be), and the bytes it took.
fn hpack_string(buf: &[u8], decode: bool) -> Option<(Option<Vec<u8>>, usize)> {
    let (len, used) = hpack_integer(buf, 7)?;
    let raw = buf.get(used..used.checked_add(len)?)?;
    if !decode {
        return Some((None, used + len));
    }
    let octets = if buf[0] & 0x80 != 0 {
        HUFFMAN.with(|h| h.borrow_mut().decode(raw)).ok()?
    } else {
        raw.to_vec()
    };
    Some((Some(octets), used + len))
}

thread_local! {
    /// loona-hpack builds its Huffman table for every string it decodes; one
    /// per thread serves the quick look above.
    static HUFFMAN: std::cell::RefCell<loona_hpack::huffman::HuffmanDecoder> =
        std::cell::RefCell::new(loona_hpack::huffman::HuffmanDecoder::new());
}

/// HPACK "literal header field never indexed, new name" (RFC 7541 §6.2.3),
/// without Huffman coding: touches no dynamic table on either side.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // 7-bit prefix integer with the Huffman bit clear.
    let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits an output byte stream into frames after the preface.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], id, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    fn request(enc: &mut loona_hpack::Encoder<'static>, authority: &[u8]) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID"),
            (b":authority", authority),
            (b"workload.spiffe.io", b"true"),
            (b"content-type", b"application/grpc"),
        ];
        enc.encode(headers)
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, bool) {
        let mut r = AuthorityRewriter::new();
        for part in input.chunks(chunk) {
            r.feed(part);
        }
        let out = r.ready().to_vec();
        (out, r.is_rewriting())
    }

    #[test]
    fn valid_authorities_pass_through_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request(&mut enc, b"localhost"),
        ));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
        for chunk in [1, 7, 4096] {
            let (out, rewriting) = run(&input, chunk);
            assert_eq!(out, input, "chunk size {chunk}");
            assert!(!rewriting);
        }
    }

    #[test]
    fn socket_path_authority_is_replaced_and_table_state_kept() {
        // The client's encoder indexes headers into its dynamic table; the
        // second request refers to those entries. An independent decoder
        // (standing in for h2) must read both rewritten blocks correctly.
        let mut enc = loona_hpack::Encoder::new();
        let first = request(&mut enc, b"/tmp/x/agent.sock");
        let second = request(&mut enc, b"/tmp/x/agent.sock");
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &first,
        ));
        // Second block split across HEADERS + CONTINUATION, padded, with priority.
        let (a, b) = second.split_at(second.len() / 2);
        let mut payload = vec![3u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend([0, 0, 0]);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            3,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 3, b"\0\0\0\0\0"));

        for chunk in [1, 5, 1 << 16] {
            let (out, rewriting) = run(&input, chunk);
            assert!(rewriting);
            let fs = frames(&out);
            assert_eq!(fs.len(), 3);
            let mut dec = loona_hpack::Decoder::new();
            let h1 = dec.decode(&fs[0].3).unwrap();
            assert_eq!(fs[0].1, FLAG_END_HEADERS | FLAG_END_STREAM);
            assert!(h1.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
            assert!(h1.contains(&(
                b":path".to_vec(),
                b"/SpiffeWorkloadAPI/FetchJWTSVID".to_vec()
            )));
            assert_eq!(fs[1].1, FLAG_END_HEADERS | FLAG_PRIORITY);
            assert_eq!(&fs[1].3[..5], &[0, 0, 0, 0, 16]);
            let h2 = dec.decode(&fs[1].3[5..]).unwrap();
            assert_eq!(h1, h2);
            assert_eq!(fs[2], (0x0, FLAG_END_STREAM, 3, b"\0\0\0\0\0".to_vec()));
        }
    }

    #[test]
    fn first_block_authority_is_read_without_the_full_decoder() {
        // RFC 7541 C.4.1: GET http://www.example.com/ with Huffman-coded
        // literals; the independent decoder confirms what the block says.
        let rfc = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let decoded = loona_hpack::Decoder::new().decode(&rfc).unwrap();
        assert!(decoded.contains(&(b":authority".to_vec(), b"www.example.com".to_vec())));
        assert_eq!(first_block_authority_ok(&rfc), Some(true));

        let mut enc = loona_hpack::Encoder::new();
        assert_eq!(
            first_block_authority_ok(&request(&mut enc, b"localhost")),
            Some(true)
        );
        let mut enc = loona_hpack::Encoder::new();
        assert_eq!(
            first_block_authority_ok(&request(&mut enc, b"/run/tessera/agent.sock")),
            Some(false)
        );
        // A new-name literal spelling `:authority` (raw and Huffman-coded).
        let mut raw = vec![0x10, 10];
        raw.extend_from_slice(b":authority");
        raw.extend([4]);
        raw.extend_from_slice(b"/x/y");
        assert_eq!(first_block_authority_ok(&raw), Some(false));
        // No :authority at all, a dynamic-table reference, a truncated block.
        assert_eq!(first_block_authority_ok(&[0x82, 0x86]), Some(true));
        assert_eq!(first_block_authority_ok(&[0xbe]), None);
        assert_eq!(first_block_authority_ok(&[0x41, 0x8c, 0xf1]), None);
        assert_eq!(first_block_authority_ok(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn garbage_falls_back_to_pass_through() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff],
        ));
        input.extend(frame(0x0, 0, 1, b"after"));
        let (out, _) = run(&input, 3);
        assert_eq!(out, input);
        // A CONTINUATION without HEADERS, and an oversized frame, likewise.
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"x"));
        assert_eq!(run(&input, 2).0, input);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x0, 0, 1, &vec![0u8; MAX_FRAME_PAYLOAD + 1]));
        assert_eq!(run(&input, 1000).0, input);
    }
}
