/**
 * The node agent's token exchange (docs/exchange.md) over its Unix socket:
 * one method per endpoint, OAuth errors thrown as the typed errors of
 * ./errors.ts. Most agents use `task()` instead, which calls it.
 */
import { oauthError, ServerError, TemporarilyUnavailable } from "./errors.js";
import { unixRequest } from "./http.js";
import { findSockets, type SocketOptions, type Sockets } from "./sockets.js";
import { WorkloadApi } from "./workload.js";

export const TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
export const JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt";
export const ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token";

/** The one audience of a token: an RFC 8707 `resource` URI or a logical `audience`. */
export type Target = { resource: string; audience?: undefined } | { audience: string; resource?: undefined };

export function targetValue(target: Target): string {
  return target.resource ?? target.audience!;
}

/** A token the exchange issued (RFC 8693 §2.2.1). */
export interface IssuedToken {
  accessToken: string;
  scopes: ReadonlySet<string>;
  expiresIn: number;
  taskId: string | undefined;
  issuedAt: number;
  /** Seconds since the epoch. */
  expiresAt: number;
}

export interface TokenRequest {
  taskId?: string;
  ttl?: number;
  mayAct?: string;
  approvalId?: string;
  /** A token this workload may act on (`may_act`): delegation. */
  onBehalfOf?: string;
}

export interface ExchangeOptions extends SocketOptions {
  /** Pick one of several identities of this process. */
  spiffeId?: string;
}

export class Exchange {
  readonly sockets: Sockets;
  private readonly workload: WorkloadApi;
  private metadataCache: Record<string, unknown> | undefined;

  constructor(readonly options: ExchangeOptions = {}) {
    this.sockets = findSockets(options);
    this.workload = new WorkloadApi(this.sockets.workloadApi);
  }

  close(): void {
    this.workload.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private async call(path: string, form?: Record<string, string>): Promise<Record<string, unknown>> {
    let response;
    try {
      response = await unixRequest(this.sockets.exchange, form ? "POST" : "GET", path, form);
    } catch (e) {
      throw new TemporarilyUnavailable(
        `cannot reach the exchange socket ${this.sockets.exchange}: ${(e as Error).message}`,
        503,
      );
    }
    if (response.status !== 200) throw oauthError(response.status, response.body);
    if (typeof response.body !== "object" || response.body === null)
      throw new ServerError(`${path} answered without a JSON object`, response.status);
    return response.body as Record<string, unknown>;
  }

  /** RFC 8414 metadata (cached). */
  async metadata(): Promise<Record<string, unknown>> {
    this.metadataCache ??= await this.call("/.well-known/oauth-authorization-server");
    return this.metadataCache;
  }

  async issuer(): Promise<string> {
    return String((await this.metadata())["issuer"]);
  }

  async jwks(): Promise<{ keys: unknown[] }> {
    return (await this.call("/jwks")) as { keys: unknown[] };
  }

  /** This process's JWT-SVID for the exchange (audience = the issuer). */
  async ownSvid(): Promise<{ spiffeId: string; token: string }> {
    return this.workload.jwtSvid(await this.issuer(), this.options.spiffeId);
  }

  /** One RFC 8693 exchange. */
  async token(target: Target, scopes: Iterable<string>, request: TokenRequest = {}): Promise<IssuedToken> {
    const own = (await this.ownSvid()).token;
    const scope = [...scopes].join(" ");
    const form: Record<string, string> = {
      grant_type: TOKEN_EXCHANGE,
      scope,
      ...(target.resource !== undefined ? { resource: target.resource } : { audience: target.audience! }),
    };
    if (request.onBehalfOf === undefined) {
      form["subject_token"] = own;
      form["subject_token_type"] = JWT_TYPE;
    } else {
      form["subject_token"] = request.onBehalfOf;
      form["subject_token_type"] = ACCESS_TOKEN_TYPE;
      form["actor_token"] = own;
      form["actor_token_type"] = JWT_TYPE;
    }
    if (request.taskId !== undefined) form["task_id"] = request.taskId;
    if (request.ttl !== undefined) form["requested_ttl"] = String(Math.max(1, Math.floor(request.ttl)));
    if (request.mayAct !== undefined) form["may_act"] = request.mayAct;
    if (request.approvalId !== undefined) form["approval_id"] = request.approvalId;
    const issuedAt = Date.now() / 1000;
    const body = await this.call("/token", form);
    if (typeof body["access_token"] !== "string" || typeof body["expires_in"] !== "number")
      throw new ServerError("/token answered 200 without a usable token response");
    const expiresIn = body["expires_in"];
    return {
      accessToken: body["access_token"],
      scopes: new Set(
        String(body["scope"] ?? scope)
          .split(" ")
          .filter(Boolean),
      ),
      expiresIn,
      taskId: typeof body["task_id"] === "string" ? body["task_id"] : undefined,
      issuedAt,
      expiresAt: issuedAt + expiresIn,
    };
  }

  /** End a task of this workload: every token of it stops working now. */
  async endTask(taskId: string): Promise<void> {
    await this.call("/revoke", { task_id: taskId });
  }

  /** Revoke one token (and every token delegated from it). */
  async revoke(token: string): Promise<void> {
    await this.call("/revoke", { token, token_type_hint: "access_token" });
  }

  /** RFC 7662 introspection. */
  async introspect(token: string): Promise<Record<string, unknown>> {
    return this.call("/introspect", { token });
  }
}
