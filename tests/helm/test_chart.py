"""Offline checks of the helm/tessera chart, with no cluster.

* the real Helm engine (Helm SDK v4 inside helm-python-sdk) renders the chart
  for the default values and several non-default value sets, and lints it
  strictly;
* values.schema.json accepts every value set and rejects bad values;
* every rendered manifest passes `kubernetes-validate --strict` for several
  Kubernetes versions (CRD kinds such as ServiceMonitor only WARN: their
  schemas are not bundled);
* checkov finds nothing on the rendered manifests, every skip carries a
  reason, and every skip is needed (without the skip annotations checkov
  fails exactly the skipped checks);
* assertions on the parsed YAML: host PID, socket hostPath, securityContext,
  probes, RBAC, the token exchange (policies ConfigMap, operator socket), the
  authority (its Deployment, least-privilege RBAC, NetworkPolicies, the
  agents' upstream mode, and that no agent ever mounts its keys) and the
  ConfigMaps' TOML (parsed with tomllib);
* with a `tessera` binary at hand, the real agent starts on every rendered
  config (paths moved to a temp dir) and, for the exchange value set, issues
  and refuses tokens according to the rendered policies and reloads them
  when they change the way the kubelet updates a ConfigMap volume; with a
  binary that has `tessera authority`, the real authority starts on the
  rendered authority.toml and an upstream-mode agent on its rendered config
  (without that subcommand these cases are SKIPPED with a loud reason: the
  rendered [server]/[upstream] tables are then unchecked by the real parser).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python
import jsonschema
import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = REPO / "helm" / "tessera"
# The tools run as modules of this interpreter, not through their console
# scripts, whose shebangs pin the venv's absolute path.
KUBERNETES_VALIDATE = [sys.executable, "-m", "kubernetes_validate"]
CHECKOV = [sys.executable, "-W", "ignore::SyntaxWarning", "-c",
           "import sys; from checkov.main import Checkov; sys.exit(Checkov().run())"]
KUBE_VERSIONS = ["1.30.0", "1.33.0", "1.37.0"]
LINT_KUBE_VERSIONS = ["v1.26.0", "v1.30.0", "v1.33.0"]
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
DIGEST = "sha256:" + "ab" * 32
AUTHORITY_KEYS, AUTHORITY_BUNDLE = "tessera-authority-keys", "tessera-authority-bundle"

NOTES_RESOURCE = "https://notes.example/mcp"
# Inline policies of the "exchange-inline" value set. The agent loads them
# in strict mode, so they are also a check that the chart passes Cedar text
# through unharmed (quotes, backslashes, non-ASCII, comments).
EXCHANGE_POLICIES = {
    "10-notes-read.cedar": (
        '// Every workload of the trust domain may read notes ("résumé" \\ ok).\n'
        '@id("notes-read")\n'
        '@max_ttl("5m")\n'
        'permit (\n'
        '  principal,\n'
        '  action == Tessera::Action::"notes:read",\n'
        f'  resource == Tessera::Audience::"{NOTES_RESOURCE}"\n'
        ')\n'
        'when { principal.trust_domain == "example.org" };\n'
    ),
    "20-forbid-delete.cedar": (
        '@id("no-delete")\n'
        'forbid (principal, action == Tessera::Action::"notes:delete", resource);\n'
    ),
}

# Each value set is rendered as its own release in its own namespace, so the
# manifests of all sets can be scanned together without mixing.
VALUE_SETS: dict[str, dict] = {
    "default": {},
    # Workloads mount the host directory themselves; the broad kubelet RBAC
    # subresource older clusters need; the CA kept on the node; self-signed
    # kubelet certificates.
    "hostpath-nodesproxy": {
        "socket": {"mode": "hostPath", "hostPath": "/var/run/tessera-sockets"},
        "kubelet": {"rbacResource": "nodes/proxy", "skipVerification": True},
        "dataDir": {"type": "hostPath", "hostPath": "/var/lib/tessera-agent"},
    },
    # Prometheus Operator monitors; images pinned by digest; a CPU limit.
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s"},
        },
        "image": {"repository": "registry.example.com/tessera", "digest": DIGEST},
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        },
        "admin": {"port": 9464},
    },
    # Custom trust domain and entries, own tolerations, a non-root agent, an
    # operator CA shared by all nodes.
    "custom": {
        "trustDomain": "prod.acme.io",
        "entries": [
            {
                "spiffe_id": "spiffe://prod.acme.io/billing",
                "selectors": ["k8s:ns:billing", "k8s:sa:api"],
                "hint": "billing",
                "x509_ttl": "30m",
                "jwt_ttl": "2m",
            },
            {"spiffe_id": "/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"]},
            {"spiffe_id": "/uid/{unix:uid}", "selectors": ["unix:uid"]},
        ],
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "agents", "effect": "NoSchedule"}
        ],
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
        "authority": {"caSecret": "tessera-ca", "jwtKeyType": "rsa-2048"},
        "priorityClassName": "",
        "log": {"level": "tessera_agent=debug", "format": "text"},
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "podLabels": {"team": "platform"},
    },
    # The unauthenticated read-only kubelet port, on the host network; no
    # NetworkPolicy, no helm test.
    "readonly-hostnetwork": {
        "kubelet": {"readOnlyPort": 10255},
        "hostNetwork": True,
        "networkPolicy": {"enabled": False},
        "tests": {"enabled": False},
    },
    # Unix attestation only: no kubelet, no RBAC, no token.
    "unix-only": {"kubelet": {"enabled": False}, "entries": [
        {"spiffe_id": "/uid/{unix:uid}", "selectors": ["unix:uid"]}
    ]},
    # Token exchange with inline policies and every exchange value set; unix
    # attestation only, so the real agent (when at hand) gives this test
    # process an identity and the exchange can be exercised end to end.
    "exchange-inline": {
        "kubelet": {"enabled": False},
        "entries": [{"spiffe_id": "/uid/{unix:uid}", "selectors": ["unix:uid"]}],
        "dataDir": {"type": "hostPath"},
        "admin": {"socketHostPath": "/var/run/tessera-admin"},
        "exchange": {
            "policies": EXCHANGE_POLICIES,
            "issuer": "https://tessera.example/issuer",
            "maxTTL": "10m",
            "defaultTTL": "2m",
            "maxDelegationDepth": 1,
            "approvalTimeout": "3m",
            "approvalGrantTTL": "1m",
            "approvalPollInterval": "1s",
            "policyReloadInterval": "200ms",
        },
    },
    # Policies from an operator-managed ConfigMap; a non-root agent (the init
    # container must hand it the operator socket directory too).
    "exchange-existing-cm": {
        "exchange": {"existingPolicyConfigMap": "team-policies"},
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
    },
    # No token exchange: no [exchange], no operator socket, no policies.
    "exchange-off": {"exchange": {"enabled": False}},
    # The authority with its defaults, and agents in upstream mode; several
    # entries, so that "the same entries in both configs" means something.
    "authority": {
        "trustDomain": "prod.acme.io",
        "entries": [
            {"spiffe_id": "spiffe://prod.acme.io/billing", "selectors": ["k8s:ns:billing", "k8s:sa:api"],
             "hint": "billing", "x509_ttl": "30m", "jwt_ttl": "2m"},
            {"spiffe_id": "/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"]},
        ],
        "authority": {"enabled": True, "keysSecret": AUTHORITY_KEYS, "bundleConfigMap": AUTHORITY_BUNDLE},
    },
    # Every authority value changed; agents on the host network (the
    # authority then admits its port from node IPs), non-root agents, a named
    # agent ServiceAccount, images by digest, a CPU limit on the authority.
    "authority-custom": {
        "authority": {
            "enabled": True, "keysSecret": "ca-keys", "bundleConfigMap": "ca-bundle",
            "replicas": 3, "audience": "spiffe://prod.acme.io/authority", "nodeSvidTtl": "30m",
            "caPublishLead": "1h", "port": 9443, "apiServerPorts": [6443],
            "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "topology.kubernetes.io/zone",
                 "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "authority"}}}]}},
            "podDisruptionBudget": {"minAvailable": 2},
        },
        "hostNetwork": True,
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
        "serviceAccount": {"name": "node-agent"},
        "image": {"repository": "registry.example.com/tessera", "digest": DIGEST, "pullPolicy": "Always"},
        "initImage": {"digest": DIGEST, "pullPolicy": "Always"},
        "admin": {"port": 9464},
        "exchange": {"enabled": False},
        "log": {"level": "debug", "format": "text"},
    },
    # The HTTPS face at the authority: a public certificate from a Secret, a
    # LoadBalancer Service limited to some sources.
    "authority-https": {
        "authority": {"enabled": True, "keysSecret": AUTHORITY_KEYS, "bundleConfigMap": AUTHORITY_BUNDLE},
        "https": {
            "enabled": True,
            "issuer": "https://tessera.example.com",
            "tls": {"secretName": "tessera-https-tls", "reloadInterval": "30s"},
            "service": {
                "type": "LoadBalancer",
                "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
                "loadBalancerSourceRanges": ["203.0.113.0/24"],
            },
        },
    },
}
AUTHORITY_SETS = [name for name, v in VALUE_SETS.items() if v.get("authority", {}).get("enabled")]
HTTPS_TLS_SECRET = "tessera-https-tls"


def release(name: str) -> tuple[str, str]:
    """(release name, namespace) of a value set."""
    return f"tessera-{name}", f"tessera-{name}-ns"


# ---------------------------------------------------------------- rendering


@pytest.fixture(scope="session")
def chart():
    c = helm_python.Chart.load(str(CHART))
    yield c
    c.close()


def render_files(chart, values: dict, name: str = "default") -> dict[str, str]:
    rel, ns = release(name)
    return chart.render(values, name=rel, namespace=ns, is_install=True)


def docs_of(files: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="session")
def rendered(chart) -> dict[str, dict[str, str]]:
    return {name: render_files(chart, values, name) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="session")
def manifests(rendered) -> dict[str, list[dict]]:
    return {name: docs_of(files) for name, files in rendered.items()}


@pytest.fixture(scope="session")
def manifest_dir(tmp_path_factory, rendered) -> Path:
    """One multi-document file per value set, as `helm template` prints it."""
    d = tmp_path_factory.mktemp("rendered")
    for name, files in rendered.items():
        body = "\n---\n".join(
            text.strip() for path, text in sorted(files.items())
            if not path.endswith("NOTES.txt") and text.strip()
        )
        (d / f"{name}.yaml").write_text(body + "\n")
    return d


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}*{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def agent_pod(docs) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]


def agent_container(docs) -> dict:
    (c,) = agent_pod(docs)["spec"]["containers"]
    return c


def config_text(docs) -> str:
    """The agent's tessera.toml (the chart's other ConfigMap holds policies)."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "tessera.toml" in (d.get("data") or {})]
    return cm["data"]["tessera.toml"]


def config_toml(docs) -> dict:
    return tomllib.loads(config_text(docs))


def authority_config_text(docs) -> str:
    """The authority's authority.toml."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "authority.toml" in (d.get("data") or {})]
    return cm["data"]["authority.toml"]


def authority_config_toml(docs) -> dict:
    return tomllib.loads(authority_config_text(docs))


def authority_pod(docs) -> dict:
    return auth_one(docs, "Deployment")["spec"]["template"]


def authority_container(docs) -> dict:
    (c,) = authority_pod(docs)["spec"]["containers"]
    return c


def is_authority(doc: dict) -> bool:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "authority"


def auth_one(docs: list[dict], kind: str) -> dict:
    """The authority's one resource of a kind (release names may end in -authority too)."""
    return one([d for d in docs if is_authority(d)], kind)


def agent_one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    return one([d for d in docs if not is_authority(d)], kind, name_suffix)


def policies_cm(docs) -> dict | None:
    found = [d for d in docs if d["kind"] == "ConfigMap"
             and not {"tessera.toml", "authority.toml"} & set(d.get("data") or {})]
    assert len(found) <= 1
    return found[0] if found else None


def volume(pod_spec: dict, name: str) -> dict:
    (v,) = [v for v in pod_spec["volumes"] if v["name"] == name]
    return v


