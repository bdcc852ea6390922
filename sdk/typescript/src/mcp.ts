/**
 * The official MCP TypeScript SDK's auth seam, served by Tessera:
 *
 *     const verifier = new Verifier("https://notes.example/mcp");
 *     app.post("/mcp", clientCertificate(), requireBearerAuth({ verifier: tesseraTokenVerifier(verifier) }),
 *              toolScopes({ add_note: ["notes:write"] }, {...}), handler);
 *
 * `tesseraTokenVerifier` is the SDK's `OAuthTokenVerifier`: an `AuthInfo` for
 * every token `Verifier` accepts, `InvalidTokenError` (so a 401 with a Bearer
 * challenge) for every other. `clientCertificate()` hands the connection's
 * client certificate to it, for tokens bound by `cnf`.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import type { IncomingMessage, ServerResponse } from "node:http";

import { InvalidTokenError } from "@modelcontextprotocol/sdk/server/auth/errors.js";
import type { OAuthTokenVerifier } from "@modelcontextprotocol/sdk/server/auth/provider.js";
import type { AuthInfo } from "@modelcontextprotocol/sdk/server/auth/types.js";

import { clientCertificateOf, TokenRejected, Verifier } from "./server.js";

const certificates = new AsyncLocalStorage<Uint8Array | undefined>();

/** Middleware (first on the MCP route): the connection's client certificate, for `cnf`. */
export function clientCertificate() {
  return (req: IncomingMessage, _res: ServerResponse, next: (error?: unknown) => void): void => {
    certificates.run(clientCertificateOf(req), () => next());
  };
}

export function tesseraTokenVerifier(verifier: Verifier): OAuthTokenVerifier {
  return {
    async verifyAccessToken(token: string): Promise<AuthInfo> {
      try {
        const verified = await verifier.verify(token, certificates.getStore());
        let resource: URL | undefined;
        try {
          resource = new URL(verified.audience);
        } catch {
          resource = undefined; // a logical audience, not a URL
        }
        return {
          token,
          clientId: verified.clientId,
          scopes: [...verified.scopes].sort(),
          expiresAt: verified.expiresAt,
          ...(resource ? { resource } : {}),
          extra: {
            subject: verified.subject,
            taskId: verified.taskId,
            actor: verified.actor,
            claims: verified.claims,
          },
        };
      } catch (e) {
        if (e instanceof TokenRejected) throw new InvalidTokenError(e.reason);
        throw e;
      }
    },
  };
}
