/**
 * JWT-SVIDs from the SPIFFE Workload API (FetchJWTSVID only). The SDK needs
 * one RPC, so its three small protobuf messages are encoded by hand:
 *
 *     JWTSVIDRequest  { repeated string audience = 1; string spiffe_id = 2; }
 *     JWTSVIDResponse { repeated JWTSVID svids = 1; }
 *     JWTSVID         { string spiffe_id = 1; string svid = 2; string hint = 3; }
 *
 * A JWT-SVID is reused until shortly before its `exp`, unless the caller asks
 * for a fresh one: a client assertion for the token endpoint on the HTTPS face
 * is accepted once (by its `jti`), so each token request needs a new SVID.
 */
import { createPrivateKey, X509Certificate } from "node:crypto";

import * as grpc from "@grpc/grpc-js";

import { WorkloadApiError } from "./errors.js";

const METHOD = "/SpiffeWorkloadAPI/FetchJWTSVID";
const X509_METHOD = "/SpiffeWorkloadAPI/FetchX509SVID";
const REUSE_MARGIN_SECONDS = 30;

export interface JwtSvid {
  spiffeId: string;
  token: string;
  expiresAt: number;
  hint: string;
}

function varint(value: number): number[] {
  const out: number[] = [];
  while (value > 0x7f) {
    out.push((value & 0x7f) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
  return out;
}

function stringField(number: number, value: string): Buffer {
  const data = Buffer.from(value, "utf8");
  return Buffer.concat([Buffer.from(varint((number << 3) | 2)), Buffer.from(varint(data.length)), data]);
}

export function encodeRequest(audience: string[], spiffeId?: string): Buffer {
  const parts = audience.map((a) => stringField(1, a));
  if (spiffeId) parts.push(stringField(2, spiffeId));
  return Buffer.concat(parts);
}

function readVarint(data: Buffer, pos: number): [number, number] {
  let value = 0;
  let factor = 1;
  for (;;) {
    if (pos >= data.length || factor > 2 ** 49) throw new Error("truncated varint");
    const byte = data[pos++]!;
    value += (byte & 0x7f) * factor;
    factor *= 128;
    if (!(byte & 0x80)) return [value, pos];
  }
}

/** (field number, bytes) of the length-delimited fields; other wire types skipped. */
function fields(data: Buffer): Array<[number, Buffer]> {
  const out: Array<[number, Buffer]> = [];
  let pos = 0;
  while (pos < data.length) {
    const [key, next] = readVarint(data, pos);
    pos = next;
    const number = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) [, pos] = readVarint(data, pos);
    else if (wire === 2) {
      const [length, start] = readVarint(data, pos);
      if (start + length > data.length) throw new Error("truncated field");
      out.push([number, data.subarray(start, start + length)]);
      pos = start + length;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
  return out;
}

function expiry(token: string): number {
  try {
    const payload = JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString()) as {
      exp?: unknown;
    };
    if (typeof payload.exp === "number") return payload.exp;
  } catch {
    // fall through
  }
  throw new WorkloadApiError("the Workload API returned a JWT-SVID without a readable exp");
}

export function decodeResponse(data: Buffer): JwtSvid[] {
  return fields(data)
    .filter(([number]) => number === 1)
    .map(([, svid]) => {
      const parts = new Map(fields(svid).map(([n, v]) => [n, v.toString("utf8")]));
      const token = parts.get(2) ?? "";
      return { spiffeId: parts.get(1) ?? "", token, expiresAt: expiry(token), hint: parts.get(3) ?? "" };
    });
}

/** An X509-SVID: PEM chain (leaf first) and PKCS#8 PEM key, kept in memory. */
export interface X509Svid {
  spiffeId: string;
  certChain: string;
  privateKey: string;
  bundle: string;
  issuedAt: number;
  expiresAt: number;
}

/** Concatenated DER certificates, one by one (each a definite-length SEQUENCE). */
export function splitDer(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] !== 0x30 || pos + 2 > data.length) throw new Error("not a DER SEQUENCE");
    const first = data[pos + 1]!;
    let length = first;
    let header = 2;
    if (first >= 0x80) {
      const n = first & 0x7f;
      if (n === 0 || n > 4 || pos + 2 + n > data.length) throw new Error("unsupported DER length");
      length = data.subarray(pos + 2, pos + 2 + n).reduce((acc, b) => acc * 256 + b, 0);
      header = 2 + n;
    }
    const end = pos + header + length;
    if (end > data.length) throw new Error("truncated DER certificate");
    out.push(data.subarray(pos, end));
    pos = end;
  }
  return out;
}

