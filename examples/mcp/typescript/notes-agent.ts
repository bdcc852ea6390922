/**
 * The notes agent in TypeScript: one task, its tools called with the official
 * MCP client, tokens from the node agent through tessera-sdk.
 *
 *     node dist/notes-agent.js --task T --scopes "notes:read" [--may-hold "notes:read notes:write"]
 *                              [--server http://127.0.0.1:8080/mcp] [--resource https://notes.example/mcp] STEP...
 *
 * Steps: `list_notes`, `add_note:TEXT`, `delete_note:ID`, each optionally
 * suffixed `@ok` (default) or `@refused`. A `403 insufficient_scope` inside
 * `--may-hold` is stepped up by the task's fetch. Exit 0 if every step went
 * as expected, 2 if the exchange refused the task.
 */
import { parseArgs } from "node:util";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { OAuthError, task } from "tessera-sdk";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    task: { type: "string" },
    scopes: { type: "string" },
    "may-hold": { type: "string", default: "" },
    server: { type: "string", default: "http://127.0.0.1:8080/mcp" },
    resource: { type: "string", default: "https://notes.example/mcp" },
  },
});
if (!values.task || !values.scopes) {
  console.error("usage: notes-agent --task T --scopes S [--may-hold S] [--server URL] STEP...");
  process.exit(64);
}
const scopes = values.scopes.split(" ").filter(Boolean);
const mayHold = values["may-hold"] ? values["may-hold"].split(" ").filter(Boolean) : scopes;
const sorted = (s: ReadonlySet<string>) => [...s].sort().join(" ");

async function run(): Promise<number> {
  let failures = 0;
  {
    await using t = await task(values.task!, {
      resource: values.resource!,
      scopes,
      mayHold,
      onApproval: (a) => console.log(`approval: task ${a.taskId} waits for: tessera approvals approve ${a.id}`),
    });
    console.log(`task ${values.task}: granted ${sorted(t.scopes)}`);
    const client = new Client({ name: "notes-agent-ts", version: "0.1.0" });
    await client.connect(new StreamableHTTPClientTransport(new URL(values.server!), { fetch: t.fetch }));
    for (const step of positionals) {
      const [call = "", expect = "ok"] = step.split("@");
      const [name = "", arg = ""] = call.split(/:(.*)/s);
      const args =
        name === "add_note" ? { text: arg } : name === "delete_note" ? { note_id: Number(arg) } : {};
      const before = sorted(t.scopes);
      let outcome: string;
      let detail: string;
      try {
        const result = await client.callTool({ name, arguments: args });
        outcome = "ok";
        detail = ((result.content ?? []) as Array<{ text?: string }>).map((c) => c.text ?? "").join(" ");
      } catch (e) {
        outcome = "refused";
        detail = `${(e as Error).message}`;
      }
      const stepped = sorted(t.scopes) !== before ? ` (stepped up to ${sorted(t.scopes)})` : "";
      console.log(`tool ${name} -> ${outcome}${stepped}: ${detail}`);
      if (outcome !== expect) {
        console.log(`  expected ${expect}`);
        failures++;
      }
    }
    await client.close();
  }
  console.log(`task ${values.task}: ended, its tokens are revoked`);
  return failures ? 1 : 0;
}

run().then(
  (code) => process.exit(code),
  (e: unknown) => {
    if (e instanceof OAuthError) {
      console.log(`exchange: ${e.error}: ${e.description}`);
      process.exit(2);
    }
    throw e;
  },
);
