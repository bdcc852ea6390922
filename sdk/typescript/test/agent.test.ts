/**
 * The agent side against a real agent: renewal, typed errors, sockets, and
 * the verifier's certificate binding (judged by jose and node:crypto's X509).
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { createLocalJWKSet, jwtVerify, type JWTPayload } from "jose";

import {
  AccessDenied,
  ConfigurationError,
  Exchange,
  findSockets,
  formatChallenge,
  InvalidRequest,
  InvalidTarget,
  parseChallenge,
  StepUpRefused,
  task,
  TaskEnded,
  TemporarilyUnavailable,
} from "tessera-sdk";
import { certificateThumbprint, TokenRejected, Verifier } from "tessera-sdk/server";

import { AGENT_ID, RESOURCE, startAgent, type Agent } from "./harness.js";

let agent: Agent;
before(async () => {
  agent = await startAgent();
});
after(async () => {
  await agent?.stop();
});

async function verifiedByJose(exchange: Exchange, token: string): Promise<JWTPayload> {
  const jwks = createLocalJWKSet((await exchange.jwks()) as Parameters<typeof createLocalJWKSet>[0]);
  const { payload } = await jwtVerify(token, jwks, {
    algorithms: ["ES256"],
    audience: RESOURCE,
    issuer: await exchange.issuer(),
    typ: "at+jwt",
  });
  return payload;
}

test("the token is renewed before it expires", async () => {
  await using t = await task("ts-renew", { resource: RESOURCE, scopes: ["notes:read"], ttl: 4 });
  const first = await t.token();
  const firstClaims = await verifiedByJose(t.exchange, first);
  assert.equal(await t.token(), first);
  assert.ok(t.current!.expiresIn <= 4);
  await new Promise((r) => setTimeout(r, 3200));
  const second = await t.token();
  assert.notEqual(second, first);
  const claims = await verifiedByJose(t.exchange, second);
  assert.equal(claims["txn"], "ts-renew");
  assert.equal(claims.sub, AGENT_ID);
  assert.ok(claims.exp! > firstClaims.exp!);
});

test("OAuth errors are typed", async () => {
  await assert.rejects(task("ts-admin", { resource: RESOURCE, scopes: ["notes:admin"] }), (e: unknown) => {
    assert.ok(e instanceof AccessDenied);
    assert.equal(e.error, "access_denied");
    assert.equal(e.status, 400);
    return true;
  });
  await assert.rejects(task("ts-target", { resource: "not a uri", scopes: ["notes:read"] }), InvalidTarget);
  let ended;
  {
    await using t = await task("ts-typed", { resource: RESOURCE, scopes: ["notes:read"] });
    await assert.rejects(t.stepUp(["notes:write"]), StepUpRefused);
    ended = t;
  }
  await assert.rejects(ended.token(), TaskEnded);
  await assert.rejects(task("ts-typed", { resource: RESOURCE, scopes: ["notes:read"] }), (e: unknown) => {
    assert.ok(e instanceof InvalidRequest);
    assert.match(e.description, /ended/);
    return true;
  });
});

test("leaving the block on an error still ends the task", async () => {
  let token = "";
  await assert.rejects(async () => {
    await using t = await task("ts-boom", { resource: RESOURCE, scopes: ["notes:read"] });
    token = await t.token();
    throw new Error("boom");
  }, /boom/);
  await using observer = await task("ts-observer", { resource: RESOURCE, scopes: ["notes:read"] });
  assert.deepEqual(await observer.exchange.introspect(token), { active: false });
});

test("sockets are found like the Workload API socket", async () => {
  const found = findSockets();
  assert.equal(found.workloadApi, agent.workloadSocket);
  assert.equal(found.exchange, agent.exchangeSocket);
  const saved = { ...process.env };
  try {
    const dir = mkdtempSync(path.join(tmpdir(), "tessera-sdk-ts-nowhere."));
    process.env["TESSERA_EXCHANGE_SOCKET"] = `unix://${dir}/nowhere.sock`;
    assert.equal(findSockets().exchange, `${dir}/nowhere.sock`);
    await assert.rejects(
      task("ts-nowhere", { resource: RESOURCE, scopes: ["notes:read"] }),
      TemporarilyUnavailable,
    );
    delete process.env["SPIFFE_ENDPOINT_SOCKET"];
    assert.throws(() => findSockets(), ConfigurationError);
    process.env["SPIFFE_ENDPOINT_SOCKET"] = "tcp://127.0.0.1:8081";
    assert.throws(() => findSockets(), /Unix/);
  } finally {
    process.env = saved;
  }
});

test("a bound token needs its certificate", async () => {
  const verifier = new Verifier(RESOURCE);
  const dir = mkdtempSync(path.join(tmpdir(), "tessera-sdk-ts-x509."));
  let token: string;
  let certificate: Uint8Array;
  {
    await using t = await task("ts-bound", { resource: RESOURCE, scopes: ["notes:bound"] });
    token = await t.token();
    const claims = await verifiedByJose(t.exchange, token);
    const fetched = agent.tessera("api", "fetch", "x509", "--write", dir, "--socket", agent.workloadSocket);
    assert.equal(fetched.status, 0, fetched.stderr);
    certificate = new X509Certificate(readFileSync(path.join(dir, "svid.0.pem"))).raw;
    assert.deepEqual(claims["cnf"], { "x5t#S256": certificateThumbprint(certificate) });
    const verified = await verifier.verify(token, certificate);
    assert.deepEqual(verified.scopes, new Set(["notes:bound"]));
    assert.equal(verified.taskId, "ts-bound");
    await assert.rejects(
      verifier.verify(token),
      (e: unknown) => e instanceof TokenRejected && /RFC 8705/.test(e.reason),
    );
    const other = new X509Certificate(readFileSync(path.join(dir, "bundle.0.pem"))).raw;
    await assert.rejects(verifier.verify(token, other), /another client certificate/);
  }
  await assert.rejects(
    new Verifier(RESOURCE, { introspectionCache: 0 }).verify(token, certificate),
    /not active/,
  );
  await assert.rejects(new Verifier("https://other.example/mcp").verify(token, certificate), /aud/);
});

test("bearer challenges round-trip", () => {
  const challenge = {
    error: "insufficient_scope",
    errorDescription: 'needs "write"',
    scope: new Set(["b", "a"]),
    resourceMetadata: "https://x/.well-known/oauth-protected-resource",
  };
  assert.deepEqual(parseChallenge(formatChallenge(challenge)), challenge);
  assert.deepEqual(parseChallenge('Basic realm="x", Bearer error="invalid_token", scope=notes:read'), {
    error: "invalid_token",
    scope: new Set(["notes:read"]),
  });
  assert.equal(parseChallenge("Basic realm=x"), undefined);
});
