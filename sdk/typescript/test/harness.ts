/**
 * A real Tessera agent for the SDK tests ($TESSERA_BIN or target/debug/tessera;
 * without it the suite fails, it never skips). The sub-agent of the delegation
 * test runs from a copy of the node binary, so the agent tells it apart by
 * executable path (unix:path).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import {
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const SDK_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const ROOT = path.resolve(SDK_DIR, "..", "..");
export const RESOURCE = "https://notes.example/mcp";
export const AGENT_ID = "spiffe://example.org/sdk/agent";
export const SUB_AGENT_ID = "spiffe://example.org/sdk/sub-agent";
export const OTHER_ID = "spiffe://example.org/sdk/other";

export function tesseraBin(): string {
  const bin = process.env["TESSERA_BIN"] ?? path.join(ROOT, "target", "debug", "tessera");
  if (!existsSync(bin))
    throw new Error(`${bin} is missing: cargo build --locked -p tessera-agent (or set TESSERA_BIN)`);
  return bin;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() =>
        typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port")),
      );
    });
  });
}

export async function waitFor(predicate: () => boolean, what: string, process?: ChildProcess, seconds = 30) {
  const deadline = Date.now() + seconds * 1000;
  while (!predicate()) {
    if (process && process.exitCode !== null)
      throw new Error(`${what}: the process exited with ${process.exitCode}`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface Agent {
  dir: string;
  bin: string;
  workloadSocket: string;
  exchangeSocket: string;
  adminSocket: string;
  subAgentNode: string;
  /** The HTTPS face's issuer URL. */
  httpsIssuer: string;
  /** The trust domain's CA bundle (PEM), which issued the HTTPS face's certificate. */
  ca: string;
  /** An MCP server URL on loopback that policy lets AGENT_ID get notes:read and
   * notes:write bearer tokens for, over HTTPS too (remote.test.ts). */
  remoteResource: string;
  remotePort: number;
  /** A copy of the tessera binary: a separate workload (OTHER_ID) by its path. */
  otherTessera: string;
  log: string;
  process: ChildProcess;
  tessera(...args: string[]): { status: number | null; stdout: string; stderr: string };
  approve(id: string): void;
  deny(id: string): void;
  stop(): Promise<void>;
}

export async function startAgent(): Promise<Agent> {
  const bin = tesseraBin();
  const dir = mkdtempSync(path.join(tmpdir(), "tessera-sdk-ts."));
  const subAgentNode = path.join(dir, "sub-agent-node");
  copyFileSync(process.execPath, subAgentNode);
  const otherTessera = path.join(dir, "other-tessera");
  copyFileSync(bin, otherTessera);
  mkdirSync(path.join(dir, "admin"), { mode: 0o700 });
  const uid = process.getuid!();
  const httpsPort = await freePort();
  const remotePort = await freePort();
  const remoteResource = `http://127.0.0.1:${remotePort}/mcp`;
  // The shared test policies, and one for a server whose port is only known
  // now: over HTTPS nothing is attested, the JWT-SVID names the principal,
  // and without a client certificate tokens are bearer tokens.
  const policies = path.join(dir, "policies");
  cpSync(path.join(SDK_DIR, "..", "testdata", "policies"), policies, { recursive: true });
  writeFileSync(
    path.join(policies, "remote.cedar"),
    `@id("agent-remote-read-write")
@max_ttl("300s")
@bearer
permit (
  principal == Tessera::Workload::"${AGENT_ID}",
  action in [Tessera::Action::"notes:read", Tessera::Action::"notes:write"],
  resource == Tessera::Audience::"${remoteResource}"
);
`,
  );
  const config = path.join(dir, "agent.toml");
  writeFileSync(
    config,
    `trust_domain = "example.org"
socket_path  = "${dir}/sock/agent.sock"
data_dir     = "${dir}/data"

[admin]
socket_path = "${dir}/admin/admin.sock"

[https]
listen = "127.0.0.1:${httpsPort}"
issuer = "https://localhost:${httpsPort}"

[[entries]]
spiffe_id = "${OTHER_ID}"
selectors = ["unix:uid:${uid}", "unix:path:${otherTessera}"]

[[entries]]
spiffe_id = "${SUB_AGENT_ID}"
selectors = ["unix:uid:${uid}", "unix:path:${subAgentNode}"]

[[entries]]
spiffe_id = "${AGENT_ID}"
selectors = ["unix:uid:${uid}"]

[exchange]
policy_dir = "${policies}"
max_ttl = "5m"
approval_poll_interval = "1s"
`,
  );
  const log = path.join(dir, "agent.log");
  const out = openSync(log, "w");
  const child = spawn(bin, ["run", "--config", config], { stdio: ["ignore", out, out] });
  const agent: Agent = {
    dir,
    bin,
    workloadSocket: path.join(dir, "sock", "agent.sock"),
    exchangeSocket: path.join(dir, "sock", "exchange.sock"),
    adminSocket: path.join(dir, "admin", "admin.sock"),
    subAgentNode,
    httpsIssuer: `https://localhost:${httpsPort}`,
    ca: path.join(dir, "certs", "bundle.0.pem"),
    remoteResource,
    remotePort,
    otherTessera,
    log,
    process: child,
    tessera: (...args) => {
      const run = spawnSync(bin, args, { encoding: "utf8", timeout: 30_000 });
      return { status: run.status, stdout: run.stdout, stderr: run.stderr };
    },
    approve(id) {
      const run = this.tessera("approvals", "approve", id, "--admin-socket", this.adminSocket);
      if (run.status !== 0) throw new Error(run.stderr);
    },
    deny(id) {
      const run = this.tessera("approvals", "deny", id, "--admin-socket", this.adminSocket);
      if (run.status !== 0) throw new Error(run.stderr);
    },
    async stop() {
      if (child.exitCode === null) {
        child.kill("SIGTERM");
        await new Promise((r) => child.once("exit", r));
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    await waitFor(
      () => existsSync(agent.exchangeSocket) && existsSync(agent.adminSocket),
      "the agent's sockets",
      child,
    );
    const fetched = agent.tessera(
      "api",
      "fetch",
      "x509",
      "--write",
      path.join(dir, "certs"),
      "--socket",
      agent.workloadSocket,
    );
    if (fetched.status !== 0) throw new Error(`tessera api fetch x509: ${fetched.stderr}`);
  } catch (e) {
    child.kill("SIGKILL");
    console.error(readFileSync(log, "utf8"));
    throw e;
  }
  process.env["SPIFFE_ENDPOINT_SOCKET"] = `unix://${agent.workloadSocket}`;
  return agent;
}
