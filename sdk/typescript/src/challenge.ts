/**
 * `WWW-Authenticate: Bearer ...` challenges (RFC 6750 §3, RFC 9728 §5.1):
 * parsed by the agent side to step up, written by the server side.
 */

export interface BearerChallenge {
  error?: string;
  errorDescription?: string;
  scope: ReadonlySet<string>;
  resourceMetadata?: string;
}

const PARAM = /\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*(?:,|$)/y;

/** The Bearer challenge in a `WWW-Authenticate` value, or undefined. */
export function parseChallenge(header: string | null | undefined): BearerChallenge | undefined {
  if (!header) return undefined;
  const start = /(?:^|,)\s*bearer(?:\s+|$)/i.exec(header);
  if (!start) return undefined;
  const params = new Map<string, string>();
  PARAM.lastIndex = start.index + start[0].length;
  let m: RegExpExecArray | null;
  while (PARAM.lastIndex < header.length && (m = PARAM.exec(header)) !== null) {
    const value = m[2] !== undefined ? m[2].replace(/\\(.)/g, "$1") : (m[3] ?? "");
    const name = m[1]!.toLowerCase();
    if (!params.has(name)) params.set(name, value);
  }
  const result: BearerChallenge = {
    scope: new Set((params.get("scope") ?? "").split(" ").filter(Boolean)),
  };
  if (params.has("error")) result.error = params.get("error")!;
  if (params.has("error_description")) result.errorDescription = params.get("error_description")!;
  if (params.has("resource_metadata")) result.resourceMetadata = params.get("resource_metadata")!;
  return result;
}

/** The header value, every parameter quoted (RFC 6750 §3). */
export function formatChallenge(challenge: BearerChallenge): string {
  const parts: string[] = [];
  const add = (name: string, value: string | undefined) => {
    if (value !== undefined) parts.push(`${name}="${value.replace(/[\\"]/g, (c) => `\\${c}`)}"`);
  };
  add("error", challenge.error);
  add("error_description", challenge.errorDescription);
  add("scope", challenge.scope.size ? [...challenge.scope].sort().join(" ") : undefined);
  add("resource_metadata", challenge.resourceMetadata);
  return parts.length ? `Bearer ${parts.join(", ")}` : "Bearer";
}
