"""Renders the chart with the real Helm engine and prints every manifest as
one JSON `List` (what `kubectl apply -f -` reads), for the tests that apply
the chart to the genuine kube-apiserver (tests/tests/kube.rs).

    render_json.py <release> <namespace> <values.json>

Run with tests/helm/.venv/bin/python (tests/helm/setup.sh creates it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "tessera"


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    release, namespace, values_file = argv[1], argv[2], argv[3]
    values = json.loads(Path(values_file).read_text())
    chart = helm_python.Chart.load(str(CHART))
    try:
        files: dict[str, str] = chart.render(values, name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()
    items: list[dict[str, object]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        items.extend(d for d in yaml.safe_load_all(text) if d)
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