def mount(container: dict, name: str) -> dict:
    (m,) = [m for m in container["volumeMounts"] if m["name"] == name]
    return m


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("kube_version", LINT_KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name, kube_version):
    rel, ns = release(name)
    report = helm_python.lint(
        str(CHART), VALUE_SETS[name], strict=True, namespace=ns, kube_version=kube_version
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is INFO; the only one allowed is the missing icon (the project has no logo).
    problems = [m for m in report["messages"] if m["severity"] >= 2 or "icon" not in m["error"]]
    assert problems == []


def test_package_renders_like_the_directory(tmp_path, rendered):
    archive = helm_python.package(str(CHART), destination=str(tmp_path))
    assert Path(archive).name == "tessera-0.1.0.tgz"
    packaged = helm_python.Chart.load_archive(Path(archive).read_bytes())
    try:
        assert render_files(packaged, {}) == rendered["default"]
    finally:
        packaged.close()


# ---------------------------------------------------------------- values schema


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_schema_is_valid_draft7_and_accepts_values_yaml():
    jsonschema.Draft7Validator.check_schema(schema())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema()).validate(defaults)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_schema_accepts_value_sets(chart, name):
    chart.validate_schema(VALUE_SETS[name])


BAD_VALUES = {
    "unknown top-level key": ({"hostPid": False}, "additional properties"),
    "unknown nested key": ({"securityContext": {"privileged": True}}, "additional properties"),
    "socket mode": ({"socket": {"mode": "nfs"}}, "/socket/mode"),
    "rbac subresource": ({"kubelet": {"rbacResource": "nodes/*"}}, "/kubelet/rbacResource"),
    "trust domain case": ({"trustDomain": "Example.ORG"}, "/trustDomain"),
    "maxSurge": ({"updateStrategy": {"rollingUpdate": {"maxSurge": 1}}}, "maxSurge"),
    "log format": ({"log": {"format": "xml"}}, "/log/format"),
    "entry without selectors": ({"entries": [{"spiffe_id": "/a"}]}, "selectors"),
    "entry unknown key": ({"entries": [{"spiffe_id": "/a", "selectors": ["k8s:ns"], "ttl": "1h"}]}, "ttl"),
    "entry relative id": ({"entries": [{"spiffe_id": "ns/a", "selectors": ["k8s:ns"]}]}, "spiffe_id"),
    "duration": ({"svid": {"x509TTL": 3600}}, "/svid/x509TTL"),
    "digest": ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    "port": ({"admin": {"port": 70000}}, "/admin/port"),
    "runAsUser type": ({"securityContext": {"runAsUser": "root"}}, "/securityContext/runAsUser"),
    "capability prefix": ({"securityContext": {"capabilities": {"add": ["CAP_SYS_PTRACE"]}}}, "capabilities"),
    "dataDir type": ({"dataDir": {"type": "pvc"}}, "/dataDir/type"),
    "exchange unknown key": ({"exchange": {"policyDir": "/x"}}, "additional properties"),
    "exchange enabled type": ({"exchange": {"enabled": "yes"}}, "/exchange/enabled"),
    "policy file extension": ({"exchange": {"policies": {"a.txt": "x"}}}, "invalid propertyName 'a.txt'"),
    "hidden policy file": ({"exchange": {"policies": {".a.cedar": "x"}}}, "invalid propertyName '.a.cedar'"),
    "policy file in a subdirectory": ({"exchange": {"policies": {"d/a.cedar": "x"}}}, "invalid propertyName 'd/a.cedar'"),
    "policy text type": ({"exchange": {"policies": {"a.cedar": ["x"]}}}, "/exchange/policies/a.cedar"),
    "policy configmap name": ({"exchange": {"existingPolicyConfigMap": "Team_Policies"}}, "/exchange/existingPolicyConfigMap"),
    "exchange duration": ({"exchange": {"maxTTL": 900}}, "/exchange/maxTTL"),
    "exchange duration text": ({"exchange": {"approvalTimeout": "soon"}}, "/exchange/approvalTimeout"),
    "delegation depth": ({"exchange": {"maxDelegationDepth": 17}}, "/exchange/maxDelegationDepth"),
    "issuer length": ({"exchange": {"issuer": "x" * 513}}, "/exchange/issuer"),
    "admin socket dir relative": ({"admin": {"socketHostPath": "run/tessera/admin"}}, "/admin/socketHostPath"),
    "authority unknown key": ({"authority": {"image": {"tag": "x"}}}, "additional properties"),
    "authority enabled type": ({"authority": {"enabled": "true"}}, "/authority/enabled"),
    "authority replicas": ({"authority": {"replicas": 0}}, "/authority/replicas"),
    "authority keys secret name": ({"authority": {"keysSecret": "Keys_Secret"}}, "/authority/keysSecret"),
    "authority bundle configmap name": ({"authority": {"bundleConfigMap": "a b"}}, "/authority/bundleConfigMap"),
    "authority audience empty": ({"authority": {"audience": ""}}, "/authority/audience"),
    "authority node svid ttl": ({"authority": {"nodeSvidTtl": 3600}}, "/authority/nodeSvidTtl"),
    "authority ca publish lead": ({"authority": {"caPublishLead": "soon"}}, "/authority/caPublishLead"),
    "authority port": ({"authority": {"port": 0}}, "/authority/port"),
    "authority api server ports": ({"authority": {"apiServerPorts": []}}, "/authority/apiServerPorts"),
    "authority pdb unknown key": ({"authority": {"podDisruptionBudget": {"maxUnavailable": 1}}}, "additional properties"),
    "authority pdb type": ({"authority": {"podDisruptionBudget": {"minAvailable": "50%"}}}, "/authority/podDisruptionBudget/minAvailable"),
    "authority resources key": ({"authority": {"resources": {"limit": {}}}}, "additional properties"),
    "federation without bootstrap": (
        {"authority": {"federation": {"relationships": [
            {"trustDomain": "partner.example", "bundleEndpointUrl": "https://bundle.partner.example/",
             "endpointSpiffeId": "spiffe://partner.example/bundle"}]}}},
        "bootstrapBundle"),
    "federation plain http": (
        {"authority": {"federation": {"relationships": [
            {"trustDomain": "partner.example", "bundleEndpointUrl": "http://bundle.partner.example/",
             "profile": "https_web"}]}}},
        "/authority/federation/relationships/0/bundleEndpointUrl"),
    "entry federates_with": ({"entries": [{"spiffe_id": "/a", "selectors": ["k8s:ns"], "federates_with": ["A.B"]}]},
                             "/entries/0/federates_with/0"),
    "https issuer scheme": ({"https": {"issuer": "http://tessera.example.com"}}, "/https/issuer"),
    "https issuer trailing slash": ({"https": {"issuer": "https://tessera.example.com/"}}, "/https/issuer"),
    "https issuer query": ({"https": {"issuer": "https://tessera.example.com?td=a"}}, "/https/issuer"),
    "https unknown key": ({"https": {"certFile": "/x"}}, "additional properties"),
    "https service type": ({"https": {"service": {"type": "ExternalName"}}}, "/https/service/type"),
    "https tls secret name": ({"https": {"tls": {"secretName": "TLS_Secret"}}}, "/https/tls/secretName"),
    "https port": ({"https": {"port": 0}}, "/https/port"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart, case):
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)
    # Install and upgrade go through the same check: nothing renders.
    with pytest.raises(helm_python.HelmValuesError):
        render_files(chart, values)


def test_render_refuses_entry_outside_trust_domain(chart):
    values = {"entries": [{"spiffe_id": "spiffe://other.org/x", "selectors": ["k8s:ns"]}]}
    with pytest.raises(helm_python.HelmRenderError, match="not in trust domain"):
        render_files(chart, values)


