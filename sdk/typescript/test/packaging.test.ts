/** The SDK is a standard npm package with types, versioned with the project. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";

import { VERSION } from "tessera-sdk";

import { ROOT, SDK_DIR } from "./harness.js";

function projectVersion(): string {
  const cargo = readFileSync(path.join(ROOT, "Cargo.toml"), "utf8");
  const match = /\[workspace\.package\][^[]*?\nversion\s*=\s*"([^"]+)"/.exec(cargo);
  assert.ok(match, "no [workspace.package] version in Cargo.toml");
  return match[1]!;
}

test("the version is the project's", () => {
  const pkg = JSON.parse(readFileSync(path.join(SDK_DIR, "package.json"), "utf8")) as { version: string };
  assert.equal(pkg.version, projectVersion());
  assert.equal(VERSION, projectVersion());
});

test("npm pack ships the compiled code with its types, and nothing else", () => {
  const out = mkdtempSync(path.join(tmpdir(), "tessera-sdk-pack."));
  const json = execFileSync("npm", ["pack", "--json", "--ignore-scripts", "--pack-destination", out], {
    cwd: SDK_DIR,
    encoding: "utf8",
  });
  const [packed] = JSON.parse(json) as Array<{
    name: string;
    version: string;
    files: Array<{ path: string }>;
  }>;
  assert.equal(packed!.name, "tessera-sdk");
  assert.equal(packed!.version, projectVersion());
  const files = packed!.files.map((f) => f.path);
  for (const entry of ["index", "server", "mcp", "task"]) {
    assert.ok(files.includes(`dist/${entry}.js`), `dist/${entry}.js`);
    assert.ok(files.includes(`dist/${entry}.d.ts`), `dist/${entry}.d.ts`);
  }
  assert.ok(
    !files.some((f) => f.startsWith("test/") || f.startsWith("src/") || f.startsWith("build/")),
    String(files),
  );
});
