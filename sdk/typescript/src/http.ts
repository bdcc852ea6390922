/** HTTP/1.1 over a Unix socket (the exchange socket) and over HTTPS (the agent's HTTPS face), with node:http(s). */
import http from "node:http";
import https from "node:https";

export interface UnixResponse {
  status: number;
  body: unknown;
}

export function unixRequest(
  socketPath: string,
  method: "GET" | "POST",
  path: string,
  form?: Record<string, string>,
): Promise<UnixResponse> {
  const data = form ? new URLSearchParams(form).toString() : undefined;
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        socketPath,
        method,
        path,
        headers: {
          host: "localhost",
          accept: "application/json",
          ...(data !== undefined
            ? {
                "content-type": "application/x-www-form-urlencoded",
                "content-length": Buffer.byteLength(data),
              }
            : {}),
        },
        timeout: 30_000,
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (c: Buffer) => chunks.push(c));
        response.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let body: unknown = undefined;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            body = undefined;
          }
          resolve({ status: response.statusCode ?? 0, body });
        });
        response.on("error", reject);
      },
    );
    request.on("timeout", () => request.destroy(new Error(`no answer from ${socketPath} in 30 s`)));
    request.on("error", reject);
    if (data !== undefined) request.write(data);
    request.end();
  });
}

/**
 * A GET (or, with `form`, a form POST) to an https:// URL; `ca` (PEM) replaces
 * the system's trust store when given. The JSON body, if any, is parsed.
 */
export function httpsRequest(
  url: string,
  form?: Record<string, string>,
  headers: Record<string, string> = {},
  ca?: string | Buffer,
  clientCertificate?: { cert: string; key: string },
): Promise<UnixResponse> {
  const data = form ? new URLSearchParams(form).toString() : undefined;
  return new Promise((resolve, reject) => {
    const request = https.request(
      url,
      {
        method: form ? "POST" : "GET",
        headers: {
          accept: "application/json",
          ...headers,
          ...(data !== undefined
            ? {
                "content-type": "application/x-www-form-urlencoded",
                "content-length": Buffer.byteLength(data),
              }
            : {}),
        },
        timeout: 10_000,
        ...(ca !== undefined ? { ca } : {}),
        ...(clientCertificate ?? {}),
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (c: Buffer) => chunks.push(c));
        response.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let body: unknown = undefined;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            body = undefined;
          }
          resolve({ status: response.statusCode ?? 0, body });
        });
        response.on("error", reject);
      },
    );
    request.on("timeout", () => request.destroy(new Error(`no answer from ${url} in 10 s`)));
    request.on("error", reject);
    if (data !== undefined) request.write(data);
    request.end();
  });
}
