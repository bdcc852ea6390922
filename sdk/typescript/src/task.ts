/**
 * The task scope: per-task tokens for the life of an `await using` block.
 *
 *     await using t = await task("summarise-42", {
 *       resource: "https://notes.example/mcp", scopes: ["notes:read"], mayHold: ["notes:read", "notes:write"],
 *     });
 *     const transport = new StreamableHTTPClientTransport(url, { fetch: t.fetch });
 *
 * `task()` exchanges this process's JWT-SVID on creation (waiting for an
 * operator if policy wants approval); `t.token()` renews before expiry;
 * `t.fetch` sends the token, re-exchanges on 401 and steps up on
 * `403 insufficient_scope` within `mayHold`; `t.delegate()` hands a narrower
 * token to a sub-agent; leaving the block (errors included) ends the task.
 */
import { parseChallenge, type BearerChallenge } from "./challenge.js";
import {
  ApprovalTimeout,
  AuthorizationPending,
  SlowDown,
  StepUpRefused,
  TaskEnded,
  TesseraError,
} from "./errors.js";
import { Exchange, targetValue, type ExchangeOptions, type IssuedToken, type Target } from "./exchange.js";

/** A pending approval: an operator decides it with `tessera approvals approve ID`. */
export interface Approval {
  id: string;
  taskId: string | undefined;
  scopes: ReadonlySet<string>;
  target: string;
  interval: number;
}

export type ApprovalCallback = (approval: Approval) => void | Promise<void>;

export type FetchLike = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

interface CommonOptions extends ExchangeOptions {
  /** Scopes asked for on creation. */
  scopes: string[];
  /** Requested lifetime in seconds (the agent may grant less). */
  ttl?: number;
  /** A SPIFFE ID that may act on the task's tokens. */
  mayAct?: string;
  /** Called when policy wants an operator; the task then polls until the decision. */
  onApproval?: ApprovalCallback;
  /** Seconds to wait for the decision (default: until the agent's own timeout). */
  approvalTimeout?: number;
  /** Renew when less than this many seconds are left (default: a quarter of the life, at most 30). */
  renewBefore?: number;
  /** An exchange client to share (default: one of the task's own, closed with it). */
  exchange?: Exchange;
  /** The `fetch` that `t.fetch` wraps (default: the global one). */
  fetch?: FetchLike;
}

export type TaskOptions = CommonOptions &
  Target & {
    /** Scopes a resource server may step the task up to (default: `scopes`). */
    mayHold?: string[];
  };

export type ActForOptions = CommonOptions & Target;

const sleep = (seconds: number) => new Promise((r) => setTimeout(r, seconds * 1000));

export class Task implements AsyncDisposable {
  taskId: string | undefined;
  readonly target: Target;
  readonly mayHold: ReadonlySet<string>;
  readonly exchange: Exchange;
  /** The last Bearer challenge a server answered `t.fetch` with. */
  lastChallenge: BearerChallenge | undefined;
  private currentScopes: Set<string>;
  private currentToken: IssuedToken | undefined;
  private issued: IssuedToken[] = [];
  private ended = false;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly ownsExchange: boolean;

  constructor(
    private readonly options: CommonOptions &
      Target & { mayHold?: string[]; taskId?: string; onBehalfOf?: string },
  ) {
    if (!options.scopes.length) throw new TypeError("a task needs at least one scope");
    if ((options.resource === undefined) === (options.audience === undefined))
      throw new TypeError("give exactly one of resource (a URI, e.g. an MCP server's) or audience");
    this.taskId = options.taskId;
    this.target =
      options.resource !== undefined ? { resource: options.resource } : { audience: options.audience! };
    this.currentScopes = new Set(options.scopes);
    this.mayHold = new Set([...(options.mayHold ?? []), ...options.scopes]);
    this.ownsExchange = options.exchange === undefined;
    this.exchange = options.exchange ?? new Exchange(options);
  }

  /** The scopes the task holds now (grows by step-up). */
  get scopes(): ReadonlySet<string> {
    return this.currentScopes;
  }

  get hasEnded(): boolean {
    return this.ended;
  }

  /** The latest token issued, or undefined before the first exchange. */
  get current(): IssuedToken | undefined {
    return this.currentToken;
  }

