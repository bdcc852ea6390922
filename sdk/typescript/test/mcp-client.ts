/**
 * The official MCP TypeScript client, unmodified, over a `fetch` that
 * records every HTTP answer, so a test can assert what the server said.
 */
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

import { parseChallenge, type BearerChallenge, type FetchLike } from "tessera-sdk";

export interface Seen {
  answers: Array<{ status: number; challenge: BearerChallenge | undefined }>;
}

export function recording(base: FetchLike, seen: Seen): FetchLike {
  return async (input, init) => {
    const response = await base(input, init);
    if ((init?.method ?? "GET") === "POST")
      seen.answers.push({
        status: response.status,
        challenge: parseChallenge(response.headers.get("www-authenticate")),
      });
    return response;
  };
}

/** A connected MCP client whose requests go through `fetch` (recorded into `seen`). */
export async function mcpClient(url: string, fetch: FetchLike, seen: Seen = { answers: [] }) {
  const client = new Client({ name: "tessera-sdk-test", version: "0.1.0" });
  await client.connect(new StreamableHTTPClientTransport(new URL(url), { fetch: recording(fetch, seen) }));
  return { client, seen };
}

/** Statuses of a connection attempt the server must refuse. */
export async function refusedStatuses(url: string, fetch: FetchLike): Promise<Set<number>> {
  const seen: Seen = { answers: [] };
  try {
    const { client } = await mcpClient(url, fetch, seen);
    await client.close();
  } catch {
    return new Set(seen.answers.map((a) => a.status));
  }
  throw new Error("the MCP client connected");
}

export function text(result: unknown): string {
  const content = (result as { content?: Array<{ text?: string }> }).content ?? [];
  return content.map((c) => c.text ?? "").join(" ");
}

export function withBearer(token: string): FetchLike {
  return (input, init) => {
    const headers = new Headers(init?.headers);
    headers.set("authorization", `Bearer ${token}`);
    return fetch(input, { ...init, headers });
  };
}
