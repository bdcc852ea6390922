/**
 * Off the node, over the agent's HTTPS face, with the official MCP
 * TypeScript client and server unmodified around this SDK:
 * - the SDK's machine-to-machine provider (`StaticPrivateKeyJwtProvider`,
 *   as `JwtSvidClientProvider`) gets tokens with a fresh JWT-SVID assertion
 *   for every token request;
 * - an MCP server given only the issuer URL and the CA (`Verifier.remote`)
 *   verifies them with the keys of the RFC 8414 metadata and sees an ended
 *   task through HTTPS introspection within its cache window;
 * - an mTLS MCP server checks a bound token's `cnf` against the client
 *   certificate: the holder's X509-SVID passes, another workload's is refused.
 */
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { X509Certificate } from "node:crypto";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { decodeJwt, SignJWT, generateKeyPair } from "jose";

import { task } from "tessera-sdk";
import { JwtSvidClientProvider } from "tessera-sdk/mcp";
import { certificateThumbprint, TokenRejected, Verifier } from "tessera-sdk/server";

import { AGENT_ID, OTHER_ID, RESOURCE, SDK_DIR, startAgent, type Agent } from "./harness.js";
import { caFetch, mcpClient, mtlsFetch, refusedStatuses, text, withBearer } from "./mcp-client.js";
import { startNotesServer, type NotesServer } from "./notes-server.js";

const CACHE_SECONDS = 1;
let agent: Agent;
let remote: NotesServer;

before(async () => {
  agent = await startAgent();
  remote = await startNotesServer(agent.remoteResource, CACHE_SECONDS, {
    verifier: Verifier.remote(agent.remoteResource, agent.httpsIssuer, {
      ca: readFileSync(agent.ca),
      introspectionCache: CACHE_SECONDS,
    }),
    port: agent.remotePort,
    issuer: agent.httpsIssuer,
    tools: { list_notes: ["notes:read"], add_note: ["notes:write"] },
  });
});