# ---------------------------------------------------------------- kubernetes-validate


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_kubernetes_validate_strict(manifest_dir, manifests, name, kube_version):
    path = manifest_dir / f"{name}.yaml"
    proc = subprocess.run(
        [*KUBERNETES_VALIDATE, "--strict", "-k", kube_version, str(path)],
        capture_output=True, text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(manifests[name]), out
    for doc in manifests[name]:
        if doc["kind"] in CRD_KINDS:
            # No bundled schema for custom resources: a warning, not a pass.
            wanted = f"Couldn't find schema for kind {doc['kind']} with api version {doc['apiVersion']}"
            (line,) = [line for line in lines if wanted in line]
            assert line.startswith("WARN"), line
        else:
            ref = f"resource {doc['kind'].lower()}/{doc['metadata']['name']} against"
            (line,) = [line for line in lines if ref in line]
            assert line.startswith("INFO") and " passed " in line, line


# ---------------------------------------------------------------- checkov


def run_checkov(directory: Path) -> dict:
    proc = subprocess.run(
        [*CHECKOV, "--skip-download", "--framework", "kubernetes",
         "-o", "json", "-d", str(directory)],
        capture_output=True, text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["summary"]["parsing_errors"] == 0
    return report["results"]


def by_file(checks: list[dict]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for c in checks:
        out.setdefault(Path(c["file_path"]).stem, set()).add((c["resource"], c["check_id"]))
    return out


@pytest.fixture(scope="session")
def checkov_results(manifest_dir) -> dict:
    return run_checkov(manifest_dir)


@pytest.fixture(scope="session")
def checkov_without_skips(tmp_path_factory, manifest_dir) -> dict:
    d = tmp_path_factory.mktemp("noskip")
    for f in manifest_dir.glob("*.yaml"):
        text = "\n".join(l for l in f.read_text().splitlines() if "checkov.io/skip" not in l)
        (d / f.name).write_text(text + "\n")
    return run_checkov(d)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_checkov_no_failures(checkov_results, name):
    failed = by_file(checkov_results["failed_checks"]).get(name, set())
    assert failed == set(), sorted(failed)
    passed = by_file(checkov_results["passed_checks"]).get(name, set())
    assert len(passed) > 50  # the scan did look at this set


@pytest.mark.parametrize("name", VALUE_SETS)
def test_checkov_every_skip_has_a_reason_and_is_needed(checkov_results, checkov_without_skips, name):
    skipped = [c for c in checkov_results["skipped_checks"] if Path(c["file_path"]).stem == name]
    for c in skipped:
        assert len(c["check_result"].get("suppress_comment", "")) > 20, c
    skipped_set = {(c["resource"], c["check_id"]) for c in skipped}
    needed = by_file(checkov_without_skips["failed_checks"]).get(name, set())
    assert skipped_set == needed


def test_checkov_skips_are_the_documented_ones(checkov_results):
    """Only by-design findings are ever skipped (README: "checkov skips")."""
    allowed = {"CKV2_K8S_6", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_17", "CKV_K8S_19",
               "CKV_K8S_23", "CKV_K8S_25", "CKV_K8S_38", "CKV_K8S_40", "CKV_K8S_43"}
    ids = {c["check_id"] for c in checkov_results["skipped_checks"]}
    assert ids <= allowed
    readme = (CHART / "README.md").read_text()
    for check_id in ids:
        assert f"`{check_id}`" in readme, check_id


# ---------------------------------------------------------------- the default install


def test_default_kinds(manifests):
    assert kinds(manifests["default"]) == sorted([
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "DaemonSet", "NetworkPolicy",
        "NetworkPolicy", "Pod", "ServiceAccount",
    ])


def test_default_pod_namespaces_and_scheduling(manifests):
    ds = one(manifests["default"], "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert spec["hostNetwork"] is False
    assert "dnsPolicy" not in spec
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [
        {"operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists", "effect": "NoExecute"},
    ]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    assert ds["metadata"]["namespace"] == release("default")[1]


def test_default_socket_hostpath(manifests):
    pod = agent_pod(manifests["default"])["spec"]
    assert volume(pod, "sockets")["hostPath"] == {"path": "/run/tessera/sockets", "type": "DirectoryOrCreate"}
    m = mount(agent_container(manifests["default"]), "sockets")
    assert m["mountPath"] == "/run/tessera/sockets"
    assert not m.get("readOnly", False)
    assert volume(pod, "data") == {"name": "data", "emptyDir": {}}
    assert mount(agent_container(manifests["default"]), "data")["mountPath"] == "/var/lib/tessera"


def test_default_security_context(manifests):
    pod = agent_pod(manifests["default"])["spec"]
    c = agent_container(manifests["default"])
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "initContainers" not in pod
    assert "fsGroup" not in pod["securityContext"]


def test_default_token_only_for_the_agent(manifests):
    docs = manifests["default"]
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert agent_pod(docs)["spec"]["automountServiceAccountToken"] is True
    assert agent_pod(docs)["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "Pod")["spec"]["automountServiceAccountToken"] is False


def test_default_command_env_ports_probes(manifests):
    c = agent_container(manifests["default"])
    assert c["image"] == "tessera:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] + c["args"] == ["tessera", "run", "--config", "/etc/tessera/tessera.toml"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"HOST_IP": "status.hostIP", "NODE_NAME": "spec.nodeName"}
    assert c["ports"] == [{"name": "admin", "containerPort": 9090, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert mount(c, "config") == {"name": "config", "mountPath": "/etc/tessera", "readOnly": True}


def test_default_rbac_is_get_nodes_pods_only(manifests):
    docs = manifests["default"]
    role = one(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"],
    }
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_default_config_toml(manifests):
    cfg = config_toml(manifests["default"])
    assert cfg["trust_domain"] == "example.org"
    assert cfg["socket_path"] == "/run/tessera/sockets/agent.sock"
    assert cfg["data_dir"] == "/var/lib/tessera"
    assert cfg["svid"] == {"x509_ttl": "1h", "jwt_ttl": "5m"}
    assert cfg["authority"] == {"ca_ttl": "24h", "jwt_key_ttl": "24h", "jwt_key_type": "ec-p256", "persist": True}
    assert cfg["attestor"]["proc_root"] == "/proc"
    assert cfg["attestor"]["unix"] == {"discover_workload_path": True, "workload_size_limit": 134217728}
    assert cfg["attestor"]["k8s"] == {
        "enabled": True,
        "kubelet_host_env": "HOST_IP",
        "kubelet_port": 10250,
        "token_path": "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "kubelet_ca_path": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "skip_kubelet_verification": False,
        "poll_attempts": 60,
        "poll_interval": "500ms",
        "request_timeout": "10s",
    }
    assert cfg["entries"] == [
        {"spiffe_id": "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"]}
    ]
    assert cfg["admin"] == {"listen": "0.0.0.0:9090", "socket_path": "/run/tessera/admin/admin.sock"}
    assert cfg["exchange"] == {
        "policy_dir": "/etc/tessera/policies",
        "policy_reload_interval": "2s",
        "max_ttl": "15m",
        "default_ttl": "5m",
        "max_delegation_depth": 3,
        "approval_timeout": "10m",
        "approval_grant_ttl": "5m",
        "approval_poll_interval": "2s",
    }
    assert cfg["log"] == {"level": "info", "format": "json"}
    assert cfg["limits"] == {"shutdown_grace": "5s"}
    # Every key the agent reads is known to it (README "Configuration reference" + [attestor.k8s]).
    assert set(cfg) == {"trust_domain", "socket_path", "data_dir", "svid", "authority", "attestor",
                        "entries", "admin", "exchange", "log", "limits"}


def test_config_matches_example_file_keys(manifests):
    """The rendered config uses only keys the repository's complete example uses (plus [attestor.k8s])."""
    example = tomllib.loads((REPO / "examples" / "tessera.toml").read_text())

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    out |= keys(item, f"{prefix}{k}[].")
            else:
                out.add(prefix + k)
        return out

    known = keys(example) | {"authority.ca_cert_file", "authority.ca_key_file", "entries[].jwt_ttl"}
    # Upstream mode (the authority's contract; not in the example file yet).
    known |= {f"upstream.{k}" for k in ("addresses", "server_name", "bundle_file", "node_attestation",
                                         "token_file", "bundle_refresh")}
    for name in VALUE_SETS:
        cfg = config_toml(manifests[name])
        cfg["attestor"].pop("k8s")
        assert keys(cfg) <= known, (name, keys(cfg) - known)


def test_checksum_annotation_tracks_the_config(chart, rendered, manifests):
    ann = agent_pod(manifests["default"])["metadata"]["annotations"]["checksum/config"]
    cm_text = rendered["default"]["tessera/templates/configmap.yaml"]
    assert ann == hashlib.sha256(cm_text.encode()).hexdigest()
    other = docs_of(render_files(chart, {"svid": {"x509TTL": "30m"}}))
    assert agent_pod(other)["metadata"]["annotations"]["checksum/config"] != ann
    # Values outside the config do not restart the agents.
    same = docs_of(render_files(chart, {"podLabels": {"a": "b"}}))
    assert agent_pod(same)["metadata"]["annotations"]["checksum/config"] == ann


def test_default_network_policy(manifests):
    np = one(manifests["default"], "NetworkPolicy", "tessera-default")
    assert np["spec"]["podSelector"]["matchLabels"] == one(manifests["default"], "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert np["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9090}]}]
    assert np["spec"]["egress"] == [{"ports": [{"protocol": "TCP", "port": 10250}]}]


def test_default_helm_test_pod_uses_csi(manifests):
    pod = one(manifests["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["args"] == ["api", "fetch", "x509"]
    assert c["env"] == [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///spiffe-workload-api/agent.sock"}]
    assert mount(c, "spiffe-workload-api") == {
        "name": "spiffe-workload-api", "mountPath": "/spiffe-workload-api", "readOnly": True,
    }
    assert volume(pod["spec"], "spiffe-workload-api")["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    assert c["securityContext"]["runAsNonRoot"] is True
    np = one(manifests["default"], "NetworkPolicy", "-test")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert np["spec"]["egress"] == [] and np["spec"]["ingress"] == []


def test_default_notes(rendered):
    notes = rendered["default"]["tessera/templates/NOTES.txt"]
    assert "SPIFFE_ENDPOINT_SOCKET=unix:///spiffe-workload-api/agent.sock" in notes
    assert "csi.spiffe.io" in notes
    assert "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}" in notes


# ---------------------------------------------------------------- non-default value sets


def test_hostpath_mode_and_nodes_proxy_rbac(manifests, rendered):
    docs = manifests["hostpath-nodesproxy"]
    assert one(docs, "ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "sockets")["hostPath"] == {"path": "/var/run/tessera-sockets", "type": "DirectoryOrCreate"}
    # The agent side is the same path in the container whatever the host path.
    assert mount(agent_container(docs), "sockets")["mountPath"] == "/run/tessera/sockets"
    assert volume(pod, "data")["hostPath"] == {"path": "/var/lib/tessera-agent", "type": "DirectoryOrCreate"}
    test_pod = one(docs, "Pod")
    assert volume(test_pod["spec"], "spiffe-workload-api")["hostPath"] == {
        "path": "/var/run/tessera-sockets", "type": "Directory",
    }
    assert config_toml(docs)["attestor"]["k8s"]["skip_kubelet_verification"] is True
    notes = rendered["hostpath-nodesproxy"]["tessera/templates/NOTES.txt"]
    assert "socket.mode=hostPath" in notes and "WARNING: kubelet.skipVerification=true" in notes


def test_monitoring(manifests):
    docs = manifests["monitoring"]
    svc = one(docs, "Service")
    sel = one(docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == sel
    assert svc["spec"]["ports"] == [{"name": "admin", "port": 9464, "targetPort": "admin", "protocol": "TCP"}]
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"] == sel
    assert sm["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    pm = one(docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == sel
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}]
    c = agent_container(docs)
    assert c["image"] == f"registry.example.com/tessera@{DIGEST}"
    assert c["ports"][0]["containerPort"] == 9464
    assert config_toml(docs)["admin"]["listen"] == "0.0.0.0:9464"
    assert one(docs, "NetworkPolicy", "tessera-monitoring")["spec"]["ingress"][0]["ports"][0]["port"] == 9464
    skips = " ".join(one(docs, "DaemonSet")["metadata"]["annotations"].values())
    assert "CKV_K8S_43" not in skips and "CKV_K8S_15" not in skips and "CKV_K8S_11" not in skips


def test_monitoring_off_by_default(manifests):
    assert not {"Service", "ServiceMonitor", "PodMonitor"} & set(kinds(manifests["default"]))


def test_custom_trust_domain_and_entries(manifests, rendered):
    cfg = config_toml(manifests["custom"])
    assert cfg["trust_domain"] == "prod.acme.io"
    assert cfg["entries"] == [
        {"spiffe_id": "spiffe://prod.acme.io/billing", "selectors": ["k8s:ns:billing", "k8s:sa:api"],
         "hint": "billing", "x509_ttl": "30m", "jwt_ttl": "2m"},
        {"spiffe_id": "spiffe://prod.acme.io/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"]},
        {"spiffe_id": "spiffe://prod.acme.io/uid/{unix:uid}", "selectors": ["unix:uid"]},
    ]
    assert cfg["log"] == {"level": "tessera_agent=debug", "format": "text"}
    assert cfg["authority"] == {
        "ca_cert_file": "/etc/tessera/ca/tls.crt", "ca_key_file": "/etc/tessera/ca/tls.key",
        "jwt_key_ttl": "24h", "jwt_key_type": "rsa-2048", "persist": True,
    }
    assert "spiffe://prod.acme.io/billing" in rendered["custom"]["tessera/templates/NOTES.txt"]


def test_custom_scheduling_and_ca_secret(manifests):
    docs = manifests["custom"]
    spec = agent_pod(docs)["spec"]
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "agents", "effect": "NoSchedule"}]
    assert "priorityClassName" not in spec
    assert agent_pod(docs)["metadata"]["labels"]["team"] == "platform"
    assert volume(spec, "ca")["secret"] == {"secretName": "tessera-ca", "defaultMode": 0o400}
    assert mount(agent_container(docs), "ca") == {"name": "ca", "mountPath": "/etc/tessera/ca", "readOnly": True}
    assert {"name": "RUST_BACKTRACE", "value": "1"} in agent_container(docs)["env"]


def test_custom_run_as_user(manifests):
    docs = manifests["custom"]
    spec = agent_pod(docs)["spec"]
    sc = agent_container(docs)["securityContext"]
    assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001 and sc["runAsNonRoot"] is True
    # Added capabilities would not reach a non-root process: none are requested.
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == 10001
    (init,) = spec["initContainers"]
    assert init["command"] == ["chown", "10001:10001", "/run/tessera/sockets", "/run/tessera/admin"]
    assert init["image"] == "busybox:1.37.0"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert mount(init, "sockets")["mountPath"] == "/run/tessera/sockets"
    skips = " ".join(one(docs, "DaemonSet")["metadata"]["annotations"].values())
    assert "CKV_K8S_40" not in skips  # UID 10001 is a high UID


def test_readonly_port_and_host_network(manifests, rendered):
    docs = manifests["readonly-hostnetwork"]
    cfg = config_toml(docs)
    assert cfg["attestor"]["k8s"] == {
        "enabled": True, "kubelet_host_env": "HOST_IP", "read_only_port": 10255,
        "poll_attempts": 60, "poll_interval": "500ms", "request_timeout": "10s",
    }
    assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)
    spec = agent_pod(docs)["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["hostPID"] is True
    assert "NetworkPolicy" not in kinds(docs) and "Pod" not in kinds(docs)
    assert "read-only port 10255" in rendered["readonly-hostnetwork"]["tessera/templates/NOTES.txt"]


def test_unix_only(manifests):
    docs = manifests["unix-only"]
    assert config_toml(docs)["attestor"]["k8s"] == {"enabled": False}
    assert "ClusterRole" not in kinds(docs)
    assert agent_pod(docs)["spec"]["automountServiceAccountToken"] is False
    assert one(docs, "NetworkPolicy", "tessera-unix-only")["spec"]["egress"] == []


def test_toml_strings_are_escaped(chart):
    """A value with quotes, backslashes or newlines cannot break out of its TOML string."""
    nasty = 'info"\n[admin]\nlisten = "0.0.0.0:1"\\'
    docs = docs_of(render_files(chart, {"log": {"level": nasty}, "exchange": {"issuer": nasty}, "entries": [
        {"spiffe_id": "/a", "selectors": ['unix:path:/opt/"x"\\y'], "hint": "h\u2028i"}]}))
    cfg = config_toml(docs)
    assert cfg["log"]["level"] == nasty
    assert cfg["exchange"]["issuer"] == nasty
    assert cfg["admin"] == {"listen": "0.0.0.0:9090", "socket_path": "/run/tessera/admin/admin.sock"}
    assert cfg["entries"][0]["selectors"] == ['unix:path:/opt/"x"\\y']
    assert cfg["entries"][0]["hint"] == "h\u2028i"


def test_service_account_name_override(chart):
    docs = docs_of(render_files(chart, {"serviceAccount": {"create": False, "name": "existing"}}))
    assert "ServiceAccount" not in kinds(docs)
    assert agent_pod(docs)["spec"]["serviceAccountName"] == "existing"
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "existing"


def test_on_delete_update_strategy(chart):
    docs = docs_of(render_files(chart, {"updateStrategy": {"type": "OnDelete"}}))
    assert one(docs, "DaemonSet")["spec"]["updateStrategy"] == {"type": "OnDelete"}


# ---------------------------------------------------------------- token exchange


def test_default_exchange_policies_configmap_is_empty(manifests, rendered):
    """Exchange on, no policies: an empty ConfigMap is mounted (deny all), and
    the install notes say so."""
    docs = manifests["default"]
    cm = policies_cm(docs)
    assert cm["metadata"]["name"] == "tessera-default-policies"
    assert cm["metadata"]["namespace"] == release("default")[1]
    assert cm.get("data") == {}
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "policies") == {"name": "policies", "configMap": {"name": "tessera-default-policies"}}
    assert mount(agent_container(docs), "policies") == {
        "name": "policies", "mountPath": "/etc/tessera/policies", "readOnly": True,
    }
    assert config_toml(docs)["exchange"]["policy_dir"] == "/etc/tessera/policies"
    notes = rendered["default"]["tessera/templates/NOTES.txt"]
    assert "every token exchange is DENIED" in notes
    assert "exchange.policies" in notes
    assert "unix:///spiffe-workload-api/exchange.sock" in notes
    assert "tessera approvals list --admin-socket /run/tessera/admin/admin.sock" in notes
    assert "dataDir.type=emptyDir" in notes and "audit log, revocation state and signing keys" in notes


def test_default_admin_socket_mount(manifests):
    docs = manifests["default"]
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "admin-socket")["hostPath"] == {"path": "/run/tessera/admin", "type": "DirectoryOrCreate"}
    m = mount(agent_container(docs), "admin-socket")
    assert m == {"name": "admin-socket", "mountPath": "/run/tessera/admin"}
    # Outside the workload socket directory, in the container and on the host.
    sockets = mount(agent_container(docs), "sockets")["mountPath"]
    assert not (m["mountPath"] + "/").startswith(sockets + "/")
    assert config_toml(docs)["admin"]["socket_path"] == m["mountPath"] + "/admin.sock"


def test_exchange_inline_policies(manifests, rendered):
    docs = manifests["exchange-inline"]
    cm = policies_cm(docs)
    assert cm["metadata"]["name"] == "tessera-exchange-inline-policies"
    assert cm["data"] == EXCHANGE_POLICIES  # byte for byte: quotes, backslash, non-ASCII
    assert volume(agent_pod(docs)["spec"], "policies")["configMap"] == {"name": cm["metadata"]["name"]}
    cfg = config_toml(docs)
    assert cfg["exchange"] == {
        "policy_dir": "/etc/tessera/policies",
        "policy_reload_interval": "200ms",
        "issuer": "https://tessera.example/issuer",
        "max_ttl": "10m",
        "default_ttl": "2m",
        "max_delegation_depth": 1,
        "approval_timeout": "3m",
        "approval_grant_ttl": "1m",
        "approval_poll_interval": "1s",
    }
    assert cfg["admin"]["socket_path"] == "/run/tessera/admin/admin.sock"
    # The host directory moves; the container path (and so the config) does not.
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "admin-socket")["hostPath"] == {"path": "/var/run/tessera-admin", "type": "DirectoryOrCreate"}
    assert mount(agent_container(docs), "admin-socket")["mountPath"] == "/run/tessera/admin"
    notes = rendered["exchange-inline"]["tessera/templates/NOTES.txt"]
    assert "10-notes-read.cedar, 20-forbid-delete.cedar" in notes
    assert "DENIED" not in notes
    assert "/var/run/tessera-admin/admin.sock" in notes
    assert "dataDir.type=emptyDir" not in notes  # hostPath data: durable audit log


def test_exchange_existing_configmap(manifests, rendered):
    docs = manifests["exchange-existing-cm"]
    assert policies_cm(docs) is None
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"] == ["tessera-exchange-existing-cm"]
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "policies") == {"name": "policies", "configMap": {"name": "team-policies"}}
    assert mount(agent_container(docs), "policies")["readOnly"] is True
    assert config_toml(docs)["exchange"]["policy_dir"] == "/etc/tessera/policies"
    # A non-root agent cannot create its socket in the kubelet-created,
    # root-owned host directory: the init container hands it over.
    (init,) = pod["initContainers"]
    assert init["command"] == ["chown", "10001:10001", "/run/tessera/sockets", "/run/tessera/admin"]
    assert mount(init, "admin-socket")["mountPath"] == "/run/tessera/admin"
    notes = rendered["exchange-existing-cm"]["tessera/templates/NOTES.txt"]
    assert "ConfigMap team-policies" in notes and "DENIED" not in notes


def test_exchange_disabled(manifests, rendered):
    docs = manifests["exchange-off"]
    cfg = config_toml(docs)
    assert "exchange" not in cfg
    assert cfg["admin"] == {"listen": "0.0.0.0:9090"}
    assert policies_cm(docs) is None
    pod = agent_pod(docs)["spec"]
    assert {v["name"] for v in pod["volumes"]} == {"config", "sockets", "data"}
    assert {m["name"] for m in agent_container(docs)["volumeMounts"]} == {"config", "sockets", "data"}
    notes = rendered["exchange-off"]["tessera/templates/NOTES.txt"]
    assert "Token exchange" not in notes and "exchange.sock" not in notes and "approvals" not in notes


def test_policy_edits_do_not_restart_the_agents(chart):
    """Policies hot-reload: changing them must not change the pod template
    (no checksum of them), while exchange settings in the config still roll
    the pods through checksum/config."""
    def pod_template(values):
        return agent_pod(docs_of(render_files(chart, values)))

    base = pod_template({"exchange": {"policies": {"a.cedar": "permit (principal, action, resource);"}}})
    edited = pod_template({"exchange": {"policies": {
        "a.cedar": "forbid (principal, action, resource);", "b.cedar": "// new file"}}})
    assert base == edited
    none = pod_template({})
    assert none == base  # from no policies to some: no restart either
    assert not [k for k in base["metadata"]["annotations"] if "polic" in k]
    assert set(base["metadata"]["annotations"]) == {"checksum/config"}
    ttl = pod_template({"exchange": {"maxTTL": "5m"}})
    assert ttl["metadata"]["annotations"]["checksum/config"] != base["metadata"]["annotations"]["checksum/config"]


@pytest.mark.parametrize("admin_dir", [
    "/run/tessera/sockets",
    "/run/tessera/sockets/",
    "/run/tessera/sockets/admin",
    "/run/tessera/sockets//deep/admin/",
    "/run/tessera/x/../sockets/admin",
])
def test_render_refuses_admin_socket_inside_socket_dir(chart, admin_dir):
    with pytest.raises(helm_python.HelmRenderError, match=r"admin\.socketHostPath .* is inside socket\.hostPath"):
        render_files(chart, {"admin": {"socketHostPath": admin_dir}})


def test_render_refuses_admin_socket_inside_custom_socket_dir(chart):
    with pytest.raises(helm_python.HelmRenderError, match="workload that mounts the socket directory"):
        render_files(chart, {"socket": {"hostPath": "/srv/spiffe/"}, "admin": {"socketHostPath": "/srv/spiffe/ops"}})


@pytest.mark.parametrize("admin_dir", ["/run/tessera/sockets-admin", "/run/tessera", "/run/tessera-admin"])
def test_admin_socket_beside_the_socket_dir_is_fine(chart, admin_dir):
    docs = docs_of(render_files(chart, {"admin": {"socketHostPath": admin_dir}}))
    assert volume(agent_pod(docs)["spec"], "admin-socket")["hostPath"]["path"] == admin_dir


def test_render_refuses_exchange_socket_name_clash(chart):
    with pytest.raises(helm_python.HelmRenderError, match="exchange.sock"):
        render_files(chart, {"socket": {"fileName": "exchange.sock"}})
    # Without the exchange the name is free.
    render_files(chart, {"socket": {"fileName": "exchange.sock"}, "exchange": {"enabled": False}})


def test_render_refuses_both_policy_sources(chart):
    with pytest.raises(helm_python.HelmRenderError, match="not both"):
        render_files(chart, {"exchange": {"existingPolicyConfigMap": "p", "policies": {"a.cedar": ""}}})


# ---------------------------------------------------------------- the authority


def test_authority_off_by_default(manifests, rendered):
    """authority.enabled=false (the default) renders nothing of it and leaves
    the agents as they were: no [upstream], no upstream volumes."""
    for name in VALUE_SETS:
        if name in AUTHORITY_SETS:
            continue
        docs = manifests[name]
        assert not [d for d in docs if is_authority(d)], name
        assert not {"Deployment", "PodDisruptionBudget"} & set(kinds(docs)), name
        assert "upstream" not in config_toml(docs), name
        names = {v["name"] for v in agent_pod(docs)["spec"]["volumes"]}
        assert not {"upstream-bundle", "upstream-token"} & names, name
        assert not [f for f, text in rendered[name].items() if "authority-" in f and text.strip()], name


def test_authority_kinds(manifests):
    docs = manifests["authority"]
    assert kinds([d for d in docs if is_authority(d)]) == sorted([
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "NetworkPolicy",
        "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount",
    ])
    rel, ns = release("authority")
    for d in docs:
        if is_authority(d):
            assert d["metadata"]["name"] == f"{rel}-authority"
            if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                assert d["metadata"]["namespace"] == ns
    # The agent side is all still there.
    assert kinds([d for d in docs if not is_authority(d)]) == kinds(manifests["default"])


@pytest.mark.parametrize("name", ["authority", "authority-custom"])
def test_authority_rbac_is_exactly_tokenreviews_and_pods(manifests, name):
    docs = manifests[name]
    role = auth_one(docs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        # Live registration: read the entries, write only their status.
        {"apiGroups": ["tessera.dev"], "resources": ["clusterworkloadentries", "workloadentries"],
         "verbs": ["list", "watch"]},
        {"apiGroups": ["tessera.dev"],
         "resources": ["clusterworkloadentries/status", "workloadentries/status"], "verbs": ["patch"]},
    ]
    binding = auth_one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"],
    }
    sa = auth_one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert authority_pod(docs)["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # The agent's own role is unchanged: get on the kubelet subresource only.
    agent_roles = [d for d in docs if d["kind"] == "ClusterRole" and not is_authority(d)]
    assert [r["rules"] for r in agent_roles] == [[{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]]
    # Every verb the whole release is granted, in any role.
    verbs = {(g, r, v) for d in docs if d["kind"] in ("ClusterRole", "Role")
             for rule in d["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert verbs == {("authentication.k8s.io", "tokenreviews", "create"), ("", "pods", "get"),
                     ("", "pods", "list"), ("", "nodes/pods", "get"),
                     *{("tessera.dev", "revocationbatches", v)
                       for v in ("create", "list", "watch", "deletecollection")},
                     *{("tessera.dev", r, v) for r in ("clusterworkloadentries", "workloadentries")
                       for v in ("list", "watch")},
                     ("tessera.dev", "clusterworkloadentries/status", "patch"),
                     *{("tessera.dev", "jointokens", v) for v in ("get", "list", "delete")},
                     ("tessera.dev", "nodedenials", "list"), ("tessera.dev", "nodedenials", "watch"),
                     *{("tessera.dev", "federatedbundles", v) for v in ("list", "create", "patch", "delete")},
                     ("tessera.dev", "workloadentries/status", "patch")}
    # The fleet's state: a Role in the release namespace only, bound to the authority.
    role = auth_one(docs, "Role")
    assert role["metadata"]["namespace"] == sa["metadata"]["namespace"]
    binding = auth_one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]


def test_authority_rbac_follows_rbac_create(chart):
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["rbac"] = {"create": False}
    docs = docs_of(render_files(chart, values))
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds(docs))
    assert "Deployment" in kinds(docs)


def test_authority_fleet_state_can_be_turned_off(chart):
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["authority"]["fleetState"] = {"enabled": False, "batchWindow": "50ms"}
    docs = docs_of(render_files(chart, values))
    assert not {"Role", "RoleBinding"} & set(kinds(docs))
    assert "store" not in authority_config_toml(docs)["server"]


def test_authority_approvals_are_opt_in(chart, manifests):
    assert "approvals" not in authority_config_toml(manifests["authority"])["server"]["store"]
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["authority"]["approvals"] = {"enabled": True}
    docs = docs_of(render_files(chart, values))
    assert authority_config_toml(docs)["server"]["store"]["approvals"] is True
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert any("request.userInfo.username" in v["expression"] for v in vap["spec"]["validations"])
    role = auth_one(docs, "Role")
    assert {"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"],
            "verbs": ["create", "list", "watch", "delete"]} in role["rules"]


