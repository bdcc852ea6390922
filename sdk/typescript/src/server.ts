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
import { ConfigurationError, TesseraError } from "./errors.js";
import { httpsRequest, unixRequest, type UnixResponse } from "./http.js";
import { exchangeSocket, findSockets } from "./sockets.js";
import { WorkloadApi } from "./workload.js";

const MAX_CACHED = 10_000;
// An unknown `kid` fetches the keys again at most this often (made-up kids
// must not become a flood of fetches).
const JWKS_REFETCH_SECONDS = 10;
// Keys are fetched again this often even when every kid is known, so a key
// the issuer retired stops verifying here.
const JWKS_REFRESH_SECONDS = 300;

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

export interface RemoteVerifierOptions {
  /** PEM CA bundle for the HTTPS face (default: the system's trust store). */
  ca?: string | Buffer;
  /** This server's Workload API socket, for its JWT-SVID at introspection (default: SPIFFE_ENDPOINT_SOCKET). */
  workloadApi?: string;
  /** Ask the issuer whether the token is still active (default true). */
  introspect?: boolean;
  /** Seconds an introspection answer is reused (default 5). */
  introspectionCache?: number;
  /** Seconds between key fetches when every kid is known (default 300). */
  keysRefresh?: number;
  /** Clock skew tolerated, seconds (default 5). */
  leeway?: number;
  /**
   * How this server proves itself at introspection: "jwt-svid" (default), a
   * JWT-SVID for the issuer as `Authorization: Bearer`; "x509-svid", its
   * X509-SVID as TLS client certificate (RFC 8705), kept in memory.
   */
  clientAuth?: "jwt-svid" | "x509-svid";
}

/** Where RFC 8414 §3.1 puts an issuer's metadata: the well-known path between its host and its path. */
export function metadataUrl(issuer: string): string {
  const url = new URL(issuer);
  return `${url.origin}/.well-known/oauth-authorization-server${url.pathname.replace(/\/$/, "")}`;
}

interface Endpoints {
  jwks: string;
  introspection: string;
}

/** How the verifier reaches the agent: its exchange socket, or its HTTPS face. */
interface Backend {
  where: string;
  metadata: string;
  endpoints?: Endpoints;
  keysRefresh: number;
  request(
    pathOrUrl: string,
    form?: Record<string, string>,
    headers?: Record<string, string>,
    introspection?: boolean,
  ): Promise<UnixResponse>;
  /** The `Authorization` header proving this server at introspection, if the transport does not. */
  authorization?: () => Promise<string>;
  close?: () => void;
}

/** RFC 8705 `x5t#S256` of a DER certificate. */
export function certificateThumbprint(der: Uint8Array): string {
  return createHash("sha256").update(der).digest("base64url");
}

/**
 * Verifies task tokens for one audience (this server's resource URI). On the
 * node, keys, metadata and introspection come from the agent's exchange
 * socket; on another host, `Verifier.remote(audience, issuer)` reaches the
 * agent's HTTPS face instead.
 */
export class Verifier {
  private readonly backend: Backend;
  private issuerValue: string | undefined;
  private keys: ReturnType<typeof createLocalJWKSet> | undefined;
  private kids = new Set<string>();
  private keysFetched: number | undefined;
  private readonly introspected = new Map<string, { active: boolean; at: number }>();

  constructor(
    readonly audience: string,
    private readonly options: VerifierOptions = {},
    backend?: Backend,
  ) {
    if (backend) this.backend = backend;
    else {
      const socket = exchangeSocket(options.exchangeSocket);
      this.backend = {
        where: "the exchange",
        metadata: "/.well-known/oauth-authorization-server",
        endpoints: { jwks: "/jwks", introspection: "/introspect" },
        keysRefresh: JWKS_REFRESH_SECONDS,
        request: (path, form) => unixRequest(socket, form ? "POST" : "GET", path, form),
      };
    }
    this.issuerValue = options.issuer;
  }