  /** Runs `f` after every earlier call: one exchange at a time. */
  private serial<T>(f: () => Promise<T>): Promise<T> {
    const run = this.queue.then(f, f);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private fresh(issued: IssuedToken | undefined, scopes: ReadonlySet<string>): issued is IssuedToken {
    if (!issued || ![...scopes].every((s) => issued.scopes.has(s))) return false;
    const margin = this.options.renewBefore ?? Math.min(30, issued.expiresIn / 4);
    return issued.expiresAt - Date.now() / 1000 > margin;
  }

  private checkOpen(): void {
    if (this.ended) throw new TaskEnded(`task ${this.taskId} has ended`);
  }

  /** A token for the task's scopes, renewed shortly before it expires. */
  token(): Promise<string> {
    return this.serial(async () => {
      this.checkOpen();
      if (!this.fresh(this.currentToken, this.currentScopes))
        this.currentToken = await this.obtain(this.currentScopes);
      return this.currentToken.accessToken;
    });
  }

  /** A new token now (e.g. after a 401), whatever the current one's life. */
  refresh(): Promise<string> {
    return this.serial(async () => {
      this.checkOpen();
      this.currentToken = await this.obtain(this.currentScopes);
      return this.currentToken.accessToken;
    });
  }

  mayStepUp(needed: Iterable<string>): boolean {
    return [...needed].every((s) => this.mayHold.has(s));
  }

  /** A token with the task's scopes plus `needed` (within `mayHold`, else StepUpRefused). */
  stepUp(needed: Iterable<string>): Promise<string> {
    const wanted = new Set([...this.currentScopes, ...needed]);
    if (!this.mayStepUp(wanted)) return Promise.reject(new StepUpRefused(new Set(needed), this.mayHold));
    return this.serial(async () => {
      this.checkOpen();
      const union = new Set([...this.currentScopes, ...wanted]);
      if (!this.fresh(this.currentToken, union)) {
        this.currentToken = await this.obtain(union);
        this.currentScopes = union;
      }
      return this.currentToken.accessToken;
    });
  }

  /**
   * A token the workload `to` (a SPIFFE ID) may act on, with `scopes` (default:
   * the task's). The sub-agent uses it with `actFor(token, ...)`; the exchange
   * lets only `to` use it, and only for narrower or equal tokens.
   */
  delegate(to: string, scopes?: string[], ttl?: number): Promise<string> {
    const wanted = new Set(scopes ?? this.currentScopes);
    if (!this.mayStepUp(wanted)) return Promise.reject(new StepUpRefused(wanted, this.mayHold));
    return this.serial(async () => {
      this.checkOpen();
      return (await this.obtain(wanted, { mayAct: to, ...(ttl !== undefined ? { ttl } : {}) })).accessToken;
    });
  }

  /**
   * End the task now (also done when an `await using` block is left). A direct
   * task is ended at the exchange; a delegated one revokes its own tokens.
   */
  end(): Promise<void> {
    return this.serial(async () => {
      if (this.ended) return;
      this.ended = true;
      if (this.options.onBehalfOf === undefined) await this.exchange.endTask(this.taskId!);
      else
        for (const issued of this.issued)
          if (issued.expiresAt > Date.now() / 1000) await this.exchange.revoke(issued.accessToken);
    });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.end();
    } finally {
      if (this.ownsExchange) this.exchange.close();
    }
  }

  /**
   * A `fetch` for MCP clients: the task's token on every request; on 401 a
   * new exchange and one retry (not after the task ended); on 403
   * `insufficient_scope` with a `scope` inside `mayHold`, a step-up and one
   * retry. Anything else is returned as the server sent it.
   */
  readonly fetch: FetchLike = async (input, init) => {
    const base = this.options.fetch ?? globalThis.fetch;
    const send = (token: string | undefined) => {
      const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
      if (token !== undefined) headers.set("authorization", `Bearer ${token}`);
      return base(input instanceof Request ? input.clone() : input, { ...init, headers });
    };
    let token: string | undefined;
    try {
      token = await this.token();
    } catch (e) {
      if (!(e instanceof TesseraError) || !this.ended) throw e;
      // An ended task: its last token, revoked, so the server answers 401.
      return send(this.currentToken?.accessToken);
    }
    const response = await send(token);
    const challenge = parseChallenge(response.headers.get("www-authenticate"));
    if (challenge) this.lastChallenge = challenge;
    if (response.status === 401 && !this.ended) {
      await response.body?.cancel();
      return send(await this.refresh());
    }
    if (
      response.status === 403 &&
      challenge?.error === "insufficient_scope" &&
      challenge.scope.size &&
      !this.ended &&
      this.mayStepUp(challenge.scope)
    ) {
      await response.body?.cancel();
      return send(await this.stepUp(challenge.scope));
    }
    return response;
  };

