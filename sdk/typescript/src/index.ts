/**
 * Tessera per-task tokens for TypeScript agents.
 *
 *     import { task } from "tessera-sdk";
 *     await using t = await task("summarise-42", { resource: "https://notes.example/mcp", scopes: ["notes:read"] });
 *
 * Off the node: `JwtSvidAssertion`, and "tessera-sdk/mcp"'s `JwtSvidClientProvider`
 * for the MCP SDK's machine-to-machine OAuth.
 *
 * Server side: "tessera-sdk/server" (Verifier, `Verifier.remote` on another host,
 * toolScopes) and "tessera-sdk/mcp" (the official MCP SDK's OAuthTokenVerifier).
 */
export * from "./errors.js";
export { JwtSvidAssertion, type JwtSvidAssertionOptions } from "./assertion.js";
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
