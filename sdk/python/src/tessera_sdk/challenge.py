"""`WWW-Authenticate: Bearer ...` challenges (RFC 6750 §3, RFC 9728 §5.1).

Parsed by the agent side (to step up on `insufficient_scope`) and written by
the server side (to answer one), so both ends agree on the syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAM = re.compile(r'\s*([A-Za-z0-9_\-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*(?:,|$)')


@dataclass(frozen=True)
class BearerChallenge:
    error: str | None = None
    error_description: str | None = None
    scope: frozenset[str] = frozenset()
    resource_metadata: str | None = None

    @classmethod
    def parse(cls, header: str | None) -> BearerChallenge | None:
        """The Bearer challenge in a `WWW-Authenticate` value, or None if it has none."""
        if not header:
            return None
        match = re.search(r"(?i)(?:^|,)\s*bearer(?:\s+|$)", header)
        if match is None:
            return None
        params: dict[str, str] = {}
        pos = match.end()
        while pos < len(header):
            m = _PARAM.match(header, pos)
            if m is None:
                break  # another scheme's challenge, or junk: stop at what we understood
            raw = m.group(2)
            value = re.sub(r"\\(.)", r"\1", raw) if raw is not None else m.group(3)
            params.setdefault(m.group(1).lower(), value)
            pos = m.end()
        return cls(
            error=params.get("error"),
            error_description=params.get("error_description"),
            scope=frozenset(params.get("scope", "").split()),
            resource_metadata=params.get("resource_metadata"),
        )

    def header(self) -> str:
        """The header value, quoting every parameter (RFC 6750 §3)."""
        parts = []
        for name, value in (
            ("error", self.error),
            ("error_description", self.error_description),
            ("scope", " ".join(sorted(self.scope)) if self.scope else None),
            ("resource_metadata", self.resource_metadata),
        ):
            if value is not None:
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                parts.append(f'{name}="{escaped}"')
        return "Bearer " + ", ".join(parts) if parts else "Bearer"
