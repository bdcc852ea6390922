/**
 * The sub-agent of mcp.test.ts "a delegation narrows", run from a copy of
 * node (another executable, so another SPIFFE ID): reads the delegated token
 * on stdin, acts for it with notes:read, prints a JSON report.
 */
import { decodeJwt } from "jose";

import { actFor, InvalidScope } from "tessera-sdk";

import { RESOURCE, SUB_AGENT_ID } from "./harness.js";
import { mcpClient } from "./mcp-client.js";

const url = process.argv[2]!;
let handed = "";
for await (const chunk of process.stdin) handed += String(chunk);
handed = handed.trim();

const report: Record<string, unknown> = {};
{
  await using t = await actFor(handed, {
    resource: RESOURCE,
    scopes: ["notes:read"],
    spiffeId: SUB_AGENT_ID,
  });
  const token = await t.token();
  report["token"] = token;
  report["claims"] = decodeJwt(token);
  const { client, seen } = await mcpClient(url, t.fetch);
  await client.callTool({ name: "list_notes", arguments: {} });
  report["list_notes"] = seen.answers.at(-1)!.status;
  await client
    .callTool({ name: "add_note", arguments: { text: "not mine to write" } })
    .catch(() => undefined);
  const last = seen.answers.at(-1)!;
  report["add_note"] = [last.status, last.challenge?.error, [...(last.challenge?.scope ?? [])].sort()];
  await client.close();
  try {
    await using wider = await actFor(handed, {
      resource: RESOURCE,
      scopes: ["notes:delete"],
      spiffeId: SUB_AGENT_ID,
    });
    report["wider"] = `issued ${wider.scopes.size}`;
  } catch (e) {
    report["wider"] = e instanceof InvalidScope ? e.error : String(e);
  }
}
process.stdout.write(JSON.stringify(report));