  /**
   * A verifier for a server that cannot reach the agent's sockets (another
   * host, another pod): everything comes from the HTTPS face at `issuer`.
   * Keys: the `jwks_uri` of the issuer's RFC 8414 metadata (whose `issuer`
   * must be exactly `issuer`, §3.3), cached, fetched again for an unknown
   * `kid` (at most every 10 s) and every `keysRefresh` seconds. OpenID
   * discovery is not used: its `jwks_uri` holds the JWT-SVID keys, not the
   * access-token keys. Revocation: the metadata's `introspection_endpoint`
   * (RFC 7662), answers cached `introspectionCache` seconds, this server
   * proving itself with a JWT-SVID for audience `issuer` (`Authorization:
   * Bearer`) or, with `clientAuth: "x509-svid"`, its X509-SVID as TLS client
   * certificate, either from its own node's Workload API.
   */
  static remote(audience: string, issuer: string, options: RemoteVerifierOptions = {}): Verifier {
    if (!issuer.startsWith("https://"))
      throw new ConfigurationError(
        `issuer = ${JSON.stringify(issuer)}: the agent's HTTPS face is an https:// URL`,
      );
    let api: WorkloadApi | undefined;
    const workloadApi = () =>
      (api ??= new WorkloadApi(findSockets({ workloadApi: options.workloadApi }).workloadApi));
    const x509 = options.clientAuth === "x509-svid";
    if (options.clientAuth !== undefined && !x509 && options.clientAuth !== "jwt-svid")
      throw new ConfigurationError(
        `clientAuth = ${JSON.stringify(options.clientAuth)}: use "jwt-svid" or "x509-svid"`,
      );
    // The X509-SVID for introspection, fetched again once past half its life.
    let svid: { cert: string; key: string; renewAt: number } | undefined;
    const certificate = async () => {
      if (!svid || Date.now() / 1000 >= svid.renewAt) {
        try {
          const s = await workloadApi().x509Svid();
          svid = { cert: s.certChain, key: s.privateKey, renewAt: (s.issuedAt + s.expiresAt) / 2 };
        } catch (e) {
          throw new TokenRejected(`no X509-SVID to authenticate for introspection: ${(e as Error).message}`);
        }
      }
      return { cert: svid.cert, key: svid.key };
    };
    const backend: Backend = {
      where: issuer,
      metadata: metadataUrl(issuer),
      keysRefresh: options.keysRefresh ?? JWKS_REFRESH_SECONDS,
      request: async (url, form, headers, introspection) =>
        httpsRequest(url, form, headers, options.ca, introspection && x509 ? await certificate() : undefined),
      close: () => api?.close(),
    };
    if (!x509)
      backend.authorization = async () => {
        try {
          // Introspection does not consume it: the cached SVID is reused.
          return `Bearer ${(await workloadApi().jwtSvid(issuer)).token}`;
        } catch (e) {
          throw new TokenRejected(
            `no JWT-SVID to authenticate to ${issuer} for introspection: ${(e as Error).message}`,
          );
        }
      };
    const { ca: _ca, workloadApi: _api, keysRefresh: _refresh, clientAuth: _auth, ...rest } = options;
    return new Verifier(audience, { ...rest, issuer }, backend);
  }

  /** Closes the Workload API channel of a remote verifier. */
  close(): void {
    this.backend.close?.();
  }

  private async get(
    path: string,
    form?: Record<string, string>,
    headers?: Record<string, string>,
    introspection = false,
  ): Promise<Record<string, unknown>> {
    let response;
    try {
      response = await this.backend.request(path, form, headers, introspection);
    } catch (e) {
      throw new TokenRejected(
        `cannot reach ${this.backend.where} to check the token: ${(e as Error).message}`,
      );
    }
    if (response.status !== 200 || typeof response.body !== "object" || response.body === null) {
      const body = response.body as { error?: unknown; error_description?: unknown } | undefined;
      const detail =
        body && typeof body === "object" && "error" in body
          ? ` (${String(body.error)}: ${String(body.error_description ?? "")})`
          : "";
      throw new TokenRejected(`${this.backend.where} answered ${path} with HTTP ${response.status}${detail}`);
    }
    return response.body as Record<string, unknown>;
  }

  private async metadata(): Promise<Record<string, unknown>> {
    const meta = await this.get(this.backend.metadata);
    const issuer = meta["issuer"];
    if (this.issuerValue !== undefined && issuer !== this.issuerValue)
      // RFC 8414 §3.3: metadata for another issuer is not this issuer's.
      throw new TokenRejected(
        `the metadata at ${this.backend.metadata} names issuer ${JSON.stringify(issuer)}, not ${JSON.stringify(this.issuerValue)}`,
      );
    if (typeof issuer !== "string")
      throw new TokenRejected(`the metadata at ${this.backend.metadata} names no issuer`);
    this.issuerValue = issuer;
    return meta;
  }

  private async endpoints(): Promise<Endpoints> {
    if (!this.backend.endpoints) {
      const meta = await this.metadata();
      const jwks = meta["jwks_uri"];
      const introspection = meta["introspection_endpoint"];
      if (
        typeof jwks !== "string" ||
        ((this.options.introspect ?? true) && typeof introspection !== "string")
      )
        throw new TokenRejected(
          `the metadata of ${this.issuerValue} has no jwks_uri or introspection_endpoint`,
        );
      this.backend.endpoints = { jwks, introspection: String(introspection ?? "") };
    }
    return this.backend.endpoints;
  }

  async issuer(): Promise<string> {
    if (this.issuerValue === undefined) await this.metadata();
    return this.issuerValue!;
  }

  private async keySet(kid: string): Promise<ReturnType<typeof createLocalJWKSet>> {
    const { jwks: url } = await this.endpoints();
    const now = Date.now() / 1000;
    const stale = this.keysFetched === undefined || now - this.keysFetched > this.backend.keysRefresh;
    const unknown =
      (!this.keys || !this.kids.has(kid)) &&
      (this.keysFetched === undefined || now - this.keysFetched > JWKS_REFETCH_SECONDS);
    if (stale || unknown) {
      this.keysFetched = now;
      const jwks = (await this.get(url)) as { keys?: Array<{ kid?: string }> };
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
    const { introspection } = await this.endpoints();
    const headers = this.backend.authorization
      ? { authorization: await this.backend.authorization() }
      : undefined;
    const active = (await this.get(introspection, { token }, headers, true))["active"] === true;
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
