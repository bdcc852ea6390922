/**
 * The resource-server side: verify task tokens, require scopes per MCP tool.
 *
 * `Verifier` checks a token as RFC 9068 and RFC 8705 say a resource server
 * must (ES256 signature by a key of the exchange's `/jwks`, `typ` `at+jwt`,
 * `iss`, `aud`, lifetime, and, when the token carries `cnf`, the connection's
 * client certificate: a bound token without it is refused, RFC 8705 §3), and
 * sees revocation through introspection at the exchange, cached briefly.
 *
 * `toolScopes` is a Node/Express middleware for the MCP endpoint: a
 * `tools/call` whose token lacks the tool's scopes gets a real
 * `403 insufficient_scope` with `WWW-Authenticate: Bearer error=...,
 * scope="<what the tool needs>", resource_metadata=...` (RFC 6750 §3.1,
 * the MCP scope challenge).
 */
import { createHash, X509Certificate } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { TLSSocket } from "node:tls";

import {
  createLocalJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  jwtVerify,
  type JWTPayload,
} from "jose";

import { formatChallenge } from "./challenge.js";
import { TesseraError } from "./errors.js";
import { unixRequest } from "./http.js";
import { exchangeSocket } from "./sockets.js";

const MAX_CACHED = 10_000;
const JWKS_REFETCH_SECONDS = 10;

/** The token is not acceptable here; `reason` says why (never the token). */
export class TokenRejected extends TesseraError {
  override name = "TokenRejected";
  constructor(readonly reason: string) {
    super(reason);
  }
}

export interface VerifiedToken {
  token: string;
  subject: string;
  clientId: string;
  scopes: ReadonlySet<string>;
  audience: string;
  expiresAt: number;
  taskId: string | undefined;
  actor: string | undefined;
  claims: JWTPayload & Record<string, unknown>;
}

export interface VerifierOptions {
  /** Expected `iss` (default: the exchange's metadata). */
  issuer?: string;
  /** The agent's exchange socket (default: TESSERA_EXCHANGE_SOCKET, or beside SPIFFE_ENDPOINT_SOCKET). */
  exchangeSocket?: string;
  /** Ask the exchange whether the token is still active (default true). */
  introspect?: boolean;
  /** Seconds an introspection answer is reused (default 5). */
  introspectionCache?: number;
  /** Clock skew tolerated, seconds (default 5). */
  leeway?: number;
}

/** RFC 8705 `x5t#S256` of a DER certificate. */
export function certificateThumbprint(der: Uint8Array): string {
  return createHash("sha256").update(der).digest("base64url");
}

/** Verifies task tokens for one audience (this server's resource URI). */
export class Verifier {
  private readonly socket: string;
  private issuerValue: string | undefined;
  private keys: ReturnType<typeof createLocalJWKSet> | undefined;
  private kids = new Set<string>();
  private keysFetched = 0;
  private readonly introspected = new Map<string, { active: boolean; at: number }>();

  constructor(
    readonly audience: string,
    private readonly options: VerifierOptions = {},
  ) {
    this.socket = exchangeSocket(options.exchangeSocket);
    this.issuerValue = options.issuer;
  }

  private async get(path: string, form?: Record<string, string>): Promise<Record<string, unknown>> {
    let response;
    try {
      response = await unixRequest(this.socket, form ? "POST" : "GET", path, form);
    } catch (e) {
      throw new TokenRejected(`cannot reach the exchange to check the token: ${(e as Error).message}`);
    }
    if (response.status !== 200 || typeof response.body !== "object" || response.body === null)
      throw new TokenRejected(`the exchange answered ${path} with HTTP ${response.status}`);
    return response.body as Record<string, unknown>;
  }

  async issuer(): Promise<string> {
    this.issuerValue ??= String((await this.get("/.well-known/oauth-authorization-server"))["issuer"]);
    return this.issuerValue;
  }

  private async keySet(kid: string): Promise<ReturnType<typeof createLocalJWKSet>> {
    if ((!this.keys || !this.kids.has(kid)) && Date.now() / 1000 - this.keysFetched > JWKS_REFETCH_SECONDS) {
      this.keysFetched = Date.now() / 1000;
      const jwks = (await this.get("/jwks")) as { keys?: Array<{ kid?: string }> };
      this.keys = createLocalJWKSet(jwks as Parameters<typeof createLocalJWKSet>[0]);
      this.kids = new Set((jwks.keys ?? []).map((k) => String(k.kid)));
    }
    if (!this.keys || !this.kids.has(kid))
      throw new TokenRejected(`signed with an unknown key ${JSON.stringify(kid)}`);
    return this.keys;
  }

  private async active(token: string): Promise<boolean> {
    const digest = createHash("sha256").update(token).digest("hex");
    const now = Date.now() / 1000;
    const cached = this.introspected.get(digest);
    if (cached && now - cached.at < (this.options.introspectionCache ?? 5)) return cached.active;
    const active = (await this.get("/introspect", { token }))["active"] === true;
    if (this.introspected.size >= MAX_CACHED) this.introspected.clear();
    this.introspected.set(digest, { active, at: now });
    return active;
  }

