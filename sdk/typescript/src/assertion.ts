/**
 * JWT-SVIDs as client assertions, for OAuth clients that authenticate with
 * `private_key_jwt` (RFC 7523 §2.2) at Tessera's HTTPS token endpoint.
 *
 *     const assertion = new JwtSvidAssertion();
 *     const jwt = await assertion.assertion("https://tessera.example");
 *
 * Each call is a new JWT-SVID for the audience, from the Workload API (found
 * as everywhere in this SDK: the option, else SPIFFE_ENDPOINT_SOCKET), never a
 * cached one: the token endpoint accepts each assertion once, by its `jti`
 * (RFC 7523 §3), so a second token request needs a new SVID. The node agent
 * mints one afresh for every fetch whose audience is its own token service.
 *
 * For the official MCP TypeScript SDK, "tessera-sdk/mcp" has
 * `JwtSvidClientProvider`, its machine-to-machine provider with this as the
 * assertion; `clientAuthentication()` fits any provider's
 * `addClientAuthentication`.
 */
import { findSockets } from "./sockets.js";
import { WorkloadApi } from "./workload.js";

export const CLIENT_ASSERTION_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

export interface JwtSvidAssertionOptions {
  /** The Workload API socket (default: SPIFFE_ENDPOINT_SOCKET). */
  workloadApi?: string;
  /** Which of this process's identities to use (default: its first). */
  spiffeId?: string;
}

export class JwtSvidAssertion {
  private api: WorkloadApi | undefined;

  constructor(private readonly options: JwtSvidAssertionOptions = {}) {}

  /** A new JWT-SVID for `audience` (the authorization server's issuer). */
  async assertion(audience: string): Promise<string> {
    // Found on first use, so a missing socket is reported where it matters.
    this.api ??= new WorkloadApi(findSockets({ workloadApi: this.options.workloadApi }).workloadApi);
    return (await this.api.jwtSvid(audience, this.options.spiffeId, { fresh: true })).token;
  }

  /**
   * An `addClientAuthentication` for an MCP SDK OAuth provider: the audience
   * is the issuer of the authorization server's metadata (RFC 7523bis), else
   * the token endpoint URL.
   */
  clientAuthentication(): (
    headers: Headers,
    params: URLSearchParams,
    url: string | URL,
    metadata?: { issuer: string },
  ) => Promise<void> {
    return async (_headers, params, url, metadata) => {
      params.set("client_assertion", await this.assertion(metadata?.issuer ?? String(url)));
      params.set("client_assertion_type", CLIENT_ASSERTION_JWT_BEARER);
    };
  }

  close(): void {
    this.api?.close();
    this.api = undefined;
  }
}