  private async obtain(
    scopes: ReadonlySet<string>,
    extra: { mayAct?: string; ttl?: number } = {},
  ): Promise<IssuedToken> {
    const ordered = [...scopes].sort();
    const once = (approvalId?: string) =>
      this.exchange.token(this.target, ordered, {
        ...(this.options.onBehalfOf === undefined && this.taskId !== undefined
          ? { taskId: this.taskId }
          : {}),
        ...(this.options.onBehalfOf !== undefined ? { onBehalfOf: this.options.onBehalfOf } : {}),
        ...((extra.ttl ?? this.options.ttl) !== undefined ? { ttl: (extra.ttl ?? this.options.ttl)! } : {}),
        ...((extra.mayAct ?? this.options.mayAct) !== undefined
          ? { mayAct: (extra.mayAct ?? this.options.mayAct)! }
          : {}),
        ...(approvalId !== undefined ? { approvalId } : {}),
      });
    let issued: IssuedToken;
    try {
      issued = await once();
    } catch (e) {
      if (!(e instanceof AuthorizationPending)) throw e;
      issued = await this.waitForApproval(e, scopes, once);
    }
    this.taskId ??= issued.taskId; // a delegated token keeps its delegator's task
    const now = Date.now() / 1000;
    this.issued = [...this.issued.filter((i) => i.expiresAt > now), issued];
    return issued;
  }

  private async waitForApproval(
    pending: AuthorizationPending,
    scopes: ReadonlySet<string>,
    once: (approvalId?: string) => Promise<IssuedToken>,
  ): Promise<IssuedToken> {
    const approval: Approval = {
      id: pending.approvalId,
      taskId: this.taskId,
      scopes,
      target: targetValue(this.target),
      interval: pending.interval,
    };
    if (this.options.onApproval) await this.options.onApproval(approval);
    else
      console.warn(
        `tessera: task ${this.taskId} waits for an operator: tessera approvals approve ${approval.id}`,
      );
    const started = Date.now() / 1000;
    let interval = approval.interval;
    for (;;) {
      const timeout = this.options.approvalTimeout;
      if (timeout !== undefined && Date.now() / 1000 - started + interval > timeout)
        throw new ApprovalTimeout(approval.id);
      await sleep(interval);
      try {
        return await once(approval.id);
      } catch (e) {
        if (e instanceof AuthorizationPending) interval = e.interval;
        else if (e instanceof SlowDown)
          interval += 5; // RFC 8628 §3.5
        else throw e;
      }
    }
  }

  /** First exchange; closes what it opened if that fails. */
  async start(): Promise<this> {
    try {
      await this.token();
    } catch (e) {
      if (this.ownsExchange) this.exchange.close();
      throw e;
    }
    return this;
  }
}

/**
 * A task scope: `await using t = await task("t1", { resource: URL, scopes: [...] })`.
 * Resolves once the first token is issued (after an approval if policy wants one).
 */
export function task(taskId: string, options: TaskOptions): Promise<Task> {
  return new Task({ ...options, taskId }).start();
}

/**
 * A sub-agent acting for the holder of `token` (from `Task.delegate`, naming
 * this workload): `await using t = await actFor(token, { resource, scopes })`.
 * Its tokens keep the delegator's task and principal, name this workload as
 * actor, are never wider than `token`, and are revoked when it is left.
 */
export function actFor(token: string, options: ActForOptions): Promise<Task> {
  return new Task({ ...options, onBehalfOf: token }).start();
}
