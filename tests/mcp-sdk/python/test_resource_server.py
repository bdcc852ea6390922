"""What a relying party on another host does with Tessera, judged by code we
did not write (httpx2 over TLS, PyJWT, py-spiffe):

- OpenID discovery from a JWT-SVID's `iss` alone: PyJWT's PyJWKClient, fed
  the `jwks_uri` of the discovery document at that issuer, verifies the
  JWT-SVID (what cloud workload identity federation and an external MCP
  authorization server doing SEP-1933 do).
- A resource server introspects (RFC 7662) and revokes (RFC 7009) over
  HTTPS, authenticated by its X509-SVID as TLS client certificate or by a
  JWT-SVID for the issuer as `Authorization: Bearer`; without either, or
  with a bad one, it gets the spec's error code.

Run by ../agent.sh (TESSERA_ISSUER, TESSERA_CA, TESSERA_CLIENT_ID,
SPIFFE_ENDPOINT_SOCKET).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

ISSUER = os.environ["TESSERA_ISSUER"]
CA = os.environ["TESSERA_CA"]
CLIENT_ID = os.environ["TESSERA_CLIENT_ID"]
RESOURCE = f"http://127.0.0.1:{os.environ['MCP_PORT_PY']}/mcp"


def trusting() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=CA)


@pytest.fixture(scope="module")
def mtls() -> Iterator[ssl.SSLContext]:
    """A TLS context presenting this workload's X509-SVID (from the Workload
    API) as client certificate."""
    with WorkloadApiClient() as workload_api:
        svid = workload_api.fetch_x509_svid()
    assert str(svid.spiffe_id) == CLIENT_ID
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "svid.pem"), os.path.join(tmp, "key.pem")
        with open(cert, "wb") as f:
            f.writelines(
                c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain
            )
        with open(key, "wb") as f:
            f.write(
                svid.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx = trusting()
        ctx.load_cert_chain(cert, key)
        yield ctx


def jwt_svid(audience: str) -> str:
    with WorkloadApiClient() as workload_api:
        token: str = workload_api.fetch_jwt_svid(audience={audience}).token
    return token


def access_token() -> str:
    """A token from the RFC 7523 jwt-bearer grant over HTTPS."""
    r = httpx2.post(
        f"{ISSUER}/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": jwt_svid(ISSUER),
            "resource": RESOURCE,
            "scope": "notes:read",
        },
        verify=trusting(),
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def test_a_jwt_svid_verifies_from_its_iss_by_openid_discovery() -> None:
    token = jwt_svid("https://relying-party.example")
    # Only the issuer is read before verification: it says where to look.
    iss = jwt.decode(token, options={"verify_signature": False})["iss"]
    assert iss == ISSUER
    discovery = httpx2.get(
        f"{iss}/.well-known/openid-configuration", verify=trusting()
    ).json()
    assert discovery["issuer"] == iss
    jwks = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=trusting())
    key = jwks.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience="https://relying-party.example",
        issuer=iss,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    assert claims["sub"] == CLIENT_ID
    # A forged signature and another audience are refused by the same keys.
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(
            forged,
            key.key,
            algorithms=["ES256"],
            audience="https://relying-party.example",
        )
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.key, algorithms=["ES256"], audience="https://other")


def test_metadata_names_introspection_and_revocation() -> None:
    meta = httpx2.get(
        f"{ISSUER}/.well-known/oauth-authorization-server", verify=trusting()
    ).json()
    assert meta["introspection_endpoint"] == f"{ISSUER}/introspect"
    assert meta["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert "tls_client_auth" in meta["introspection_endpoint_auth_methods_supported"]


def test_introspection_and_revocation_with_the_x509_svid(
    mtls: ssl.SSLContext,
) -> None:
    token = access_token()
    r = httpx2.post(f"{ISSUER}/introspect", data={"token": token}, verify=mtls)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    active = r.json()
    # The caller is the token's client: it sees the claims.
    assert active["active"] is True
    assert active["sub"] == CLIENT_ID
    assert active["aud"] == RESOURCE
    assert active["scope"] == "notes:read"

    r = httpx2.post(
        f"{ISSUER}/revoke",
        data={"token": token, "token_type_hint": "access_token"},
        verify=mtls,
    )
    assert r.status_code == 200, r.text
    r = httpx2.post(f"{ISSUER}/introspect", data={"token": token}, verify=mtls)
    assert r.json() == {"active": False}
    # Garbage is inactive, and revoking it succeeds (RFC 7009 §2.2).
    r = httpx2.post(f"{ISSUER}/introspect", data={"token": "x.y.z"}, verify=mtls)
    assert r.json() == {"active": False}
    r = httpx2.post(f"{ISSUER}/revoke", data={"token": "x.y.z"}, verify=mtls)
    assert r.status_code == 200


def test_introspection_and_revocation_with_a_bearer_jwt_svid() -> None:
    token = access_token()
    auth = {"Authorization": f"Bearer {jwt_svid(ISSUER)}"}
    for _ in range(2):  # a bearer JWT-SVID serves until it expires
        r = httpx2.post(
            f"{ISSUER}/introspect",
            data={"token": token},
            headers=auth,
            verify=trusting(),
        )
        assert r.status_code == 200, r.text
        assert r.json()["active"] is True
    r = httpx2.post(
        f"{ISSUER}/revoke", data={"token": token}, headers=auth, verify=trusting()
    )
    assert r.status_code == 200, r.text
    r = httpx2.post(
        f"{ISSUER}/introspect", data={"token": token}, headers=auth, verify=trusting()
    )
    assert r.json() == {"active": False}


def test_unauthenticated_and_badly_authenticated_resource_servers_are_refused() -> None:
    token = access_token()
    for path in ("/introspect", "/revoke"):
        # No credential at all: RFC 6749 §5.2 invalid_client.
        r = httpx2.post(f"{ISSUER}{path}", data={"token": token}, verify=trusting())
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client"), r.text
        # A JWT-SVID for another audience, and a tampered one: RFC 6750
        # invalid_token with a challenge.
        wrong_aud = jwt_svid("https://someone-else.example")
        head, body, sig = jwt_svid(ISSUER).split(".")
        tampered = f"{head}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
        for bad in (wrong_aud, tampered, "not-a-jwt"):
            r = httpx2.post(
                f"{ISSUER}{path}",
                data={"token": token},
                headers={"Authorization": f"Bearer {bad}"},
                verify=trusting(),
            )
            assert (r.status_code, r.json()["error"]) == (401, "invalid_token")
            assert r.headers["www-authenticate"].startswith(
                'Bearer error="invalid_token"'
            )
        # Another scheme is not a credential.
        r = httpx2.post(
            f"{ISSUER}{path}",
            data={"token": token},
            headers={"Authorization": "Basic dXNlcjpwYXNz"},
            verify=trusting(),
        )
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
    # None of that revoked the token.
    r = httpx2.post(
        f"{ISSUER}/introspect",
        data={"token": token},
        headers={"Authorization": f"Bearer {jwt_svid(ISSUER)}"},
        verify=trusting(),
    )
    assert r.json()["active"] is True