def test_authority_federation_values(chart):
    values = copy.deepcopy(VALUE_SETS["authority"])
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    values["authority"]["federation"] = {
        "bundleEndpoint": {"enabled": True, "port": 8444, "refreshHint": "2m",
                           "serviceType": "LoadBalancer", "servicePort": 443},
        "relationships": [
            {"trustDomain": "partner.example", "bundleEndpointUrl": "https://bundle.partner.example/",
             "endpointSpiffeId": "spiffe://partner.example/tessera/bundle-endpoint", "bootstrapBundle": pem},
            {"trustDomain": "web.example", "bundleEndpointUrl": "https://web.example/bundle", "profile": "https_web"},
        ],
        "egressPorts": [443, 8443],
    }
    values["entries"] = [{"spiffe_id": "/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"],
                          "federates_with": ["partner.example"], "wit_ttl": "30m"}]
    docs = docs_of(render_files(chart, values))
    auth = authority_config_toml(docs)
    assert auth["bundle_endpoint"] == {"listen": "0.0.0.0:8444", "profile": "https_spiffe", "refresh_hint": "2m"}
    assert auth["federation"] == [
        {"trust_domain": "partner.example", "bundle_endpoint_url": "https://bundle.partner.example/",
         "bundle_endpoint_profile": "https_spiffe",
         "endpoint_spiffe_id": "spiffe://partner.example/tessera/bundle-endpoint",
         "bootstrap_bundle": "/etc/tessera-authority/federation-partner.example.pem"},
        {"trust_domain": "web.example", "bundle_endpoint_url": "https://web.example/bundle",
         "bundle_endpoint_profile": "https_web"},
    ]
    assert auth["entries"][0]["federates_with"] == ["partner.example"]
    assert auth["entries"][0]["wit_ttl"] == "30m"
    # The agents get the same entries (upstream mode: any federated name).
    assert config_toml(docs)["entries"][0]["federates_with"] == ["partner.example"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "authority.toml" in (d.get("data") or {})]
    assert cm["data"]["federation-partner.example.pem"] == pem
    assert "federation-web.example.pem" not in cm["data"]
    ports = {p["name"]: p["containerPort"] for p in authority_container(docs)["ports"]}
    assert ports["bundle"] == 8444
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-authority-bundle")]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "bundle", "port": 443, "targetPort": "bundle", "protocol": "TCP"}]
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and is_authority(d)]
    assert {"ports": [{"protocol": "TCP", "port": 8444}]} in np["spec"]["ingress"]
    assert {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}]} in np["spec"]["egress"]
    assert any(p["port"] == 53 for rule in np["spec"]["egress"] for p in rule["ports"])


