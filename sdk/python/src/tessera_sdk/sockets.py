"""Where the node agent is: its Workload API socket and its exchange socket.

The Workload API socket is found the way every SPIFFE client finds it: an
explicit argument, else `SPIFFE_ENDPOINT_SOCKET` (`unix:///abs/path`). The
exchange socket is an explicit argument, else `TESSERA_EXCHANGE_SOCKET`, else
`exchange.sock` beside the Workload API socket (the agent's default, and how
one hostPath or CSI mount serves both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

WORKLOAD_ENV = "SPIFFE_ENDPOINT_SOCKET"
EXCHANGE_ENV = "TESSERA_EXCHANGE_SOCKET"


def _unix_path(value: str, source: str) -> Path:
    if value.startswith("unix://"):
        rest = value[len("unix://") :]
    elif value.startswith("unix:"):
        rest = value[len("unix:") :]
    elif value.startswith("/"):
        rest = value
    else:
        raise ConfigurationError(f"{source} = {value!r}: only Unix sockets are supported (unix:///absolute/path)")
    if not rest.startswith("/"):
        raise ConfigurationError(f"{source} = {value!r}: the socket path must be absolute")
    return Path(rest)


@dataclass(frozen=True)
class Sockets:
    """The agent's two workload-facing sockets."""

    workload_api: Path
    exchange: Path

    @classmethod
    def find(
        cls, workload_api: str | os.PathLike[str] | None = None, exchange: str | os.PathLike[str] | None = None
    ) -> Sockets:
        if workload_api is not None:
            api = _unix_path(os.fspath(workload_api), "the workload_api socket argument")
        elif (env := os.environ.get(WORKLOAD_ENV)) is not None:
            api = _unix_path(env, WORKLOAD_ENV)
        else:
            raise ConfigurationError(
                f"{WORKLOAD_ENV} is not set: export SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock "
                "(`tessera run --dev` prints the line) or pass the socket explicitly"
            )
        if exchange is not None:
            ex = _unix_path(os.fspath(exchange), "the exchange socket argument")
        elif (env := os.environ.get(EXCHANGE_ENV)) is not None:
            ex = _unix_path(env, EXCHANGE_ENV)
        else:
            ex = api.parent / "exchange.sock"
        return cls(workload_api=api, exchange=ex)


def exchange_socket(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The exchange socket alone (a resource server needs no Workload API socket
    to verify and introspect tokens)."""
    if explicit is not None:
        return _unix_path(os.fspath(explicit), "the exchange socket argument")
    if (env := os.environ.get(EXCHANGE_ENV)) is not None:
        return _unix_path(env, EXCHANGE_ENV)
    if (env := os.environ.get(WORKLOAD_ENV)) is not None:
        return _unix_path(env, WORKLOAD_ENV).parent / "exchange.sock"
    raise ConfigurationError(
        f"no exchange socket: pass it, or set {EXCHANGE_ENV} or {WORKLOAD_ENV} (it is beside the Workload API socket)"
    )
