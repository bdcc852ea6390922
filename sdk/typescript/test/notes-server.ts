/**
 * The notes MCP server of the TypeScript tests: the official MCP SDK's
 * `McpServer` over streamable HTTP (stateless), its `requireBearerAuth`
 * with this SDK's verifier, and `toolScopes` per tool.
 */
import type { Server } from "node:http";
import { createServer as createHttpsServer } from "node:https";

import { requireBearerAuth } from "@modelcontextprotocol/sdk/server/auth/middleware/bearerAuth.js";
import { createMcpExpressApp } from "@modelcontextprotocol/sdk/server/express.js";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { z } from "zod";

import { clientCertificate, tesseraTokenVerifier } from "tessera-sdk/mcp";
import { resourceMetadataUrl, toolScopes, Verifier } from "tessera-sdk/server";

export const TOOL_SCOPES = {
  list_notes: ["notes:read"],
  add_note: ["notes:write"],
  delete_note: ["notes:delete"],
};

export interface NotesServer {
  url: string;
  verifier: Verifier;
  close(): Promise<void>;
}

export interface NotesServerOptions {
  /** Default: a Verifier on the exchange socket. */
  verifier?: Verifier;
  /** Default: any free port. */
  port?: number;
  /** Scopes per tool (default TOOL_SCOPES). */
  tools?: Record<string, string[]>;
  /** Publish Protected Resource Metadata naming this authorization server. */
  issuer?: string;
  /** Serve HTTPS and require a client certificate issued by `ca` (PEM). */
  tls?: { cert: string; key: string; ca: string };
}

export async function startNotesServer(
  resource: string,
  introspectionCache: number,
  options: NotesServerOptions = {},
): Promise<NotesServer> {
  const verifier = options.verifier ?? new Verifier(resource, { introspectionCache });
  const notes = new Map<number, string>();
  let nextId = 1;
  const build = () => {
    const server = new McpServer({ name: "notes", version: "0.1.0" });
    server.registerTool("list_notes", { description: "List every note." }, async (extra) => ({
      content: [
        {
          type: "text",
          text:
            [...notes].map(([id, text]) => `#${id} "${text}"`).join("; ") +
            ` (by ${extra.authInfo?.clientId}, task ${String(extra.authInfo?.extra?.["taskId"])})`,
        },
      ],
    }));
    server.registerTool(
      "add_note",
      { description: "Add a note.", inputSchema: { text: z.string() } },
      async ({ text }) => {
        const id = nextId++;
        notes.set(id, text);
        return { content: [{ type: "text", text: `added note #${id}` }] };
      },
    );
    server.registerTool(
      "delete_note",
      { description: "Delete a note.", inputSchema: { note_id: z.number() } },
      async ({ note_id }) => ({
        content: [
          { type: "text", text: notes.delete(note_id) ? `deleted note #${note_id}` : `no note #${note_id}` },
        ],
      }),
    );
    return server;
  };
  const app = createMcpExpressApp();
  const metadata = resourceMetadataUrl(resource);
  if (options.issuer) {
    const prm = { resource, authorization_servers: [options.issuer], bearer_methods_supported: ["header"] };
    app.get(new URL(metadata).pathname, (_req, res) => {
      res.json(prm);
    });
  }
  app.post(
    "/mcp",
    clientCertificate(),
    requireBearerAuth({ verifier: tesseraTokenVerifier(verifier), resourceMetadataUrl: metadata }),
    toolScopes(options.tools ?? TOOL_SCOPES, { otherTools: ["notes:admin"], resourceMetadataUrl: metadata }),
    async (req, res) => {
      const server = build();
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
      res.on("close", () => {
        void transport.close();
        void server.close();
      });
      await server.connect(transport);
      await transport.handleRequest(req, res, req.body);
    },
  );
  const port = options.port ?? 0;
  const listener: Server = await new Promise((resolve) => {
    if (options.tls) {
      // mTLS: the client's X509-SVID is verified against the trust bundle, and
      // clientCertificate() hands it to the verifier for cnf.
      const l = createHttpsServer({ ...options.tls, requestCert: true, rejectUnauthorized: true }, app);
      l.listen(port, "127.0.0.1", () => resolve(l));
    } else {
      const l = app.listen(port, "127.0.0.1", () => resolve(l));
    }
  });
  const address = listener.address();
  if (typeof address !== "object" || !address) throw new Error("no address");
  return {
    url: `${options.tls ? "https" : "http"}://127.0.0.1:${address.port}/mcp`,
    verifier,
    close: () => new Promise((resolve) => listener.close(() => resolve())),
  };
}