export function decodeX509Response(data: Buffer): X509Svid[] {
  return fields(data)
    .filter(([number]) => number === 1)
    .map(([, svid]) => {
      const parts = new Map(fields(svid));
      const chain = splitDer(parts.get(2) ?? Buffer.alloc(0)).map((der) => new X509Certificate(der));
      const leaf = chain[0];
      if (!leaf) throw new Error("an X509-SVID without certificates");
      const key = createPrivateKey({ key: parts.get(3) ?? Buffer.alloc(0), format: "der", type: "pkcs8" });
      return {
        spiffeId: (parts.get(1) ?? Buffer.alloc(0)).toString("utf8"),
        certChain: chain.map((c) => c.toString()).join(""),
        privateKey: String(key.export({ format: "pem", type: "pkcs8" })),
        bundle: splitDer(parts.get(4) ?? Buffer.alloc(0))
          .map((der) => new X509Certificate(der).toString())
          .join(""),
        issuedAt: Date.parse(leaf.validFrom) / 1000,
        expiresAt: Date.parse(leaf.validTo) / 1000,
      };
    });
}

/** A client of the Workload API's FetchJWTSVID, with a per-audience cache. */
export class WorkloadApi {
  private client: grpc.Client | undefined;
  private readonly cache = new Map<string, JwtSvid>();

  constructor(private readonly socket: string) {}

  /** A JWT-SVID for `audience`; `fresh`: never the cached one (a single-use client assertion). */
  async jwtSvid(
    audience: string,
    spiffeId?: string,
    { fresh = false }: { fresh?: boolean } = {},
  ): Promise<JwtSvid> {
    const key = `${audience}\n${spiffeId ?? ""}`;
    const cached = this.cache.get(key);
    if (!fresh && cached && cached.expiresAt - Date.now() / 1000 > REUSE_MARGIN_SECONDS) return cached;
    this.client ??= new grpc.Client(`unix://${this.socket}`, grpc.credentials.createInsecure());
    const metadata = new grpc.Metadata();
    metadata.set("workload.spiffe.io", "true");
    const raw = await new Promise<Buffer>((resolve, reject) => {
      this.client!.makeUnaryRequest(
        METHOD,
        (b: Buffer) => b,
        (b: Buffer) => b,
        encodeRequest([audience], spiffeId),
        metadata,
        { deadline: Date.now() + 30_000 },
        (error, value) => {
          if (error || value === undefined)
            reject(
              new WorkloadApiError(
                `FetchJWTSVID on ${this.socket}: ${error ? `${grpc.status[error.code]}: ${error.details}` : "no answer"}`,
              ),
            );
          else resolve(value);
        },
      );
    });
    let svids: JwtSvid[];
    try {
      svids = decodeResponse(raw);
    } catch (e) {
      if (e instanceof WorkloadApiError) throw e;
      throw new WorkloadApiError(`FetchJWTSVID on ${this.socket}: malformed answer: ${String(e)}`);
    }
    const svid = svids[0];
    if (!svid) throw new WorkloadApiError(`FetchJWTSVID on ${this.socket}: no JWT-SVID for this process`);
    if (!fresh) this.cache.set(key, svid);
    return svid;
  }

  /** This process's X509-SVID (its first identity, or `spiffeId`): the first answer of FetchX509SVID. */
  async x509Svid(spiffeId?: string): Promise<X509Svid> {
    this.client ??= new grpc.Client(`unix://${this.socket}`, grpc.credentials.createInsecure());
    const metadata = new grpc.Metadata();
    metadata.set("workload.spiffe.io", "true");
    const raw = await new Promise<Buffer>((resolve, reject) => {
      const call = this.client!.makeServerStreamRequest(
        X509_METHOD,
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
        metadata,
        { deadline: Date.now() + 30_000 },
      );
      let done = false;
      call.on("data", (message: Buffer) => {
        if (done) return;
        done = true;
        resolve(message);
        call.cancel();
      });
      call.on("error", (error: grpc.ServiceError) => {
        if (!done) {
          done = true;
          reject(
            new WorkloadApiError(
              `FetchX509SVID on ${this.socket}: ${grpc.status[error.code]}: ${error.details}`,
            ),
          );
        }
      });
      call.on("end", () => {
        if (!done) {
          done = true;
          reject(new WorkloadApiError(`FetchX509SVID on ${this.socket}: the stream ended without an answer`));
        }
      });
    });
    let svids: X509Svid[];
    try {
      svids = decodeX509Response(raw);
    } catch (e) {
      throw new WorkloadApiError(`FetchX509SVID on ${this.socket}: malformed answer: ${String(e)}`);
    }
    const svid = svids.find((s) => spiffeId === undefined || s.spiffeId === spiffeId);
    if (!svid) throw new WorkloadApiError(`FetchX509SVID on ${this.socket}: no X509-SVID for this process`);
    return svid;
  }

  close(): void {
    this.client?.close();
    this.client = undefined;
  }
}
