"""The agent side against a real agent: renewal, typed errors, sockets,
and the server-side verifier's certificate binding (judged by PyJWT and
`cryptography`, libraries we did not write)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import jwt
import pytest
from conftest import AGENT_ID, RESOURCE, Agent
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tessera_sdk import (
    AccessDenied,
    ConfigurationError,
    Exchange,
    InvalidRequest,
    InvalidTarget,
    StepUpRefused,
    TaskEnded,
    TemporarilyUnavailable,
    task,
)
from tessera_sdk.challenge import BearerChallenge
from tessera_sdk.server import TokenRejected, Verifier, certificate_thumbprint
from tessera_sdk.sockets import Sockets

pytestmark = pytest.mark.anyio


async def verified_by_pyjwt(exchange: Exchange, token: str) -> dict[str, object]:
    """The token's claims, verified by PyJWT against the exchange's JWKS."""
    jwks = jwt.PyJWKSet.from_dict(await exchange.jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims: dict[str, object] = jwt.decode(
        token, key.key, algorithms=["ES256"], audience=RESOURCE, issuer=await exchange.issuer()
    )
    return claims


async def test_the_token_is_renewed_before_it_expires(agent: Agent) -> None:
    async with task("py-renew", resource=RESOURCE, scopes=["notes:read"], ttl=4) as t:
        first = await t.token()
        first_claims = await verified_by_pyjwt(t.exchange, first)
        assert await t.token() == first  # fresh: reused
        assert t.current is not None and t.current.expires_in <= 4
        await asyncio.sleep(3.2)  # inside the last quarter of its life
        second = await t.token()
        assert second != first
        claims = await verified_by_pyjwt(t.exchange, second)
        assert claims["txn"] == "py-renew" and claims["sub"] == AGENT_ID
        assert claims["exp"] > first_claims["exp"]  # type: ignore[operator]


async def test_oauth_errors_are_typed(agent: Agent) -> None:
    with pytest.raises(AccessDenied) as denied:
        async with task("py-admin", resource=RESOURCE, scopes=["notes:admin"]):
            pass
    assert denied.value.error == "access_denied" and denied.value.status == 400
    with pytest.raises(InvalidTarget):
        async with task("py-target", resource="not a uri", scopes=["notes:read"]):
            pass
    async with task("py-typed", resource=RESOURCE, scopes=["notes:read"]) as t:
        with pytest.raises(StepUpRefused):
            await t.step_up(["notes:write"])
    with pytest.raises(TaskEnded):
        await t.token()
    # A task once ended cannot be started again.
    with pytest.raises(InvalidRequest, match=r"ended"):
        async with task("py-typed", resource=RESOURCE, scopes=["notes:read"]):
            pass


async def test_sockets_are_found_like_the_workload_api_socket(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    found = Sockets.find()
    assert found.workload_api == agent.workload_socket
    assert found.exchange == agent.exchange_socket  # beside it
    monkeypatch.setenv("TESSERA_EXCHANGE_SOCKET", f"unix://{tmp_path}/nowhere.sock")
    assert Sockets.find().exchange == tmp_path / "nowhere.sock"
    with pytest.raises(TemporarilyUnavailable, match=r"nowhere\.sock"):
        async with task("py-nowhere", resource=RESOURCE, scopes=["notes:read"]):
            pass
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    with pytest.raises(ConfigurationError, match="SPIFFE_ENDPOINT_SOCKET"):
        Sockets.find()
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:8081")
    with pytest.raises(ConfigurationError, match="Unix"):
        Sockets.find()


def own_certificate(agent: Agent, tmp_path: Path) -> bytes:
    """This uid's X509-SVID (the one a bound token names), as DER, via the CLI."""
    done = subprocess.run(
        [str(agent.bin), "api", "fetch", "x509", "--write", str(tmp_path), "--socket", str(agent.workload_socket)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return x509.load_pem_x509_certificates((tmp_path / "svid.0.pem").read_bytes())[0].public_bytes(Encoding.DER)


async def test_a_bound_token_needs_its_certificate(agent: Agent, tmp_path: Path) -> None:
    verifier = Verifier(RESOURCE)
    try:
        async with task("py-bound", resource=RESOURCE, scopes=["notes:bound"]) as t:
            token = await t.token()
            claims = await verified_by_pyjwt(t.exchange, token)
            certificate = own_certificate(agent, tmp_path)
            assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(certificate)}
            verified = await verifier.verify(token, client_certificate=certificate)
            assert verified.scopes == {"notes:bound"} and verified.task_id == "py-bound"
            with pytest.raises(TokenRejected, match=r"RFC 8705"):
                await verifier.verify(token)
            other = x509.load_pem_x509_certificates((tmp_path / "bundle.0.pem").read_bytes())[0]
            with pytest.raises(TokenRejected, match="another client certificate"):
                await verifier.verify(token, client_certificate=other.public_bytes(Encoding.DER))
        # Ended: the verifier sees it through introspection.
        with pytest.raises(TokenRejected, match="not active"):
            await Verifier(RESOURCE, introspection_cache=0).verify(token, client_certificate=certificate)
        # For another server: refused whatever else holds.
        with pytest.raises(TokenRejected, match=r"(?i)audience"):
            await Verifier("https://other.example/mcp").verify(token, client_certificate=certificate)
    finally:
        await verifier.aclose()


def test_bearer_challenges_round_trip() -> None:
    challenge = BearerChallenge(
        "insufficient_scope", 'needs "write"', frozenset({"b", "a"}), "https://x/.well-known/oauth-protected-resource"
    )
    assert BearerChallenge.parse(challenge.header()) == challenge
    parsed = BearerChallenge.parse('Basic realm="x", Bearer error="invalid_token", scope=notes:read')
    assert parsed == BearerChallenge("invalid_token", None, frozenset({"notes:read"}))
    assert BearerChallenge.parse("Basic realm=x") is None