  /** The verified token, or TokenRejected. `clientCertificate`: the DER certificate the client presented. */
  async verify(token: string, clientCertificate?: Uint8Array): Promise<VerifiedToken> {
    let kid: string;
    try {
      const header = decodeProtectedHeader(token);
      if (header.alg !== "ES256" || typeof header.kid !== "string")
        throw new TokenRejected("only ES256 tokens with a kid are issued by Tessera");
      kid = header.kid;
    } catch (e) {
      if (e instanceof TokenRejected) throw e;
      throw new TokenRejected(`not a JWT: ${(e as Error).message}`);
    }
    let claims: JWTPayload & Record<string, unknown>;
    try {
      ({ payload: claims } = await jwtVerify(token, await this.keySet(kid), {
        algorithms: ["ES256"],
        typ: "at+jwt",
        issuer: await this.issuer(),
        audience: this.audience,
        clockTolerance: this.options.leeway ?? 5,
        requiredClaims: ["exp", "iat", "iss", "aud", "sub", "jti"],
      }));
    } catch (e) {
      if (e instanceof TokenRejected) throw e;
      if (e instanceof joseErrors.JOSEError) throw new TokenRejected(`invalid token: ${e.message}`);
      throw e;
    }
    const cnf = claims["cnf"] as Record<string, unknown> | undefined;
    if (cnf !== undefined) {
      if (typeof cnf["x5t#S256"] !== "string")
        throw new TokenRejected("the token carries a cnf this server cannot check");
      if (clientCertificate === undefined)
        throw new TokenRejected(
          "the token is bound to a client certificate (cnf) and the connection has none (RFC 8705 §3)",
        );
      if (certificateThumbprint(clientCertificate) !== cnf["x5t#S256"])
        throw new TokenRejected("the token is bound to another client certificate (cnf)");
    }
    if ((this.options.introspect ?? true) && !(await this.active(token)))
      throw new TokenRejected("token is not active (revoked, expired or its task has ended)");
    const act = claims["act"] as { sub?: unknown } | undefined;
    return {
      token,
      subject: String(claims.sub),
      clientId: String(claims["client_id"] ?? claims.sub),
      scopes: new Set(
        String(claims["scope"] ?? "")
          .split(" ")
          .filter(Boolean),
      ),
      audience: this.audience,
      expiresAt: Number(claims.exp),
      taskId: typeof claims["txn"] === "string" ? claims["txn"] : undefined,
      actor: act && typeof act.sub === "string" ? act.sub : undefined,
      claims,
    };
  }
}

/** The client's certificate (DER) if the connection is TLS and the client sent one. */
export function clientCertificateOf(request: IncomingMessage): Uint8Array | undefined {
  const socket = request.socket as Partial<TLSSocket>;
  if (typeof socket.getPeerCertificate !== "function") return undefined;
  const cert = socket.getPeerCertificate();
  return cert && cert.raw && cert.raw.length ? new Uint8Array(cert.raw) : undefined;
}

/** Where RFC 9728 puts the metadata of `resource` (what the MCP SDKs serve). */
export function resourceMetadataUrl(resource: string): string {
  const url = new URL(resource);
  return `${url.origin}/.well-known/oauth-protected-resource${url.pathname.replace(/\/$/, "")}`;
}

/** Names of the tools a JSON-RPC body (already parsed) calls. */
export function toolsCalled(body: unknown): string[] {
  const messages = Array.isArray(body) ? body : [body];
  return messages
    .filter(
      (m): m is { method: string; params?: { name?: unknown } } =>
        typeof m === "object" && m !== null && (m as { method?: unknown }).method === "tools/call",
    )
    .map((m) => (typeof m.params?.name === "string" ? m.params.name : ""));
}

export interface ToolScopesOptions {
  /** Scopes needed by tools not listed (default: nothing beyond the bearer check). */
  otherTools?: string[];
  /** RFC 9728 metadata URL, put into every challenge. */
  resourceMetadataUrl?: string;
}

type Next = (error?: unknown) => void;
type RequestWithAuth = IncomingMessage & { body?: unknown; auth?: { scopes: string[]; clientId?: string } };

/**
 * Express (or any `(req, res, next)`) middleware for the MCP endpoint, after
 * a JSON body parser and after the MCP SDK's `requireBearerAuth` (which sets
 * `req.auth`): a `tools/call` needs every scope listed for its tool.
 */
export function toolScopes(tools: Record<string, string[]>, options: ToolScopesOptions = {}) {
  const required = (tool: string) => tools[tool] ?? options.otherTools ?? [];
  return (req: RequestWithAuth, res: ServerResponse, next: Next): void => {
    const names = req.method === "POST" ? toolsCalled(req.body) : [];
    const needed = new Set(names.flatMap(required));
    if (!needed.size) return next();
    const held = new Set(req.auth?.scopes ?? []);
    const challengeBase = options.resourceMetadataUrl
      ? { resourceMetadata: options.resourceMetadataUrl }
      : {};
    if (!req.auth) {
      res.writeHead(401, {
        "content-type": "application/json",
        "www-authenticate": formatChallenge({ scope: new Set(), ...challengeBase }),
      });
      res.end(JSON.stringify({ error: "invalid_token", error_description: "a bearer token is required" }));
      return;
    }
    if ([...needed].every((s) => held.has(s))) return next();
    const description = `tool ${[...new Set(names)].sort().join(", ")} needs scope ${[...needed].sort().join(" ")}`;
    res.writeHead(403, {
      "content-type": "application/json",
      "www-authenticate": formatChallenge({
        error: "insufficient_scope",
        errorDescription: description,
        scope: needed,
        ...challengeBase,
      }),
    });
    res.end(JSON.stringify({ error: "insufficient_scope", error_description: description }));
  };
}
