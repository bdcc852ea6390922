/**
 * The official MCP TypeScript client, unmodified, over a `fetch` that
 * records every HTTP answer, so a test can assert what the server said.
 */
import { request, type RequestOptions } from "node:https";
import { Readable } from "node:stream";
import type { PeerCertificate } from "node:tls";

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

export function withBearer(token: string, base: FetchLike = fetch): FetchLike {
  return (input, init) => {
    const headers = new Headers(init?.headers);
    headers.set("authorization", `Bearer ${token}`);
    return base(input, { ...init, headers });
  };
}

/**
 * A `fetch` over node:https presenting a client certificate (an X509-SVID)
 * and authenticating the server SPIFFE-style: its chain against the trust
 * bundle `ca`, and its URI SAN equal to `serverId` (an SVID has no DNS name).
 */
export function mtlsFetch(tls: { cert: string; key: string; ca: string }, serverId: string): FetchLike {
  return httpsFetch({
    ...tls,
    checkServerIdentity: (_host: string, cert: PeerCertificate) =>
      cert.subjectaltname === `URI:${serverId}`
        ? undefined
        : new Error(`the server is ${cert.subjectaltname}, not ${serverId}`),
  });
}

/** A `fetch` trusting the PEM bundle `ca` for https:// URLs (the global fetch for http://). */
export function caFetch(ca: string): FetchLike {
  return httpsFetch({ ca });
}

function httpsFetch(options: RequestOptions): FetchLike {
  return (input, init) =>
    new Promise((resolve, reject) => {
      const url = new URL(input instanceof Request ? input.url : String(input));
      if (url.protocol === "http:") return resolve(fetch(input, init));
      const headers: Record<string, string> = {};
      new Headers(init?.headers).forEach((v, k) => (headers[k] = v));
      const req = request(
        url,
        {
          method: init?.method ?? "GET",
          headers,
          ...options,
        },
        (res) => {
          const responseHeaders = new Headers();
          for (const [k, v] of Object.entries(res.headers))
            for (const value of Array.isArray(v) ? v : v === undefined ? [] : [v])
              responseHeaders.append(k, value);
          const status = res.statusCode ?? 0;
          const body =
            status === 204 || status === 304 ? null : (Readable.toWeb(res) as ReadableStream<Uint8Array>);
          resolve(new Response(body, { status, headers: responseHeaders }));
        },
      );
      req.on("error", reject);
      init?.signal?.addEventListener("abort", () => req.destroy(new Error("aborted")));
      if (init?.body !== undefined && init.body !== null) req.write(String(init.body));
      req.end();
    });
}
