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
 *
 * Client side, off the node: `JwtSvidClientProvider` is the SDK's
 * machine-to-machine provider (client_credentials with a `private_key_jwt`
 * client assertion) whose assertion is a fresh JWT-SVID from the Workload API:
 *
 *     const provider = new JwtSvidClientProvider({ clientId: MY_SPIFFE_ID,
 *       expectedIssuer: "https://tessera.example", scope: "notes:read" });
 *     new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
 */
import { AsyncLocalStorage } from "node:async_hooks";
import type { IncomingMessage, ServerResponse } from "node:http";

import { StaticPrivateKeyJwtProvider } from "@modelcontextprotocol/sdk/client/auth-extensions.js";
import { InvalidTokenError } from "@modelcontextprotocol/sdk/server/auth/errors.js";
import type { OAuthTokenVerifier } from "@modelcontextprotocol/sdk/server/auth/provider.js";
import type { AuthInfo } from "@modelcontextprotocol/sdk/server/auth/types.js";

import { JwtSvidAssertion, type JwtSvidAssertionOptions } from "./assertion.js";
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

export interface JwtSvidClientProviderOptions extends JwtSvidAssertionOptions {
  /** This workload's SPIFFE ID (the client_id the authorization server knows it by). */
  clientId: string;
  /** The HTTPS issuer of the Tessera agent: credentials go to no other authorization server. */
  expectedIssuer: string;
  /** Space-separated scopes to request. */
  scope?: string;
  clientName?: string;
}

/**
 * The MCP SDK's `StaticPrivateKeyJwtProvider` (client_credentials,
 * `private_key_jwt`, `expectedIssuer` checked by the SDK) with a new JWT-SVID
 * for the issuer as the assertion of every token request, instead of one
 * static JWT that the token endpoint would accept only once.
 */
export class JwtSvidClientProvider extends StaticPrivateKeyJwtProvider {
  readonly assertion: JwtSvidAssertion;

  constructor(options: JwtSvidClientProviderOptions) {
    super({
      clientId: options.clientId,
      expectedIssuer: options.expectedIssuer,
      clientName: options.clientName ?? "tessera-jwt-svid-client",
      ...(options.scope !== undefined ? { scope: options.scope } : {}),
      // Never sent: addClientAuthentication below replaces the static one.
      jwtBearerAssertion: "",
    });
    this.assertion = new JwtSvidAssertion(options);
    this.addClientAuthentication = this.assertion.clientAuthentication();
  }

  close(): void {
    this.assertion.close();
  }
}
