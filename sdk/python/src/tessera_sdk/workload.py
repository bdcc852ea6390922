"""SVIDs from the SPIFFE Workload API (FetchJWTSVID, and the first answer
of FetchX509SVID).

The SDK needs two RPCs, so it encodes their small protobuf messages by hand
instead of carrying generated code and the protobuf runtime:

    JWTSVIDRequest  { repeated string audience = 1; string spiffe_id = 2; }
    JWTSVIDResponse { repeated JWTSVID svids = 1; }
    JWTSVID         { string spiffe_id = 1; string svid = 2; string hint = 3; }
    X509SVIDRequest {}
    X509SVIDResponse { repeated X509SVID svids = 1; ... }
    X509SVID        { string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3;
                      bytes bundle = 4; string hint = 5; }

A JWT-SVID is reused until shortly before its `exp`, since the exchange
remembers the SVIDs it has verified and each fetch costs the agent a signature,
except when the caller asks for a fresh one: a client assertion for the token
endpoint on the HTTPS face is accepted once (by its `jti`), so each token
request needs a new SVID.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from .errors import WorkloadApiError

_METHOD = "/SpiffeWorkloadAPI/FetchJWTSVID"
_X509_METHOD = "/SpiffeWorkloadAPI/FetchX509SVID"
_HEADER = ("workload.spiffe.io", "true")
# Fetch a new SVID when the cached one has less than this left.
_REUSE_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    token: str
    expires_at: float
    hint: str = ""


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    # DER certificates, leaf first.
    chain: tuple[bytes, ...]
    # Unencrypted PKCS#8 DER: kept in memory only.
    private_key: bytes = field(repr=False)
    # The trust domain's CA certificates, DER.
    bundle: tuple[bytes, ...] = ()
    issued_at: float = 0.0
    expires_at: float = 0.0


def split_der(data: bytes) -> list[bytes]:
    """Concatenated DER certificates, one by one (each a definite-length SEQUENCE)."""
    out = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ValueError("not a DER SEQUENCE")
        first = data[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + 2 + n > len(data):
                raise ValueError("unsupported DER length")
            length, header = int.from_bytes(data[pos + 2 : pos + 2 + n], "big"), 2 + n
        end = pos + header + length
        if end > len(data):
            raise ValueError("truncated DER certificate")
        out.append(data[pos:end])
        pos = end
    return out


def decode_x509_response(data: bytes) -> list[X509Svid]:
    from cryptography import x509

    svids = []
    for number, value in _fields(data):
        if number != 1 or not isinstance(value, bytes):
            continue
        parts = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
        chain = tuple(split_der(parts.get(2, b"")))
        if not chain:
            raise ValueError("an X509-SVID without certificates")
        leaf = x509.load_der_x509_certificate(chain[0])
        svids.append(
            X509Svid(
                spiffe_id=parts.get(1, b"").decode(),
                chain=chain,
                private_key=parts.get(3, b""),
                bundle=tuple(split_der(parts.get(4, b""))),
                issued_at=leaf.not_valid_before_utc.timestamp(),
                expires_at=leaf.not_valid_after_utc.timestamp(),
            )
        )
    return svids


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_request(audience: list[str], spiffe_id: str | None) -> bytes:
    out = b"".join(_string_field(1, a) for a in audience)
    if spiffe_id:
        out += _string_field(2, spiffe_id)
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, bytes | int]]:
    """(field number, value) pairs; length-delimited values as bytes, varints as int."""
    out: list[tuple[int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            out.append((number, data[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _expiry(token: str) -> float:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError) as e:
        raise WorkloadApiError(f"the Workload API returned a JWT-SVID without a readable exp: {e}") from e


def decode_response(data: bytes) -> list[JwtSvid]:
    svids = []
    for number, value in _fields(data):
        if number != 1 or not isinstance(value, bytes):
            continue
        parts = {n: v.decode() for n, v in _fields(value) if isinstance(v, bytes)}
        token = parts.get(2, "")
        svids.append(JwtSvid(parts.get(1, ""), token, _expiry(token), parts.get(3, "")))
    return svids


class WorkloadApi:
    """A client of the Workload API's FetchJWTSVID, with a per-audience cache."""

    def __init__(self, socket: Path) -> None:
        self._socket = socket
        self._channel: grpc.aio.Channel | None = None
        self._cache: dict[tuple[str, str | None], JwtSvid] = {}
        self._lock = asyncio.Lock()

    def _stub(self) -> grpc.aio.UnaryUnaryMultiCallable:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self._socket}")
        return self._channel.unary_unary(
            _METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

    async def jwt_svid(self, audience: str, spiffe_id: str | None = None, *, fresh: bool = False) -> JwtSvid:
        """A JWT-SVID for `audience`: the first identity of this process, or `spiffe_id`.
        `fresh`: never the cached one (a single-use client assertion)."""
        key = (audience, spiffe_id)
        async with self._lock:
            cached = self._cache.get(key)
            if not fresh and cached is not None and cached.expires_at - time.time() > _REUSE_MARGIN_SECONDS:
                return cached
            try:
                raw = await self._stub()(encode_request([audience], spiffe_id), metadata=(_HEADER,), timeout=30)
            except grpc.aio.AioRpcError as e:
                raise WorkloadApiError(f"FetchJWTSVID on {self._socket}: {e.code().name}: {e.details()}") from e
            try:
                svids = decode_response(raw)
            except ValueError as e:
                raise WorkloadApiError(f"FetchJWTSVID on {self._socket}: malformed answer: {e}") from e
            if not svids:
                raise WorkloadApiError(f"FetchJWTSVID on {self._socket}: no JWT-SVID for this process")
            svid = svids[0]
            if not fresh:
                self._cache[key] = svid
            return svid

    async def x509_svid(self, spiffe_id: str | None = None) -> X509Svid:
        """This process's X509-SVID (its first identity, or `spiffe_id`): the first
        answer of the FetchX509SVID stream; call again for a renewed one."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self._socket}")
        call = self._channel.unary_stream(
            _X509_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )(b"", metadata=(_HEADER,), timeout=30)
        try:
            raw = await call.read()
        except grpc.aio.AioRpcError as e:
            raise WorkloadApiError(f"FetchX509SVID on {self._socket}: {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()
        if not isinstance(raw, bytes):
            raise WorkloadApiError(f"FetchX509SVID on {self._socket}: the stream ended without an answer")
        try:
            svids = decode_x509_response(raw)
        except ValueError as e:
            raise WorkloadApiError(f"FetchX509SVID on {self._socket}: malformed answer: {e}") from e
        for svid in svids:
            if spiffe_id is None or svid.spiffe_id == spiffe_id:
                return svid
        raise WorkloadApiError(f"FetchX509SVID on {self._socket}: no X509-SVID {spiffe_id or ''} for this process")

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
