/**
 * Tessera per-task tokens for TypeScript agents.
 *
 *     import { task } from "tessera-sdk";
 *     await using t = await task("summarise-42", { resource: "https://notes.example/mcp", scopes: ["notes:read"] });
 *
 * Server side: "tessera-sdk/server" (Verifier, toolScopes) and "tessera-sdk/mcp"
 * (the official MCP SDK's OAuthTokenVerifier).
 */
export * from "./errors.js";
export { formatChallenge, parseChallenge, type BearerChallenge } from "./challenge.js";
export {
  Exchange,
  type ExchangeOptions,
  type IssuedToken,
  type Target,
  type TokenRequest,
} from "./exchange.js";
export { findSockets, type SocketOptions, type Sockets } from "./sockets.js";
export {
  actFor,
  task,
  Task,
  type ActForOptions,
  type Approval,
  type ApprovalCallback,
  type FetchLike,
  type TaskOptions,
} from "./task.js";

export const VERSION = "0.1.0";