def test_authority_federation_is_off_by_default(manifests):
    docs = manifests["authority"]
    auth = authority_config_toml(docs)
    assert "bundle_endpoint" not in auth and "federation" not in auth
    assert not [d for d in docs if d["metadata"]["name"].endswith("-authority-bundle")]
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and is_authority(d)]
    assert not any(p["port"] == 53 for rule in np["spec"]["egress"] for p in rule["ports"])


def test_authority_registration_can_be_narrowed_or_turned_off(chart):
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["authority"]["registration"] = {"enabled": True, "namespaced": False}
    docs = docs_of(render_files(chart, values))
    assert authority_config_toml(docs)["server"]["registration"] == {"kind": "kubernetes", "namespaced": False}
    granted = {r for rule in auth_one(docs, "ClusterRole")["rules"] for r in rule["resources"]}
    assert "workloadentries" not in granted and "clusterworkloadentries" in granted
    values["authority"]["registration"] = {"enabled": False, "namespaced": True}
    docs = docs_of(render_files(chart, values))
    assert "registration" not in authority_config_toml(docs)["server"]
    granted = {r for rule in auth_one(docs, "ClusterRole")["rules"] for r in rule["resources"]}
    assert granted == {"tokenreviews", "pods"}


def test_authority_federation_relationships_as_objects_are_opt_in(chart, manifests):
    docs = manifests["authority"]
    assert "federation" not in authority_config_toml(docs)["server"]["registration"]
    granted = {r for rule in auth_one(docs, "ClusterRole")["rules"] for r in rule["resources"]}
    assert not {"federationrelationships", "federationrelationships/status"} & granted
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["authority"]["registration"] = {"enabled": True, "namespaced": True, "federation": True}
    docs = docs_of(render_files(chart, values))
    assert authority_config_toml(docs)["server"]["registration"]["federation"] is True
    rules = auth_one(docs, "ClusterRole")["rules"]
    assert {"apiGroups": ["tessera.dev"], "resources": ["federationrelationships"],
            "verbs": ["list", "watch"]} in rules
    status = [r for r in rules if "federationrelationships/status" in r["resources"]]
    assert [r["verbs"] for r in status] == [["patch"]]
    # Relationships may name any endpoint: egress to egressPorts and DNS.
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and is_authority(d)]
    assert any(p["port"] == 53 for rule in np["spec"]["egress"] for p in rule["ports"])
    assert any(p["port"] == 443 for rule in np["spec"]["egress"] for p in rule["ports"])