after(async () => {
  remote?.verifier.close();
  await remote?.close();
  await agent?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("the MCP SDK's machine-to-machine provider gets a token with a JWT-SVID, and a second with a fresh one", async () => {
  const assertions: Array<{ audience: string | undefined; jwt: string }> = [];
  const seen: string[] = [];
  for (let i = 0; i < 2; i++) {
    // Two clients, two token requests: the token endpoint accepts each
    // assertion's jti once, so the second needs a new JWT-SVID.
    const provider = new JwtSvidClientProvider({
      clientId: AGENT_ID,
      expectedIssuer: agent.httpsIssuer,
      scope: "notes:read",
    });
    const add = provider.addClientAuthentication;
    provider.addClientAuthentication = async (headers, params, url, metadata) => {
      await add(headers, params, url, metadata);
      assertions.push({ audience: metadata?.issuer, jwt: params.get("client_assertion") ?? "" });
    };
    const client = new Client({ name: "tessera-m2m", version: "0.1.0" });
    await client.connect(
      new StreamableHTTPClientTransport(new URL(remote.url), {
        authProvider: provider,
        fetch: caFetch(readFileSync(agent.ca, "utf8")),
      }),
    );
    assert.match(text(await client.callTool({ name: "list_notes", arguments: {} })), new RegExp(AGENT_ID));
    await client.close();
    provider.close();
    const token = provider.tokens()?.access_token;
    assert.ok(token);
    seen.push(token);
  }
  assert.equal(assertions.length, 2);
  for (const a of assertions) assert.equal(a.audience, agent.httpsIssuer, "the SDK asks for the issuer");
  const [first, second] = assertions.map((a) => decodeJwt(a.jwt));
  assert.equal(first!.sub, AGENT_ID);
  assert.notEqual(first!.jti, second!.jti, "each token request carried a new assertion");
  assert.notEqual(decodeJwt(seen[0]!).jti, decodeJwt(seen[1]!).jti, "two tokens");
  assert.equal(decodeJwt(seen[0]!)["client_id"], AGENT_ID);
});

test("an ended task's token is refused by the remote verifier within its cache window", async () => {
  let token: string;
  {
    await using t = await task("ts-remote", { resource: agent.remoteResource, scopes: ["notes:read"] });
    token = await t.token();
    const { client } = await mcpClient(remote.url, t.fetch);
    assert.match(text(await client.callTool({ name: "list_notes", arguments: {} })), /task ts-remote/);
    await client.close();
  }
  await sleep(CACHE_SECONDS * 1000);
  assert.deepEqual(await refusedStatuses(remote.url, withBearer(token)), new Set([401]));
  const fresh = Verifier.remote(agent.remoteResource, agent.httpsIssuer, {
    ca: readFileSync(agent.ca),
    introspectionCache: 0,
  });
  await assert.rejects(
    fresh.verify(token),
    (e: unknown) => e instanceof TokenRejected && /not active/.test(e.reason),
  );
  fresh.close();
});

test("introspection authenticated by the server's X509-SVID (mTLS) sees an ended task", async () => {
  const verifier = Verifier.remote(agent.remoteResource, agent.httpsIssuer, {
    ca: readFileSync(agent.ca),
    introspectionCache: CACHE_SECONDS,
    clientAuth: "x509-svid",
  });
  let token: string;
  {
    await using t = await task("ts-remote-mtls", { resource: agent.remoteResource, scopes: ["notes:read"] });
    token = await t.token();
    assert.equal((await verifier.verify(token)).taskId, "ts-remote-mtls");
  }
  await sleep(CACHE_SECONDS * 1000);
  await assert.rejects(verifier.verify(token), /not active/);
  verifier.close();
});

test("what the remote verifier refuses", async () => {
  const { privateKey } = await generateKeyPair("ES256");
  const forged = await new SignJWT({ sub: AGENT_ID })
    .setProtectedHeader({ alg: "ES256", kid: "not-a-published-key", typ: "at+jwt" })
    .setIssuer(agent.httpsIssuer)
    .setAudience(agent.remoteResource)
    .setIssuedAt()
    .setExpirationTime("1m")
    .setJti("forged")
    .sign(privateKey);
  await assert.rejects(remote.verifier.verify(forged), /unknown key/);
  // RFC 8414 §3.3: metadata naming another issuer (the trailing slash).
  const wrong = Verifier.remote(agent.remoteResource, `${agent.httpsIssuer}/`, {
    ca: readFileSync(agent.ca),
  });
  await assert.rejects(wrong.verify(forged), /names issuer/);
  // The system's trust store does not know the trust domain's CA.
  const untrusted = Verifier.remote(agent.remoteResource, agent.httpsIssuer);
  await assert.rejects(untrusted.verify(forged), /cannot reach/);
  wrong.close();
  untrusted.close();
});

/** The X509-SVID (and key) of `id` that `bin` gets from the Workload API. */
function svidOf(bin: string, id: string): { cert: string; key: string; ca: string; der: Uint8Array } {
  const dir = mkdtempSync(path.join(agent.dir, "svid-"));
  const fetched = spawnSync(bin, ["api", "fetch", "x509", "--write", dir, "--socket", agent.workloadSocket], {
    encoding: "utf8",
  });
  assert.equal(fetched.status, 0, fetched.stderr);
  for (const name of readdirSync(dir).filter((n) => /^svid\.\d+\.pem$/.test(n))) {
    const cert = readFileSync(path.join(dir, name), "utf8");
    const leaf = new X509Certificate(cert);
    if (leaf.subjectAltName === `URI:${id}`) {
      const n = name.split(".")[1];
      return {
        cert,
        key: readFileSync(path.join(dir, `svid.${n}.key`), "utf8"),
        ca: readFileSync(path.join(dir, `bundle.${n}.pem`), "utf8"),
        der: new Uint8Array(leaf.raw),
      };
    }
  }
  throw new Error(`${bin} got no X509-SVID for ${id}`);
}

test("cnf end to end: a bound token passes with its holder's certificate and is refused with another workload's", async () => {
  const mine = svidOf(agent.bin, AGENT_ID);
  const other = svidOf(agent.otherTessera, OTHER_ID);
  // The MCP server's own X509-SVID serves TLS; it requires a client
  // certificate of the trust domain.
  const server = await startNotesServer(RESOURCE, 0, {
    tls: { cert: mine.cert, key: mine.key, ca: mine.ca },
    tools: { list_notes: ["notes:bound"] },
  });
  try {
    await using t = await task("ts-mtls", {
      resource: RESOURCE,
      scopes: ["notes:bound"],
      fetch: mtlsFetch(mine, AGENT_ID),
    });
    const token = await t.token();
    assert.deepEqual(decodeJwt(token)["cnf"], { "x5t#S256": certificateThumbprint(mine.der) });
    const { client, seen } = await mcpClient(server.url, t.fetch);
    assert.match(text(await client.callTool({ name: "list_notes", arguments: {} })), /task ts-mtls/);
    await client.close();
    assert.ok(
      seen.answers.every((a) => a.status < 400),
      JSON.stringify(seen.answers),
    );
    // The same token from another workload, over its own valid X509-SVID.
    const stolen = withBearer(token, mtlsFetch(other, AGENT_ID));
    assert.deepEqual(await refusedStatuses(server.url, stolen), new Set([401]));
    // Why: the server's verifier, given each certificate.
    assert.equal((await server.verifier.verify(token, mine.der)).taskId, "ts-mtls");
    await assert.rejects(server.verifier.verify(token, other.der), /bound to another client certificate/);
  } finally {
    await server.close();
  }
});

test("the README's off-the-node client runs as written", async () => {
  const readme = readFileSync(path.join(SDK_DIR, "README.md"), "utf8");
  const section = readme.split("## Off the node")[1]!.split("\n## ")[0]!;
  let code = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(code, "the section lost its client");
  for (const [example, real] of [
    ['"http://127.0.0.1:8080/mcp"', JSON.stringify(remote.url)],
    ['"https://localhost:8443"', JSON.stringify(agent.httpsIssuer)],
  ] as const) {
    assert.ok(code.includes(example), example);
    code = code.replace(example, real);
  }
  // Plain JavaScript as written (no annotations), run from inside the
  // package so "tessera-sdk/mcp" and the MCP SDK resolve; Node trusts the
  // trust domain's CA for the HTTPS face.
  const file = path.join(SDK_DIR, "build", "readme-off-the-node.mjs");
  writeFileSync(file, code);
  // Asynchronously: the MCP server it calls runs in this process.
  const run = await promisify(execFile)(process.execPath, [file], {
    encoding: "utf8",
    env: { ...process.env, NODE_EXTRA_CA_CERTS: agent.ca },
    timeout: 60_000,
  });
  assert.match(run.stdout, new RegExp(`by ${AGENT_ID.replace(/[.]/g, "\\.")}, task `));
});
