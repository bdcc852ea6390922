/**
 * Typed errors: one class per OAuth error code the exchange answers with
 * (RFC 6749 §5.2, RFC 8693, RFC 7009, RFC 8628), so an agent catches exactly
 * what it can handle:
 *
 *     try { await using t = await task(...) } catch (e) { if (e instanceof AccessDenied) ... }
 */

/** Base class of every error this package throws. */
export class TesseraError extends Error {
  override name = "TesseraError";
}

/** The SDK cannot find or use the agent's sockets (e.g. SPIFFE_ENDPOINT_SOCKET unset). */
export class ConfigurationError extends TesseraError {
  override name = "ConfigurationError";
}

/** The Workload API refused or failed to give this process a JWT-SVID. */
export class WorkloadApiError extends TesseraError {
  override name = "WorkloadApiError";
}

/** The task has ended: its tokens are revoked and no new ones are issued. */
export class TaskEnded extends TesseraError {
  override name = "TaskEnded";
}

/** No operator decided within the task's `approvalTimeout`. */
export class ApprovalTimeout extends TesseraError {
  override name = "ApprovalTimeout";
  constructor(readonly approvalId: string) {
    super(`approval ${approvalId} was not decided in time`);
  }
}

/** A resource server asked for scopes the task may not hold (`mayHold`). */
export class StepUpRefused extends TesseraError {
  override name = "StepUpRefused";
  constructor(
    readonly needed: ReadonlySet<string>,
    readonly mayHold: ReadonlySet<string>,
  ) {
    super(
      `the server asks for scopes this task may not hold: ${[...needed].filter((s) => !mayHold.has(s)).join(" ")}`,
    );
  }
}

/** An OAuth error answer from the exchange: `error`, `description`, HTTP `status`, other members in `extra`. */
export class OAuthError extends TesseraError {
  override name = "OAuthError";
  static readonly code: string = "";
  readonly error: string;
  constructor(
    readonly description: string,
    readonly status = 400,
    error?: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    const code = error ?? (new.target as typeof OAuthError).code;
    super(description ? `${code}: ${description}` : code);
    this.error = code;
  }
}

/** Malformed request, an unacceptable subject/actor token, an ended task, an unknown approval. */
export class InvalidRequest extends OAuthError {
  static override readonly code = "invalid_request";
  override name = "InvalidRequest";
}
/** No audience or resource, more than one, or (delegating) another audience than the parent's. */
export class InvalidTarget extends OAuthError {
  static override readonly code = "invalid_target";
  override name = "InvalidTarget";
}
/** A scope is malformed, refused by policy, or wider than the parent token's. */
export class InvalidScope extends OAuthError {
  static override readonly code = "invalid_scope";
  override name = "InvalidScope";
}
/** Policy permits none of the scopes, delegation is too deep, or an operator denied the approval. */
export class AccessDenied extends OAuthError {
  static override readonly code = "access_denied";
  override name = "AccessDenied";
}
/** An operator must approve first; `approvalId` and `interval` say what to poll and how often. */
export class AuthorizationPending extends OAuthError {
  static override readonly code = "authorization_pending";
  override name = "AuthorizationPending";
  get approvalId(): string {
    return String(this.extra["approval_id"] ?? "");
  }
  get interval(): number {
    const value = this.extra["interval"];
    return typeof value === "number" ? value : 2;
  }
}
/** The approval was not decided, or not redeemed, in time. */
export class ExpiredToken extends OAuthError {
  static override readonly code = "expired_token";
  override name = "ExpiredToken";
}
export class UnsupportedGrantType extends OAuthError {
  static override readonly code = "unsupported_grant_type";
  override name = "UnsupportedGrantType";
}
export class UnsupportedTokenType extends OAuthError {
  static override readonly code = "unsupported_token_type";
  override name = "UnsupportedTokenType";
}
/** The caller may not revoke this token or task. */
export class UnauthorizedClient extends OAuthError {
  static override readonly code = "unauthorized_client";
  override name = "UnauthorizedClient";
}
/** The calling process could not be attested, or holds no identity. */
export class InvalidClient extends OAuthError {
  static override readonly code = "invalid_client";
  override name = "InvalidClient";
}
/** The agent cannot decide now (e.g. its audit log cannot be written); retry later. */
export class TemporarilyUnavailable extends OAuthError {
  static override readonly code = "temporarily_unavailable";
  override name = "TemporarilyUnavailable";
}
/** The calling process exceeded its request budget. */
export class SlowDown extends OAuthError {
  static override readonly code = "slow_down";
  override name = "SlowDown";
}
export class ServerError extends OAuthError {
  static override readonly code = "server_error";
  override name = "ServerError";
}

const BY_CODE = new Map<string, typeof OAuthError>(
  [
    InvalidRequest,
    InvalidTarget,
    InvalidScope,
    AccessDenied,
    AuthorizationPending,
    ExpiredToken,
    UnsupportedGrantType,
    UnsupportedTokenType,
    UnauthorizedClient,
    InvalidClient,
    TemporarilyUnavailable,
    SlowDown,
    ServerError,
  ].map((cls) => [cls.code, cls]),
);

/** The typed error for an error answer (`body` is its parsed JSON, if any). */
export function oauthError(status: number, body: unknown): OAuthError {
  if (typeof body === "object" && body !== null && typeof (body as { error?: unknown }).error === "string") {
    const { error, error_description, ...extra } = body as Record<string, unknown>;
    const cls = BY_CODE.get(error as string) ?? OAuthError;
    return new cls(String(error_description ?? ""), status, error as string, extra);
  }
  return new ServerError(`HTTP ${status} without an OAuth error body`, status);
}