def secret_names(pod_spec: dict) -> set[str]:
    """Every Secret a pod spec can read: secret volumes and projected secret sources."""
    out = {v["secret"]["secretName"] for v in pod_spec.get("volumes", []) if "secret" in v}
    for v in pod_spec.get("volumes", []):
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                out.add(src["secret"]["name"])
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                out.add(ref["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                out.add(e["secretRef"]["name"])
    return out


@pytest.mark.parametrize("name", ["authority", "authority-custom"])
def test_agents_never_mount_the_authority_keys(manifests, name):
    docs = manifests[name]
    keys = VALUE_SETS[name]["authority"]["keysSecret"]
    pod = agent_pod(docs)
    # No Secret at all reaches the agents in upstream mode (no CA either).
    assert secret_names(pod["spec"]) == set()
    assert keys not in yaml.safe_dump(one(docs, "DaemonSet"))
    assert keys not in config_text(docs)
    # The keys go to the authority, read-only, and to no other pod.
    apod = authority_pod(docs)["spec"]
    assert secret_names(apod) == {keys}
    assert volume(apod, "keys")["secret"] == {"secretName": keys, "defaultMode": 0o440}
    assert mount(authority_container(docs), "keys") == {
        "name": "keys", "mountPath": "/etc/tessera-authority/keys", "readOnly": True,
    }
    pods = [d for d in docs if d["kind"] in ("Pod", "DaemonSet", "Deployment")]
    holders = [d["metadata"]["name"] for d in pods
               if keys in secret_names(d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"])]
    assert holders == [one(docs, "Deployment")["metadata"]["name"]]
    # The agents' bootstrap bundle is the CA certificate from the ConfigMap, nothing else of it.
    bundle = VALUE_SETS[name]["authority"]["bundleConfigMap"]
    assert volume(pod["spec"], "upstream-bundle")["configMap"] == {
        "name": bundle, "items": [{"key": "bundle.pem", "path": "bundle.pem"}],
    }


def test_render_refuses_agents_with_a_ca_key_in_upstream_mode(chart):
    """authority.caSecret would mount a CA key into every agent: refused with the authority on."""
    values = copy.deepcopy(VALUE_SETS["custom"])
    values["authority"].update(enabled=True, keysSecret=AUTHORITY_KEYS, bundleConfigMap=AUTHORITY_BUNDLE)
    with pytest.raises(helm_python.HelmRenderError, match="authority.caSecret and authority.enabled exclude each other"):
        render_files(chart, values)


def test_upstream_agent_config_and_volumes(chart, manifests):
    docs = manifests["authority"]
    rel, ns = release("authority")
    cfg = config_toml(docs)
    assert cfg["upstream"] == {
        "addresses": [f"{rel}-authority.{ns}.svc:8443"],
        "server_name": "tessera-authority",
        "bundle_file": "/etc/tessera/upstream/bundle.pem",
        "node_attestation": "k8s_psat",
        "token_file": "/var/run/secrets/tessera/token",
        "bundle_refresh": "10s",
    }
    svc = auth_one(docs, "Service")
    assert cfg["upstream"]["addresses"][0].split(".")[0] == svc["metadata"]["name"]
    pod = agent_pod(docs)["spec"]
    assert volume(pod, "upstream-token")["projected"] == {"sources": [{"serviceAccountToken": {
        "audience": "tessera-authority", "expirationSeconds": 600, "path": "token"}}]}
    c = agent_container(docs)
    assert mount(c, "upstream-token") == {"name": "upstream-token", "mountPath": "/var/run/secrets/tessera", "readOnly": True}
    assert mount(c, "upstream-bundle") == {"name": "upstream-bundle", "mountPath": "/etc/tessera/upstream", "readOnly": True}
    assert (mount(c, "upstream-token")["mountPath"] + "/token" == cfg["upstream"]["token_file"])
    assert (mount(c, "upstream-bundle")["mountPath"] + "/bundle.pem" == cfg["upstream"]["bundle_file"])
    # No local CA in upstream mode (the agent refuses [authority] ca_ttl or CA
    # files with [upstream], and jwt_key_type: the authority's jwt.key
    # decides); the JWT key lifetime stays.
    assert cfg["authority"] == {"jwt_key_ttl": "24h", "persist": True}
    # Apart from that, the agent config is what the same values render without the authority.
    without = copy.deepcopy(VALUE_SETS["authority"])
    without["authority"] = {"enabled": False}
    plain = config_toml(docs_of(render_files(chart, without, "authority")))
    cfg.pop("upstream")
    plain["authority"].pop("ca_ttl")
    plain["authority"].pop("jwt_key_type")
    assert cfg == plain


def test_upstream_agent_config_custom(manifests):
    docs = manifests["authority-custom"]
    rel, ns = release("authority-custom")
    cfg = config_toml(docs)
    assert cfg["upstream"]["addresses"] == [f"{rel}-authority.{ns}.svc:9443"]
    assert volume(agent_pod(docs)["spec"], "upstream-token")["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "spiffe://prod.acme.io/authority", "expirationSeconds": 600, "path": "token"}
    assert "exchange" not in cfg


@pytest.mark.parametrize("name", ["authority", "authority-custom"])
def test_authority_config_has_the_agents_entries(manifests, name):
    docs = manifests[name]
    agent, auth = config_toml(docs), authority_config_toml(docs)
    assert auth["entries"] == agent["entries"]
    assert auth["entries"] and len(auth["entries"]) == len(VALUE_SETS[name].get("entries", [{}]))
    for key in ("trust_domain", "svid", "log"):
        assert auth[key] == agent[key], key
    assert auth["admin"] == {"listen": agent["admin"]["listen"]}
    https = {"https"} if VALUE_SETS[name].get("https", {}).get("enabled") else set()
    assert set(auth) == {"trust_domain", "svid", "entries", "server", "admin", "log"} | https


def test_authority_config_toml(manifests):
    docs = manifests["authority"]
    rel, ns = release("authority")
    auth = authority_config_toml(docs)
    assert auth["trust_domain"] == "prod.acme.io"
    assert auth["entries"][1]["spiffe_id"] == "spiffe://prod.acme.io/ns/{k8s:ns}/sa/{k8s:sa}"
    assert auth["server"] == {
        "listen": "0.0.0.0:8443",
        "keys_dir": "/etc/tessera-authority/keys",
        "server_name": "tessera-authority",
        "node_svid_ttl": "1h",
        "ca_publish_lead": "10m",
        "audit_log": "/var/lib/tessera-authority/audit.jsonl",
        "kubernetes": {
            "enabled": True,
            "ca_file": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "token_file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "audience": "tessera-authority",
            "allowed_service_accounts": [f"{ns}:{agent_one(docs, 'ServiceAccount')['metadata']['name']}"],
        },
        "store": {"kind": "kubernetes", "namespace": ns, "batch_window": "50ms"},
        "registration": {"kind": "kubernetes", "namespaced": True},
    }
    assert auth["server"]["kubernetes"]["allowed_service_accounts"] == [f"{ns}:{rel}"]
    assert auth["admin"] == {"listen": "0.0.0.0:9090"}
    # The agents' token audience is the one the authority accepts; its name is the one they verify.
    assert config_toml(docs)["upstream"]["server_name"] == auth["server"]["server_name"]


def test_authority_config_custom(manifests):
    docs = manifests["authority-custom"]
    _, ns = release("authority-custom")
    auth = authority_config_toml(docs)
    server = auth["server"]
    assert server["listen"] == "0.0.0.0:9443"
    assert server["node_svid_ttl"] == "30m" and server["ca_publish_lead"] == "1h"
    assert server["kubernetes"]["audience"] == "spiffe://prod.acme.io/authority"
    assert server["kubernetes"]["allowed_service_accounts"] == [f"{ns}:node-agent"]
    assert agent_pod(docs)["spec"]["serviceAccountName"] == "node-agent"
    assert auth["admin"] == {"listen": "0.0.0.0:9464"}
    assert auth["log"] == {"level": "debug", "format": "text"}


def test_authority_deployment(manifests):
    docs = manifests["authority"]
    dep = auth_one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    tpl = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == tpl["metadata"]["labels"]
    assert tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "authority"
    # Its selector does not catch the agents, nor theirs it.
    agent_sel = one(docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert not agent_sel.items() <= tpl["metadata"]["labels"].items()
    spec = tpl["spec"]
    assert spec["automountServiceAccountToken"] is True
    for host in ("hostPID", "hostNetwork", "hostIPC"):
        assert not spec.get(host, False), host
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    assert {v["name"] for v in spec["volumes"]} == {"config", "keys", "audit"}
    # The audit log's only writable place: a bounded emptyDir.
    audit = next(v for v in spec["volumes"] if v["name"] == "audit")
    assert audit["emptyDir"]["sizeLimit"]
    assert "initContainers" not in spec and "priorityClassName" not in spec
    assert spec["securityContext"] == {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True,
                                       "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    c = authority_container(docs)
    assert c["image"] == agent_container(docs)["image"] == "tessera:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] + c["args"] == ["tessera", "authority", "run", "--config", "/etc/tessera-authority/authority.toml"]
    assert "env" not in c
    assert c["securityContext"] == {
        "runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["ports"] == [{"name": "server", "containerPort": 8443, "protocol": "TCP"},
                          {"name": "admin", "containerPort": 9090, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert mount(c, "config") == {"name": "config", "mountPath": "/etc/tessera-authority", "readOnly": True}
    assert volume(spec, "config")["configMap"] == {"name": auth_one(docs, "ConfigMap")["metadata"]["name"]}
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "tolerations" not in spec
    # Default: a soft anti-affinity spreading the replicas over nodes.
    assert spec["affinity"] == {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}}]}}


def test_authority_deployment_custom(manifests):
    docs = manifests["authority-custom"]
    values = VALUE_SETS["authority-custom"]["authority"]
    dep = auth_one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    spec = dep["spec"]["template"]["spec"]
    assert spec["affinity"] == values["affinity"]
    assert spec["tolerations"] == values["tolerations"]
    # Helm merges a values map into the default one: kubernetes.io/os stays.
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", **values["nodeSelector"]}
    assert not spec.get("hostNetwork", False)  # the agents' hostNetwork is theirs only
    c = authority_container(docs)
    assert c["image"] == f"registry.example.com/tessera@{DIGEST}" and c["imagePullPolicy"] == "Always"
    assert c["resources"] == values["resources"]
    assert c["ports"][0]["containerPort"] == 9443 and c["ports"][1]["containerPort"] == 9464
    assert spec["securityContext"]["runAsUser"] == 65532  # not the agents' securityContext
    # A digest, Always and a CPU limit: only the token skip is left.
    skips = [v for k, v in dep["metadata"]["annotations"].items() if k.startswith("checkov.io/skip")]
    assert [s.split("=")[0] for s in skips] == ["CKV_K8S_38"]
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2


def test_authority_service_and_pdb(manifests):
    docs = manifests["authority"]
    sel = auth_one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    svc = auth_one(docs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in svc["spec"]
    assert svc["spec"]["selector"] == sel
    assert svc["spec"]["ports"] == [{"name": "server", "port": 8443, "targetPort": "server", "protocol": "TCP"}]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": sel}}


def test_authority_network_policies(manifests):
    docs = manifests["authority"]
    rel, _ = release("authority")
    auth_sel = auth_one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    agent_sel = one(docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    agent_np = agent_one(docs, "NetworkPolicy", rel)
    assert agent_np["spec"]["egress"] == [
        {"ports": [{"protocol": "TCP", "port": 10250}]},
        {"to": [{"podSelector": {"matchLabels": auth_sel}}], "ports": [{"protocol": "TCP", "port": 8443}]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
    np = auth_one(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"] == {"matchLabels": auth_sel}
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert np["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8443}], "from": [{"podSelector": {"matchLabels": agent_sel}}]},
        {"ports": [{"protocol": "TCP", "port": 9090}]},
    ]
    assert np["spec"]["egress"] == [{"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}]


def test_https_face_at_the_authority(chart, manifests):
    """https.enabled: the authority's config gets the [https] table (the
    certificate from the Secret, mounted read-only into the authority and no
    other pod), its pod the port, a Service of the configured type in front,
    and its NetworkPolicy admits the port from any source; the agents'
    config does not change."""
    docs = manifests["authority-https"]
    auth = authority_config_toml(docs)
    assert auth["https"] == {
        "listen": "0.0.0.0:10443",
        "issuer": "https://tessera.example.com",
        "cert_file": "/etc/tessera-authority/https/tls.crt",
        "key_file": "/etc/tessera-authority/https/tls.key",
        "reload_interval": "30s",
    }
    c = authority_container(docs)
    assert {"name": "https", "containerPort": 10443, "protocol": "TCP"} in c["ports"]
    assert mount(c, "https-cert") == {"name": "https-cert", "mountPath": "/etc/tessera-authority/https", "readOnly": True}
    apod = authority_pod(docs)["spec"]
    assert volume(apod, "https-cert")["secret"] == {"secretName": HTTPS_TLS_SECRET, "defaultMode": 0o440}
    pods = [d for d in docs if d["kind"] in ("Pod", "DaemonSet", "Deployment")]
    holders = [d["metadata"]["name"] for d in pods
               if HTTPS_TLS_SECRET in secret_names(d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"])]
    assert holders == [one(docs, "Deployment")["metadata"]["name"]]

    rel, _ = release("authority-https")
    svc = one(docs, "Service", "-authority-https")
    assert svc["metadata"]["name"] == f"{rel}-authority-https"
    assert svc["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert svc["spec"]["selector"] == auth_one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]

    np = auth_one(docs, "NetworkPolicy")
    assert {"ports": [{"protocol": "TCP", "port": 10443}]} in np["spec"]["ingress"]
    # The agents are as without the face.
    base = copy.deepcopy(VALUE_SETS["authority-https"])
    del base["https"]
    assert config_toml(docs) == config_toml(docs_of(render_files(chart, base, "authority-https")))


def test_https_face_with_a_certificate_from_the_trust_domain(chart):
    """Without tls.secretName the trust domain's CA issues the certificate:
    no files in the config, no Secret mounted; serverName and the Service
    defaults (ClusterIP, 443) render as given; https.from limits the sources."""
    values = copy.deepcopy(VALUE_SETS["authority"])
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    values["https"] = {"enabled": True, "issuer": "https://tessera.example.com/prod", "serverName": "tessera.internal",
                       "from": peers}
    docs = docs_of(render_files(chart, values))
    assert authority_config_toml(docs)["https"] == {
        "listen": "0.0.0.0:10443", "issuer": "https://tessera.example.com/prod", "server_name": "tessera.internal",
    }
    assert "https-cert" not in {v["name"] for v in authority_pod(docs)["spec"]["volumes"]}
    svc = one(docs, "Service", "-authority-https")
    assert svc["spec"]["type"] == "ClusterIP" and "loadBalancerSourceRanges" not in svc["spec"]
    assert svc["spec"]["ports"][0]["port"] == 443
    np = auth_one(docs, "NetworkPolicy")
    assert {"ports": [{"protocol": "TCP", "port": 10443}], "from": peers} in np["spec"]["ingress"]


def test_https_face_off_by_default(manifests):
    for name in VALUE_SETS:
        if VALUE_SETS[name].get("https", {}).get("enabled"):
            continue
        docs = manifests[name]
        assert not [d for d in docs if d["metadata"]["name"].endswith("-https")], name
        if name in AUTHORITY_SETS:
            assert "https" not in authority_config_toml(docs), name
            assert "https" not in {p["name"] for p in authority_container(docs)["ports"]}, name


@pytest.mark.parametrize("values, message", [
    ({"https": {"enabled": True, "issuer": "https://tessera.example.com"}},
     "https.enabled=true needs authority.enabled=true"),
    ({"https": {"enabled": True}, "authority": {"enabled": True, "keysSecret": "k", "bundleConfigMap": "b"}},
     "https.enabled=true needs https.issuer"),
    ({"https": {"enabled": True, "issuer": "https://t.example", "port": 9090},
      "authority": {"enabled": True, "keysSecret": "k", "bundleConfigMap": "b"}},
     "https.port 9090 is taken"),
])
def test_render_refuses_a_face_it_cannot_serve(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render_files(chart, values)


def test_authority_network_policies_host_network_agents(manifests):
    docs = manifests["authority-custom"]
    np = auth_one(docs, "NetworkPolicy")
    # Agents on the host network come from node IPs: no podSelector can name them.
    assert np["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9443}]},
                                     {"ports": [{"protocol": "TCP", "port": 9464}]}]
    assert np["spec"]["egress"] == [{"ports": [{"protocol": "TCP", "port": 6443}]}]


def test_authority_without_network_policies(chart):
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["networkPolicy"] = {"enabled": False}
    docs = docs_of(render_files(chart, values))
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"] == ["tessera-default-test"]
    skips = " ".join(one(docs, "Deployment")["metadata"]["annotations"].values())
    assert "CKV2_K8S_6=" in skips


def test_authority_notes(rendered):
    rel, ns = release("authority")
    notes = rendered["authority"]["tessera/templates/NOTES.txt"]
    assert f"Deployment {rel}-authority (2 replicas)" in notes
    assert f"{rel}-authority.{ns}.svc:8443" in notes
    assert f"Secret {AUTHORITY_KEYS} (mounted in the authority only)" in notes
    assert f"ConfigMap {AUTHORITY_BUNDLE} (bundle.pem)" in notes
    assert "without authority.caSecret" not in notes


def test_authority_checksums(chart):
    def pods(values):
        docs = docs_of(render_files(chart, values))
        return agent_pod(docs)["metadata"]["annotations"]["checksum/config"], \
            authority_pod(docs)["metadata"]["annotations"]["checksum/config"]

    base = VALUE_SETS["authority"]
    agent, auth = pods(base)
    # An authority setting rolls the authority, not the agents.
    a2, b2 = pods({**base, "authority": {**base["authority"], "nodeSvidTtl": "2h"}})
    assert a2 == agent and b2 != auth
    # An entry rolls both: they carry the same list.
    a3, b3 = pods({**base, "entries": base["entries"][:1]})
    assert a3 != agent and b3 != auth
    # Turning the authority on rolls the agents (their config gains [upstream]).
    off = {k: v for k, v in base.items() if k != "authority"}
    assert agent_pod(docs_of(render_files(chart, off)))["metadata"]["annotations"]["checksum/config"] != agent


REFUSED_AUTHORITY_VALUES = {
    "no keys secret": ({"bundleConfigMap": AUTHORITY_BUNDLE},
                       "authority.enabled=true needs authority.keysSecret"),
    "no bundle configmap": ({"keysSecret": AUTHORITY_KEYS},
                            "authority.enabled=true needs authority.bundleConfigMap"),
    "port clash": ({"keysSecret": AUTHORITY_KEYS, "bundleConfigMap": AUTHORITY_BUNDLE, "port": 9090},
                   "authority.port and admin.port are both 9090"),
    "pdb blocks drains": ({"keysSecret": AUTHORITY_KEYS, "bundleConfigMap": AUTHORITY_BUNDLE, "replicas": 1},
                          r"minAvailable \(1\) must be below authority.replicas \(1\)"),
}


@pytest.mark.parametrize("case", REFUSED_AUTHORITY_VALUES)
def test_render_refuses_incomplete_authority(chart, case):
    values, message = REFUSED_AUTHORITY_VALUES[case]
    # The schema accepts these (an empty name is "not set"); the render says what is missing.
    chart.validate_schema({"authority": {"enabled": True, **values}})
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render_files(chart, {"authority": {"enabled": True, **values}})


def test_missing_keys_secret_message_says_how_to_make_it(chart):
    with pytest.raises(helm_python.HelmRenderError) as err:
        render_files(chart, {"authority": {"enabled": True}})
    text = str(err.value)
    assert "tessera authority init --dir keys --trust-domain" in text
    assert "kubectl create secret generic tessera-authority-keys --from-file=keys/" in text


def test_single_replica_authority_needs_pdb_zero(chart):
    values = {"authority": {"enabled": True, "keysSecret": "k", "bundleConfigMap": "b", "replicas": 1,
                            "podDisruptionBudget": {"minAvailable": 0}}}
    docs = docs_of(render_files(chart, values))
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 0


def test_authority_name_fits_a_dns_label(chart):
    docs = docs_of(render_files(chart, {"fullnameOverride": "t" * 63, "authority": {
        "enabled": True, "keysSecret": "k", "bundleConfigMap": "b"}}))
    for d in docs:
        if is_authority(d):
            assert len(d["metadata"]["name"]) <= 63 and d["metadata"]["name"].endswith("-authority")
    assert config_toml(docs)["upstream"]["addresses"][0].startswith("t" * 53 + "-authority.")


# ---------------------------------------------------------------- documentation


OPAQUE = {  # documented as one row: Kubernetes objects or free-form maps/lists
    "entries", "exchange.policies", "resources", "tolerations", "nodeSelector", "affinity", "imagePullSecrets",
    "podAnnotations", "podLabels", "extraEnv", "extraVolumes", "extraVolumeMounts",
    "serviceAccount.annotations", "monitoring.serviceMonitor.labels", "monitoring.podMonitor.labels",
    "networkPolicy.adminFrom", "networkPolicy.extraEgress", "securityContext.capabilities.add",
    "authority.resources", "authority.nodeSelector",
}


def leaf_values(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = prefix + k
        if isinstance(v, dict) and v and path not in OPAQUE:
            out.extend(leaf_values(v, path + "."))
        else:
            out.append(path)
    return out


def test_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M)
    leaves = leaf_values(values)
    assert sorted(set(rows)) == sorted(rows), "duplicate rows"
    assert set(leaves) == set(rows), (set(leaves) - set(rows), set(rows) - set(leaves))


def test_readme_defaults_match_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    for path in leaf_values(values):
        v = values
        for part in path.split("."):
            v = v[part]
        (row,) = re.findall(rf"^\| `{re.escape(path)}` \| `([^`]*)` \|", readme, flags=re.M)
        assert row == readme_default(v), (path, row, v)


def readme_default(v) -> str:
    """How the README's Default column shows a value: strings bare, the rest as JSON."""
    if isinstance(v, str) and v:
        return v
    return json.dumps(v, separators=(", ", ": "))


# ---------------------------------------------------------------- the real agent


def tessera_binary() -> Path | None:
    """The agent binary to try the rendered configs on: $TESSERA_BIN, else a
    workspace build (scripts/test.sh builds target/debug/tessera first)."""
    import os

    if os.environ.get("TESSERA_BIN"):
        return Path(os.environ["TESSERA_BIN"])
    for p in (REPO / "target" / "debug" / "tessera", REPO / "target" / "release" / "tessera"):
        if p.is_file():
            return p
    return None


def make_ca(directory: Path) -> None:
    """A P-256 CA as a kubernetes.io/tls Secret would hold it (tls.crt, tls.key)."""
    key, crt = directory / "tls.key", directory / "tls.crt"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(key), "-out", str(crt), "-days", "2",
                    "-subj", "/CN=tessera test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)


def write_configmap_volume(directory: Path, data: dict[str, str], generation: int) -> None:
    """Lays out `data` the way the kubelet's atomic writer fills a ConfigMap
    volume: files in a timestamped hidden directory, `..data` pointing at it,
    and one symlink per key through `..data`. A later generation is swapped
    in with one rename of `..data`, which is how a ConfigMap update reaches
    a running pod."""
    import os

    directory.mkdir(exist_ok=True)
    ts = directory / f"..2026_01_01_00_00_0{generation}.000000000"
    ts.mkdir()
    for key, text in data.items():
        (ts / key).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, directory / "..data")
    for key in data:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    for old in directory.glob("..2026_*"):
        if old != ts:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def jwt_claims(token: str) -> dict:
    import base64

    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def exercise_exchange(binary: Path, socket: Path, admin_socket: Path, policy_dir: Path, data_dir: Path,
                      name: str) -> None:
    """Token exchange through the sockets the chart's config opens: a token
    the rendered policies grant, one they refuse, a policy added the way a
    ConfigMap update lands, the operator socket and the audit log."""
    import os
    import stat
    import time

    assert (socket.parent / "exchange.sock").exists()  # beside the Workload API socket
    assert stat.S_IMODE(admin_socket.stat().st_mode) == 0o600
    approvals = subprocess.run([str(binary), "approvals", "list", "--json", "--admin-socket", str(admin_socket)],
                               capture_output=True, text=True, timeout=20)
    assert approvals.returncode == 0, approvals.stderr

    def exchange(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary), "token", "exchange", "--socket", str(socket),
                               "--resource", NOTES_RESOURCE, *args],
                              capture_output=True, text=True, timeout=20)

    if name != "exchange-inline":
        # No policies rendered for this set (an empty or absent ConfigMap): deny.
        denied = exchange("--scope", "notes:read", "--task", "t0")
        assert denied.returncode != 0
        assert json.loads(denied.stdout)["error"] == "access_denied", denied.stdout
        return

    cfg_issuer = "https://tessera.example/issuer"
    ok = exchange("--scope", "notes:read", "--task", "t1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    resp = json.loads(ok.stdout)
    claims = jwt_claims(resp["access_token"])
    assert claims["iss"] == cfg_issuer
    assert claims["aud"] == NOTES_RESOURCE
    assert claims["scope"] == "notes:read" and claims["txn"] == "t1"
    assert claims["sub"] == f"spiffe://example.org/uid/{os.geteuid()}"
    assert claims["exp"] - claims["iat"] == 120  # exchange.defaultTTL
    longer = json.loads(exchange("--scope", "notes:read", "--task", "t1", "--ttl", "9m").stdout)
    assert longer["expires_in"] == 300  # the policy's @max_ttl beats the request (and maxTTL 10m)

    denied = exchange("--scope", "notes:write", "--task", "t2")
    assert denied.returncode != 0
    assert json.loads(denied.stdout)["error"] == "access_denied", denied.stdout

    # A ConfigMap update: same files plus a new one, swapped in atomically.
    write_configmap_volume(policy_dir, {**EXCHANGE_POLICIES, "30-notes-write.cedar": (
        '@id("notes-write")\n'
        f'permit (principal, action == Tessera::Action::"notes:write", resource == Tessera::Audience::"{NOTES_RESOURCE}");\n'
    )}, generation=2)
    deadline = time.monotonic() + 15
    while True:
        write = exchange("--scope", "notes:write", "--task", "t2")
        if write.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert write.returncode == 0, write.stdout + write.stderr
    assert jwt_claims(json.loads(write.stdout)["access_token"])["scope"] == "notes:write"

    audit = data_dir / "audit.jsonl"
    verify = subprocess.run([str(binary), "audit", "verify", str(audit)], capture_output=True, text=True, timeout=20)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_real_agent_starts_with_rendered_config(manifests, tmp_path, name):
    """The rendered TOML, with only its container paths moved into a temp dir,
    is accepted by the real `tessera run` (unknown keys and bad values are
    fatal there), which then serves its socket and shuts down cleanly. With
    the exchange on, the policies ConfigMap is laid out like a ConfigMap
    volume and the exchange is exercised (`exercise_exchange`)."""
    import os
    import signal
    import time

    binary = tessera_binary()
    if binary is None:
        pytest.skip("no tessera binary (set TESSERA_BIN or build the workspace)")
    if "upstream" in config_toml(manifests[name]):
        # An upstream-mode agent needs the authority: see
        # test_real_authority_and_upstream_agent_accept_rendered_configs.
        pytest.skip("upstream mode: checked by test_real_authority_and_upstream_agent_accept_rendered_configs")
    text = config_text(manifests[name])
    sock_dir, data_dir, ca_dir = tmp_path / "sockets", tmp_path / "data", tmp_path / "ca"
    admin_dir, policy_dir = tmp_path / "admin", tmp_path / "policies"
    ca_dir.mkdir()
    make_ca(ca_dir)
    cfg = config_toml(manifests[name])
    exchange_on = "exchange" in cfg
    if exchange_on:
        cm = policies_cm(manifests[name])
        # An operator-managed ConfigMap is not rendered: stand in an empty one.
        write_configmap_volume(policy_dir, (cm or {}).get("data") or {}, generation=1)
    listen = cfg["admin"]["listen"]
    text = (text.replace('"/run/tessera/sockets/', f'"{sock_dir}/')
                .replace('"/run/tessera/admin/', f'"{admin_dir}/')
                .replace('"/etc/tessera/policies"', f'"{policy_dir}"')
                .replace('"/var/lib/tessera"', f'"{data_dir}"')
                .replace('"/etc/tessera/ca/', f'"{ca_dir}/')
                .replace(f'"{listen}"', '"127.0.0.1:0"'))
    assert "/run/tessera" not in text and "/var/lib/tessera" not in text and "/etc/tessera" not in text
    (tmp_path / "tessera.toml").write_text(text)
    socket = sock_dir / cfg["socket_path"].rsplit("/", 1)[1]
    admin_socket = admin_dir / "admin.sock"

    env = dict(os.environ, HOST_IP="127.0.0.1", NODE_NAME="node-a")
    env.pop("RUST_LOG", None)
    proc = subprocess.Popen([str(binary), "run", "--config", str(tmp_path / "tessera.toml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        def up() -> bool:
            return socket.exists() and (not exchange_on or admin_socket.exists())
        while not up() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert up(), "the agent did not create its sockets within 20 s"
        health = subprocess.run([str(binary), "healthcheck", "--socket", str(socket)],
                                capture_output=True, text=True, timeout=20)
        assert health.returncode == 0, health.stderr
        if name in ("unix-only", "exchange-inline"):
            # No kubelet involved: this test process itself gets its uid identity.
            fetch = subprocess.run([str(binary), "api", "fetch", "x509", "--socket", str(socket)],
                                   capture_output=True, text=True, timeout=20)
            assert fetch.returncode == 0, fetch.stderr
            assert f"spiffe://example.org/uid/{os.geteuid()}" in fetch.stdout, fetch.stdout
        if exchange_on and name in ("exchange-inline", "unix-only"):
            exercise_exchange(binary, socket, admin_socket, policy_dir, data_dir, name)
        elif exchange_on:
            assert (sock_dir / "exchange.sock").exists() and admin_socket.exists()
        else:
            assert not (sock_dir / "exchange.sock").exists() and not admin_dir.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert lines
    if cfg["log"]["format"] == "json":
        for line in lines:
            json.loads(line)  # every log line is one JSON object
    assert not socket.exists()  # removed on graceful shutdown


def has_authority_subcommand(binary: Path) -> bool:
    proc = subprocess.run([str(binary), "authority", "--help"], capture_output=True, text=True, timeout=20)
    return proc.returncode == 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return proc.returncode, stderr


@pytest.mark.parametrize("name", AUTHORITY_SETS)
def test_real_authority_and_upstream_agent_accept_rendered_configs(manifests, tmp_path, name):
    """The rendered authority.toml, paths moved into a temp dir and keys made
    by `tessera authority init`, is accepted by the real `tessera authority
    run`, which answers /healthz on its admin listener (no API server is
    reachable: node attestation cannot succeed, liveness must not depend on
    it); then an agent on the rendered upstream-mode config, pointed at that
    authority, stays up (unknown keys and bad values are fatal at start).

    Needs a binary with the `authority` subcommand. Without one this is
    SKIPPED loudly (pytest -rs prints the reason): the chart's [server] and
    [upstream] tables are then NOT checked by the real parser."""
    import os
    import signal
    import time
    import urllib.request

    binary = tessera_binary()
    if binary is None:
        pytest.skip("no tessera binary (set TESSERA_BIN or build the workspace)")
    if not has_authority_subcommand(binary):
        pytest.skip(f"NOT CHECKED: {binary} has no `tessera authority` subcommand yet, so the rendered "
                    "authority.toml ([server]) and the agent's [upstream] were not run through the real "
                    "config parser; rebuild the workspace once the authority lands")
    docs = manifests[name]
    cfg = authority_config_toml(docs)
    td = cfg["trust_domain"]
    made, keys, sa = tmp_path / "made", tmp_path / "keys", tmp_path / "sa"
    init = subprocess.run([str(binary), "authority", "init", "--dir", str(made), "--trust-domain", td],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    files = sorted(p.name for p in made.iterdir())
    assert files == ["access.key", "ca.crt", "ca.key", "jwt.key", "wit.key"], files  # what the docs put in the Secret
    # As `kubectl create secret generic --from-file=keys/` + the chart's
    # secret volume present them: kubelet atomic-writer layout, mode 0440.
    write_configmap_volume(keys, {f: (made / f).read_text() for f in files}, generation=1)
    for f in files:
        (keys / f).resolve().chmod(0o440)
    sa.mkdir()
    (sa / "ca.crt").write_text((keys / "ca.crt").read_text())  # stand-in API server CA
    (sa / "token").write_text("not-a-real-token")
    server_port, admin_port = free_port(), free_port()
    text = (authority_config_text(docs)
            .replace(f'"{cfg["server"]["keys_dir"]}"', f'"{keys}"')
            .replace('"/var/run/secrets/kubernetes.io/serviceaccount/', f'"{sa}/')
            .replace(f'"{cfg["server"]["listen"]}"', f'"127.0.0.1:{server_port}"')
            .replace(f'"{cfg["admin"]["listen"]}"', f'"127.0.0.1:{admin_port}"')
            .replace(f'"{cfg["server"]["audit_log"]}"', f'"{tmp_path}/audit.jsonl"'))
    https = cfg.get("https")
    if https:
        # The TLS Secret as a public CA's certificate (made by openssl) for
        # the issuer's host, in the kubelet's secret volume layout.
        host = https["issuer"].removeprefix("https://").split("/")[0]
        made_tls, tls_dir, https_port = tmp_path / "made-tls", tmp_path / "https", free_port()
        made_tls.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host}",
                        "-keyout", str(made_tls / "tls.key"), "-out", str(made_tls / "tls.crt")],
                       check=True, capture_output=True, timeout=60)
        write_configmap_volume(tls_dir, {f: (made_tls / f).read_text() for f in ("tls.crt", "tls.key")}, generation=1)
        text = (text.replace(f'"{https["cert_file"]}"', f'"{tls_dir}/tls.crt"')
                    .replace(f'"{https["key_file"]}"', f'"{tls_dir}/tls.key"')
                    .replace(f'"{https["listen"]}"', f'"127.0.0.1:{https_port}"'))
    assert "/etc/tessera" not in text and "/var/run/secrets" not in text and "0.0.0.0" not in text
    (tmp_path / "authority.toml").write_text(text)
    # The API server is "found" on a closed local port.
    env = dict(os.environ, KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(free_port()))
    env.pop("RUST_LOG", None)
    authority = subprocess.Popen([str(binary), "authority", "run", "--config", str(tmp_path / "authority.toml")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        deadline, healthy = time.monotonic() + 20, False
        while not healthy and authority.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(0.1)
        assert authority.poll() is None, authority.communicate()[1][-3000:]
        assert healthy, "the authority did not answer /healthz within 20 s"
        if https:
            # The face serves discovery under the rendered issuer, with the
            # Secret's certificate (Python's ssl verifies it against that CA).
            import ssl
            tls = ssl.create_default_context(cafile=str(made_tls / "tls.crt"))
            tls.check_hostname = False  # reached on 127.0.0.1, not the issuer's host
            url = f"https://127.0.0.1:{https_port}/.well-known/openid-configuration"
            with urllib.request.urlopen(url, context=tls, timeout=10) as r:
                meta = json.load(r)
            assert meta["issuer"] == https["issuer"]
            assert meta["jwks_uri"] == https["issuer"] + "/keys"
            with urllib.request.urlopen(f"https://127.0.0.1:{https_port}/keys", context=tls, timeout=10) as r:
                assert json.load(r)["keys"], "no JWT-SVID key published"

        # The agent in upstream mode, pointed at this authority.
        acfg = config_toml(docs)
        up = acfg["upstream"]
        sock_dir, data_dir, admin_dir, tok = tmp_path / "sockets", tmp_path / "data", tmp_path / "admin", tmp_path / "tok"
        bundle_dir = tmp_path / "upstream"
        bundle_dir.mkdir()
        tok.mkdir()
        (bundle_dir / "bundle.pem").write_text((keys / "ca.crt").read_text())
        (tok / "token").write_text("not-a-real-token")
        atext = (config_text(docs)
                 .replace('"/run/tessera/sockets/', f'"{sock_dir}/')
                 .replace('"/run/tessera/admin/', f'"{admin_dir}/')
                 .replace('"/var/lib/tessera"', f'"{data_dir}"')
                 .replace('"/etc/tessera/policies"', f'"{tmp_path / "policies"}"')
                 .replace(f'"{up["bundle_file"]}"', f'"{bundle_dir / "bundle.pem"}"')
                 .replace(f'"{up["token_file"]}"', f'"{tok / "token"}"')
                 .replace(f'"{up["addresses"][0]}"', f'"127.0.0.1:{server_port}"')
                 .replace(f'"{acfg["admin"]["listen"]}"', '"127.0.0.1:0"'))
        assert "/run/tessera" not in atext and "/etc/tessera" not in atext and "/var/run/secrets/tessera" not in atext
        (tmp_path / "policies").mkdir()
        (tmp_path / "tessera.toml").write_text(atext)
        aenv = dict(os.environ, HOST_IP="127.0.0.1", NODE_NAME="node-a")
        aenv.pop("RUST_LOG", None)
        agent = subprocess.Popen([str(binary), "run", "--config", str(tmp_path / "tessera.toml")],
                                 env=aenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert agent.poll() is None, (
            "the upstream-mode agent exited within 3 s (config refused, or an authority that cannot attest "
            "the node is fatal at start): " + agent.communicate()[1][-3000:])
        assert authority.poll() is None, authority.communicate()[1][-3000:]
    finally:
        agent_rc, agent_err = stop(agent) if agent is not None and agent.returncode is None else (None, "")
        rc, stderr = stop(authority)
    assert rc == 0, stderr[-3000:]
    # The agent is still in its first node attestation (no API server can
    # review its token), retrying: SIGTERM may end it there without the
    # graceful drain a serving agent does. Anything else is a failure.
    assert agent_rc in (0, -signal.SIGTERM), agent_err[-3000:]


def test_single_node_federation_values(chart, manifests):
    assert "federation" not in config_toml(manifests["default"])
    values = copy.deepcopy(VALUE_SETS["default"])
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    values["federation"] = {
        "relationships": [
            {"trustDomain": "partner.example", "bundleEndpointUrl": "https://bundle.partner.example:8443/",
             "endpointSpiffeId": "spiffe://partner.example/spire/server", "bootstrapBundle": pem},
            {"trustDomain": "web.example", "bundleEndpointUrl": "https://web.example/bundle", "profile": "https_web"},
        ],
        "egressPorts": [8443],
    }
    values["entries"] = [{"spiffe_id": "/ns/{k8s:ns}/sa/{k8s:sa}", "selectors": ["k8s:ns", "k8s:sa"],
                          "federates_with": ["partner.example"]}]
    docs = docs_of(render_files(chart, values))
    cfg = config_toml(docs)
    assert cfg["federation"] == [
        {"trust_domain": "partner.example", "bundle_endpoint_url": "https://bundle.partner.example:8443/",
         "bundle_endpoint_profile": "https_spiffe",
         "endpoint_spiffe_id": "spiffe://partner.example/spire/server",
         "bootstrap_bundle": "/etc/tessera/federation-partner.example.pem"},
        {"trust_domain": "web.example", "bundle_endpoint_url": "https://web.example/bundle",
         "bundle_endpoint_profile": "https_web"},
    ]
    assert cfg["entries"][0]["federates_with"] == ["partner.example"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "tessera.toml" in (d.get("data") or {})]
    assert cm["data"]["federation-partner.example.pem"] == pem
    assert "federation-web.example.pem" not in cm["data"]
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and not is_authority(d)
             and not d["metadata"]["name"].endswith("-test")]
    assert {"ports": [{"protocol": "TCP", "port": 8443}]} in np["spec"]["egress"]
    assert any(p["port"] == 53 for rule in np["spec"]["egress"] for p in rule["ports"])


def test_single_node_federation_values_are_checked(chart):
    values = copy.deepcopy(VALUE_SETS["default"])
    values["federation"] = {"relationships": [
        {"trustDomain": "partner.example", "bundleEndpointUrl": "https://bundle.partner.example/"}],
        "egressPorts": [443]}
    with pytest.raises(helm_python.HelmValuesError):
        render_files(chart, values)
    values["federation"]["relationships"][0]["profile"] = "https_web"
    values["federation"]["relationships"][0]["bundleEndpointUrl"] = "http://bundle.partner.example/"
    with pytest.raises(helm_python.HelmValuesError):
        render_files(chart, values)
    values = copy.deepcopy(VALUE_SETS["authority"])
    values["federation"] = {"relationships": [
        {"trustDomain": "web.example", "bundleEndpointUrl": "https://web.example/", "profile": "https_web"}],
        "egressPorts": [443]}
    with pytest.raises(helm_python.HelmRenderError, match="authority.federation.relationships"):
        render_files(chart, values)
