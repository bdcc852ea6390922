/**
 * Where the node agent is. The Workload API socket is found the way every
 * SPIFFE client finds it: an explicit option, else `SPIFFE_ENDPOINT_SOCKET`
 * (`unix:///abs/path`). The exchange socket is an explicit option, else
 * `TESSERA_EXCHANGE_SOCKET`, else `exchange.sock` beside the Workload API socket.
 */
import path from "node:path";

import { ConfigurationError } from "./errors.js";

export const WORKLOAD_ENV = "SPIFFE_ENDPOINT_SOCKET";
export const EXCHANGE_ENV = "TESSERA_EXCHANGE_SOCKET";

function unixPath(value: string, source: string): string {
  let rest: string;
  if (value.startsWith("unix://")) rest = value.slice("unix://".length);
  else if (value.startsWith("unix:")) rest = value.slice("unix:".length);
  else if (value.startsWith("/")) rest = value;
  else
    throw new ConfigurationError(
      `${source} = ${JSON.stringify(value)}: only Unix sockets are supported (unix:///absolute/path)`,
    );
  if (!rest.startsWith("/"))
    throw new ConfigurationError(`${source} = ${JSON.stringify(value)}: the socket path must be absolute`);
  return rest;
}

export interface SocketOptions {
  /** The Workload API socket (`unix:///path` or a path). */
  workloadApi?: string;
  /** The exchange socket. */
  exchangeSocket?: string;
}

export interface Sockets {
  workloadApi: string;
  exchange: string;
}

export function findSockets(options: SocketOptions = {}): Sockets {
  let workloadApi: string;
  if (options.workloadApi !== undefined)
    workloadApi = unixPath(options.workloadApi, "the workloadApi option");
  else if (process.env[WORKLOAD_ENV] !== undefined)
    workloadApi = unixPath(process.env[WORKLOAD_ENV], WORKLOAD_ENV);
  else
    throw new ConfigurationError(
      `${WORKLOAD_ENV} is not set: export SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock ` +
        "(`tessera run --dev` prints the line) or pass the socket explicitly",
    );
  return { workloadApi, exchange: exchangeSocket(options.exchangeSocket, workloadApi) };
}

/** The exchange socket alone (a resource server needs no Workload API socket). */
export function exchangeSocket(explicit?: string, workloadApi?: string): string {
  if (explicit !== undefined) return unixPath(explicit, "the exchangeSocket option");
  const env = process.env[EXCHANGE_ENV];
  if (env !== undefined) return unixPath(env, EXCHANGE_ENV);
  const api =
    workloadApi ??
    (process.env[WORKLOAD_ENV] !== undefined ? unixPath(process.env[WORKLOAD_ENV], WORKLOAD_ENV) : undefined);
  if (api === undefined)
    throw new ConfigurationError(
      `no exchange socket: pass it, or set ${EXCHANGE_ENV} or ${WORKLOAD_ENV} (it is beside the Workload API socket)`,
    );
  return path.join(path.dirname(api), "exchange.sock");
}
