/**
 * The Show items of issue 15 for TypeScript: a real agent (`tessera`), the
 * official MCP TypeScript client and server unmodified around this SDK.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { decodeJwt } from "jose";

import { AccessDenied, task, type Approval } from "tessera-sdk";

import { RESOURCE, startAgent, SUB_AGENT_ID, type Agent } from "./harness.js";
import { mcpClient, recording, refusedStatuses, text, withBearer, type Seen } from "./mcp-client.js";
import { startNotesServer, type NotesServer } from "./notes-server.js";

let agent: Agent;
let server: NotesServer;

before(async () => {
  agent = await startAgent();
  server = await startNotesServer(RESOURCE, 0.5);
});

after(async () => {
  await server?.close();
  await agent?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("a permitted tool call succeeds", async () => {
  await using t = await task("ts-permitted", { resource: RESOURCE, scopes: ["notes:read", "notes:write"] });
  const { client, seen } = await mcpClient(server.url, t.fetch);
  const added = await client.callTool({ name: "add_note", arguments: { text: "buy milk" } });
  const listed = await client.callTool({ name: "list_notes", arguments: {} });
  await client.close();
  assert.match(text(added), /added note/);
  assert.match(text(listed), /buy milk/);
  assert.match(text(listed), /task ts-permitted/);
  assert.ok(
    seen.answers.every((a) => a.status === 200 || a.status === 202),
    JSON.stringify(seen.answers),
  );
});

test("a tool outside the task's scopes gets 403 insufficient_scope", async () => {
  await using t = await task("ts-read-only", { resource: RESOURCE, scopes: ["notes:read"] });
  const { client, seen } = await mcpClient(server.url, t.fetch);
  await client.callTool({ name: "list_notes", arguments: {} });
  await assert.rejects(
    client.callTool({ name: "add_note", arguments: { text: "sneaky" } }),
    /insufficient_scope/,
  );
  await client.close();
  const last = seen.answers.at(-1)!;
  assert.equal(last.status, 403);
  assert.equal(last.challenge?.error, "insufficient_scope");
  assert.deepEqual(last.challenge?.scope, new Set(["notes:write"]));
  assert.equal(
    last.challenge?.resourceMetadata,
    "https://notes.example/.well-known/oauth-protected-resource/mcp",
  );
  assert.deepEqual(t.scopes, new Set(["notes:read"]));
});

test("step-up inside the allowed scopes succeeds", async () => {
  // What the server answered, beneath the task's fetch (which retries).
  const wire: Seen = { answers: [] };
  await using t = await task("ts-step-up", {
    resource: RESOURCE,
    scopes: ["notes:read"],
    mayHold: ["notes:read", "notes:write"],
    fetch: recording(fetch, wire),
  });
  const first = await t.token();
  const { client, seen } = await mcpClient(server.url, t.fetch);
  await client.callTool({ name: "list_notes", arguments: {} });
  seen.answers.length = 0;
  wire.answers.length = 0;
  const added = await client.callTool({ name: "add_note", arguments: { text: "stepped up" } });
  await client.close();
  assert.match(text(added), /added note/);
  assert.deepEqual(
    wire.answers.map((a) => a.status),
    [403, 200],
  );
  assert.deepEqual(
    seen.answers.map((a) => a.status),
    [200],
    "the step-up happens inside t.fetch: the client sees the retried answer",
  );
  assert.equal(t.lastChallenge?.error, "insufficient_scope");
  assert.deepEqual(t.scopes, new Set(["notes:read", "notes:write"]));
  assert.equal(decodeJwt(await t.token())["scope"], "notes:read notes:write");
  assert.equal(decodeJwt(first)["scope"], "notes:read");
});

test("after the task ends the next call gets 401", async () => {
  let token: string;
  let ended;
  {
    await using t = await task("ts-ended", { resource: RESOURCE, scopes: ["notes:read"] });
    token = await t.token();
    const { client } = await mcpClient(server.url, t.fetch);
    await client.callTool({ name: "list_notes", arguments: {} });
    await client.close();
    ended = t;
  }
  assert.ok(ended.hasEnded);
  await sleep(600); // the server's introspection cache (0.5 s)
  assert.deepEqual(await refusedStatuses(server.url, withBearer(token)), new Set([401]));
  assert.deepEqual(await refusedStatuses(server.url, ended.fetch), new Set([401]));
});

test("an approval round trip", async () => {
  const approvals: Approval[] = [];
  await using t = await task("ts-cleanup", {
    resource: RESOURCE,
    scopes: ["notes:delete"],
    onApproval: (approval) => {
      approvals.push(approval);
      agent.approve(approval.id); // what a person does with `tessera approvals approve`
    },
  });
  const { client, seen } = await mcpClient(server.url, t.fetch);
  const deleted = await client.callTool({ name: "delete_note", arguments: { note_id: 999 } });
  await client.close();
  assert.equal(approvals.length, 1);
  assert.deepEqual(approvals[0]!.scopes, new Set(["notes:delete"]));
  assert.equal(approvals[0]!.taskId, "ts-cleanup");
  assert.match(approvals[0]!.id, /^apr_/);
  assert.match(text(deleted), /no note #999/);
  assert.ok(
    seen.answers.every((a) => a.status === 200 || a.status === 202),
    JSON.stringify(seen.answers),
  );
});

test("a denied approval rejects with AccessDenied", async () => {
  await assert.rejects(
    task("ts-denied", {
      resource: RESOURCE,
      scopes: ["notes:delete"],
      onApproval: (approval) => agent.deny(approval.id),
    }),
    AccessDenied,
  );
});

test("a delegation narrows", async () => {
  await using t = await task("ts-delegate", { resource: RESOURCE, scopes: ["notes:read", "notes:write"] });
  const handed = await t.delegate(SUB_AGENT_ID);
  // The sub-agent is another program (a copy of node, so another identity).
  const script = path.join(path.dirname(fileURLToPath(import.meta.url)), "sub-agent.js");
  const child = spawn(agent.subAgentNode, [script, server.url], { stdio: ["pipe", "pipe", "pipe"] });
  child.stdin.end(handed);
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const code = await new Promise((r) => child.on("exit", r));
  assert.equal(code, 0, err);
  const report = JSON.parse(out) as Record<string, unknown>;
  assert.deepEqual(decodeJwt(handed)["may_act"], { sub: SUB_AGENT_ID });
  const delegated = report["claims"] as Record<string, unknown>;
  assert.equal(delegated["sub"], "spiffe://example.org/sdk/agent");
  assert.equal(delegated["client_id"], SUB_AGENT_ID);
  assert.deepEqual(delegated["act"], { sub: SUB_AGENT_ID });
  assert.equal(delegated["txn"], "ts-delegate");
  assert.equal(delegated["scope"], "notes:read");
  assert.ok(Number(delegated["exp"]) <= Number(decodeJwt(handed)["exp"]));
  assert.equal(report["list_notes"], 200);
  assert.deepEqual(report["add_note"], [403, "insufficient_scope", ["notes:write"]]);
  assert.equal(report["wider"], "invalid_scope");
  await sleep(600);
  assert.deepEqual(await refusedStatuses(server.url, withBearer(String(report["token"]))), new Set([401]));
});
