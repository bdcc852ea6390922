/**
 * README.md's five-minute walk-through, done as written: `tessera run --dev`
 * in an empty directory, the SDK packed and installed from its tarball into a
 * new project, the walk-through compiled and run, the operator's approval
 * given as the README says; its output must be what the README shows.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { test } from "node:test";

import { SDK_DIR, tesseraBin, waitFor } from "./harness.js";

function walkthrough(): { code: string; shown: string[] } {
  const readme = readFileSync(path.join(SDK_DIR, "README.md"), "utf8");
  const section = readme.split("## Five-minute walk-through")[1]!.split("\n## ")[0]!;
  const code = /```ts\n([\s\S]*?)```/.exec(section);
  const shown = /It prints[\s\S]*?```\n([\s\S]*?)```/.exec(section);
  assert.ok(code && shown, "the walk-through lost its code or its output");
  return { code: code[1]!, shown: shown[1]!.trim().split("\n") };
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

test("the README walk-through runs as written", { timeout: 600_000 }, async () => {
  const { code, shown } = walkthrough();
  const root = mkdtempSync(path.join(tmpdir(), "tessera-sdk-ts-readme."));
  const out = openSync(path.join(root, "agent.log"), "w");
  const agent = spawn(tesseraBin(), ["run", "--dev"], { cwd: root, stdio: ["ignore", out, out] });
  try {
    await waitFor(() => existsSync(path.join(root, ".tessera", "exchange.sock")), "tessera run --dev", agent);
    const npm = (cwd: string, ...args: string[]) =>
      execFileSync("npm", [...args, "--no-audit", "--no-fund", "--prefer-offline"], {
        cwd,
        encoding: "utf8",
      });
    // (cd sdk/typescript && npm pack): the suite has built dist/ already.
    const packed = JSON.parse(
      npm(SDK_DIR, "pack", "--json", "--ignore-scripts", "--pack-destination", root),
    ) as [{ filename: string }];
    const project = path.join(root, "walkthrough");
    mkdirSync(project);
    npm(project, "init", "-y");
    npm(project, "pkg", "set", "type=module");
    npm(project, "install", path.join(root, packed[0].filename), "typescript@5.9.3", "@types/node@20");
    execFileSync(
      "npx",
      [
        "tsc",
        "--init",
        "--module",
        "nodenext",
        "--target",
        "es2022",
        "--lib",
        "es2022,esnext.disposable,dom",
        "--strict",
      ],
      { cwd: project },
    );
    writeFileSync(path.join(project, "walkthrough.ts"), code);
    execFileSync("npx", ["tsc"], { cwd: project, encoding: "utf8" });
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      SPIFFE_ENDPOINT_SOCKET: `unix://${root}/.tessera/agent.sock`,
    };
    delete env["TESSERA_EXCHANGE_SOCKET"];
    const run = spawn(process.execPath, ["walkthrough.js"], {
      cwd: project,
      env,
      stdio: ["ignore", "pipe", "inherit"],
    });
    const lines: string[] = [];
    for await (const line of createInterface({ input: run.stdout })) {
      lines.push(line);
      if (line.startsWith("waiting for: tessera ")) {
        // The operator, in a third terminal, runs the printed command.
        const command = line.slice("waiting for: ".length).split(" ");
        execFileSync(tesseraBin(), command.slice(1), { cwd: project });
      }
    }
    const status = run.exitCode ?? (await new Promise((r) => run.on("exit", r)));
    assert.equal(status, 0, lines.join("\n"));
    assert.equal(lines.length, shown.length, lines.join("\n"));
    shown.forEach((want, i) => {
      const pattern = escape(want)
        .replace(escape("spiffe://example.org/user/you"), "spiffe://example\\.org/user/\\S+")
        .replace(escape("apr_..."), "apr_\\S+");
      assert.match(lines[i]!, new RegExp(`^${pattern}$`));
    });
  } finally {
    agent.kill("SIGTERM");
    await new Promise((r) => agent.once("exit", r));
    rmSync(root, { recursive: true, force: true });
  }
});
