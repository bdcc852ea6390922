"""JWT-SVIDs from the SPIFFE Workload API (FetchJWTSVID only).

The SDK needs one RPC, so it encodes its three small protobuf messages by
hand instead of carrying generated code and the protobuf runtime:

    JWTSVIDRequest  { repeated string audience = 1; string spiffe_id = 2; }
    JWTSVIDResponse { repeated JWTSVID svids = 1; }
    JWTSVID         { string spiffe_id = 1; string svid = 2; string hint = 3; }

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
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from .errors import WorkloadApiError

_METHOD = "/SpiffeWorkloadAPI/FetchJWTSVID"
_HEADER = ("workload.spiffe.io", "true")
# Fetch a new SVID when the cached one has less than this left.
_REUSE_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    token: str
    expires_at: float
    hint: str = ""


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

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
