#!/usr/bin/env bash
# Checks deploy/ without a container engine or a cluster: every file parses,
# the kustomizations render, compose and the Dockerfiles refer to files that
# exist, configs use only keys and variables the code knows, and the
# dashboard only asks for metrics the code exports. Optional tools (promtool,
# systemd-analyze) are used when installed and skipped with a note otherwise.
#
# Prints one line per check and ends with "N passed, M failed"; exits 1 if
# anything failed.
#
#   bash deploy/check.sh                 run the checks
#   bash deploy/check.sh --list-metrics  only print the metric families the
#       dashboard and the alert rules use (as a scrape's `# TYPE` lines name
#       them: flowfarm_jobs_completed for flowfarm_jobs_completed_total), one
#       a line, sorted, without Prometheus' own `up`; exits 0
set -uo pipefail
cd "$(dirname "$0")/.."

mode=check
case "${1:-}" in
  "") ;;
  --list-metrics) mode=list-metrics ;;
  *) printf 'usage: %s [--list-metrics]\n' "$0" >&2; exit 2 ;;
esac

passed=0
failed=0
pass() { printf 'ok    %s\n' "$1"; passed=$((passed + 1)); }
fail() {
  printf 'FAIL  %s\n' "$1"
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | sed 's/^/        /'; fi
  failed=$((failed + 1))
}
skip() { printf 'skip  %s\n' "$1"; }
# Runs a command as one check; its output is shown only when it fails.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- tools -------------------------------------------------------------------

have_yaml=0
if python3 -c 'import yaml' 2>/dev/null; then
  have_yaml=1
elif python3 -m pip install --quiet --user pyyaml >/dev/null 2>&1 && python3 -c 'import yaml' 2>/dev/null; then
  have_yaml=1
fi

kustomize_cmd=()
if command -v kubectl >/dev/null; then
  kustomize_cmd=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  kustomize_cmd=(kustomize build)
fi

# --- the structured checks, in Python --------------------------------------------
# Run further down (and by --list-metrics); each line it prints is
# "PASS<TAB>name", "FAIL<TAB>name<TAB>detail" or "SKIP<TAB>name".

cat > "$work/checks.py" <<'PY'
import fnmatch
import glob
import json
import os
import re
import sys

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


def report(name, problems):
    if problems:
        print(f"FAIL\t{name}\t" + " | ".join(str(p).replace("\t", " ").replace("\n", " ") for p in problems))
    else:
        print(f"PASS\t{name}")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rust_sources():
    return sorted(glob.glob("crates/*/src/**/*.rs", recursive=True))


# ---- metrics: what the code exports, what the dashboard and alert rules ask for

DASHBOARD = "deploy/grafana/dashboards/flowfarm.json"
PROMETHEUS_CONFIG = "deploy/prometheus/prometheus.yml"
ALERTS = "deploy/prometheus/alerts.yml"
# Series Prometheus makes itself for every target and alert, not exported by flowfarm.
PROMETHEUS_MADE = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                   "scrape_samples_post_metric_relabeling", "ALERTS", "ALERTS_FOR_STATE"}


def exported_metrics():
    """{sample name: metric family} for what the /metrics endpoints expose
    (flowfarm_jobs_completed_total: flowfarm_jobs_completed, the name of its
    `# TYPE` line), and the label names they use."""
    samples, labels = {}, set()
    for path in glob.glob("crates/*/src/**/metrics.rs", recursive=True):
        text = read(path)
        prefix = re.search(r'Registry::with_prefix\("([a-z0-9_]+)"\)', text)
        prefix = prefix.group(1) + "_" if prefix else ""
        labels |= set(re.findall(r'\(\s*"([a-z_]+)"\s*,', text))
        for name, var in re.findall(
                r'\.register\(\s*"([a-z0-9_]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*([a-z_][a-z0-9_]*)\.clone\(\)', text, re.S):
            decl = re.search(rf"^\s*(?:pub(?:\([^)]*\))?\s+)?{var}\s*:\s*(.+?),?\s*$", text, re.M)
            kind = decl.group(1) if decl else ""
            full = prefix + name
            if "Histogram" in kind:
                suffixes = ("_bucket", "_sum", "_count")
            elif "Counter" in kind:
                suffixes = ("_total",)
            elif "Gauge" in kind:
                suffixes = ("",)
            else:
                suffixes = ("", "_total", "_bucket", "_sum", "_count")
            samples.update({full + suffix: full for suffix in suffixes})
    return samples, labels


def family_of(sample, samples):
    return samples.get(sample) or re.sub(r"_(?:total|bucket|sum|count)$", "", sample)


def dashboard_queries():
    queries = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("expr", "definition"):
                if isinstance(node.get(key), str):
                    queries.append(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.load(open(DASHBOARD)))
    return queries


def alert_rules():
    """(group name, rule) for every rule in alerts.yml."""
    doc = yaml.safe_load(open(ALERTS)) or {}
    return [(g.get("name"), r) for g in doc.get("groups") or [] for r in g.get("rules") or []]


PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "offset", "bool", "inf", "nan", "atan2"}


def promql_metrics(expr):
    """The metric names a PromQL expression (or Grafana's label_values(m, l)) selects."""
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)  # strings
    text = re.sub(r"#[^\n]*", "", text)  # comments
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    # An identifier that is not a function call, a keyword, or part of a
    # number, duration or Grafana $variable.
    return [m.group(1) for m in re.finditer(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
            if m.group(1).lower() not in PROMQL_WORDS]


def promql_labels(expr):
    """Label names an expression matches on, groups by or joins on."""
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        names |= {l.strip() for l in group.split(",") if l.strip()}
    for group in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", group))
    names |= set(re.findall(r"label_values\(\s*[a-z0-9_]+\s*,\s*([a-z_]+)\s*\)", expr))
    return names


if sys.argv[1:] == ["--list-metrics"]:
    # The metric families (as `# TYPE` lines name them) the dashboard and the
    # alert rules use, one a line: compared with live scrapes by a test.
    samples, _ = exported_metrics()
    used = set()
    for q in dashboard_queries() + [str(rule.get("expr", "")) for _, rule in alert_rules()]:
        used |= set(promql_metrics(q)) - PROMETHEUS_MADE
    print("\n".join(sorted({family_of(m, samples) for m in used})))
    sys.exit(0)

base_render, dev_render = sys.argv[1], sys.argv[2]


# ---- Rust structs: the keys a TOML config may use ---------------------------

def rust_structs():
    """name -> {field: type} for every `pub struct` with named fields."""
    structs = {}
    for path in rust_sources():
        lines = read(path).splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"\s*pub struct (\w+)\s*\{\s*$", lines[i])
            if not m:
                i += 1
                continue
            fields, attrs = {}, []
            i += 1
            while i < len(lines) and not re.match(r"^\}", lines[i]):
                line = lines[i].strip()
                if line.startswith("#["):
                    attrs.append(line)
                fm = re.match(r"pub (\w+)\s*:\s*(.+?),?$", line)
                if fm:
                    if not any(re.search(r"serde\((.*\b)?skip\b", a) for a in attrs):
                        fields[fm.group(1)] = fm.group(2)
                    attrs = []
                elif line and not line.startswith("#[") and not line.startswith("//"):
                    attrs = []
                i += 1
            structs.setdefault(m.group(1), fields)
    return structs


STRUCTS = rust_structs()


def inner_type(t):
    """The struct a field holds: `Option<crate::tls::TlsConfig>` is TlsConfig."""
    m = re.match(r"(?:Option|Vec)<(.+)>$", t.strip())
    return inner_type(m.group(1)) if m else t.strip().rsplit("::", 1)[-1]


SCALAR = re.compile(r"[uif]\d+|usize|isize|bool|String|PathBuf|SocketAddr")


def toml_problems(table, struct, where):
    fields = STRUCTS.get(struct)
    if not fields:
        return [f"struct {struct} not found in crates/*/src"]
    problems = []
    for key, value in table.items():
        if key not in fields:
            problems.append(f"{where}{key}: not a field of {struct} (known: {', '.join(sorted(fields))})")
            continue
        sub = inner_type(fields[key])
        if isinstance(value, list) and not re.match(r"(?:Option<)?Vec<", fields[key]):
            problems.append(f"{where}{key}: a list, but {struct}.{key} is {fields[key]}")
            continue
        if isinstance(value, dict) and (SCALAR.fullmatch(sub) or re.match(r"(?:Option<)?Vec<", fields[key])):
            problems.append(f"{where}{key}: a table, but {struct}.{key} is {fields[key]}")
            continue
        if sub in STRUCTS and STRUCTS[sub]:
            if isinstance(value, dict):
                problems += toml_problems(value, sub, f"{where}{key}.")
            elif isinstance(value, list):
                for n, item in enumerate(value):
                    if isinstance(item, dict):
                        problems += toml_problems(item, sub, f"{where}{key}[{n}].")
    return problems


def load_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


worker_tomls = ["deploy/docker/worker-cpu.toml", "deploy/docker/worker-cuda.toml",
                "deploy/k8s/base/worker.toml", "deploy/k8s/overlays/cpu-dev/worker.toml"]
coordinator_tomls = ["deploy/k8s/base/flowfarm.toml"]
if tomllib is None:
    print("SKIP\ttoml keys: needs Python 3.11 (tomllib) or tomli")
else:
    for path in worker_tomls:
        try:
            report(f"toml keys are WorkerConfig fields: {path}", toml_problems(load_toml(path), "WorkerConfig", ""))
        except Exception as e:
            report(f"toml keys are WorkerConfig fields: {path}", [e])
    for path in coordinator_tomls:
        try:
            report(f"toml keys are Config fields: {path}", toml_problems(load_toml(path), "Config", ""))
        except Exception as e:
            report(f"toml keys are Config fields: {path}", [e])
    # Workers may only serve models the coordinator's registry knows.
    registry_of = {
        "deploy/docker/worker-cpu.toml": "config/flowfarm.toml",
        "deploy/docker/worker-cuda.toml": "config/flowfarm.toml",
        "deploy/k8s/base/worker.toml": "deploy/k8s/base/flowfarm.toml",
        "deploy/k8s/overlays/cpu-dev/worker.toml": "deploy/k8s/base/flowfarm.toml",
    }
    problems = []
    for worker, coordinator in registry_of.items():
        known = {m["name"] for m in load_toml(coordinator).get("models", [])}
        for m in load_toml(worker).get("models", []):
            if m["name"] not in known:
                problems.append(f"{worker}: model {m['name']} is not in {coordinator}")
    report("worker models are in the coordinator's registry", problems)


# ---- environment variables and subcommands the code knows --------------------

crate_text = "\n".join(read(p) for p in glob.glob("crates/**/*.rs", recursive=True))
deploy_files = [p for p in glob.glob("deploy/**/*", recursive=True)
                if os.path.isfile(p) and not p.endswith("check.sh")]


def env_rule_problems(var):
    """Why a variable named by the configuration rule (flowfarm-config) names
    no key: FLOWFARM_WORKER__A__B is a.b of WorkerConfig, any other
    FLOWFARM_A__B__C is a.b.c of Config, and a number indexes a list."""
    if var.startswith("FLOWFARM_WORKER__"):
        struct, rest = "WorkerConfig", var[len("FLOWFARM_WORKER__"):]
    else:
        struct, rest = "Config", var[len("FLOWFARM_"):]
    parts = rest.lower().split("__")
    if "" in parts:
        return ["an empty part (`___`, or `__` at an end)"]
    if parts[0].isdigit():
        return [f"starts with a list index, but {struct} is a table"]
    # The path as the TOML table it stands for, checked as a config file is.
    value = "from the environment"
    for part in reversed(parts):
        value = [value] if part.isdigit() else {part: value}
    return toml_problems(value, struct, "")


problems = []
for path in deploy_files:
    for var in sorted(set(re.findall(r"\b((?:FLOWFARM|AWS)_[A-Z0-9_]+|CUDA_COMPUTE_CAP)\b", read(path)))):
        if var.startswith("FLOWFARM_") and "__" in var:
            problems += [f"{path}: {var}: {p}" for p in env_rule_problems(var)]
        elif var not in crate_text:
            problems.append(f"{path}: {var} is not read anywhere in crates/")
report("environment variables exist in the code (FLOWFARM_…__… by the key they name)", problems)

main_rs = read("crates/flowfarm/src/main.rs")
enum = re.search(r"enum Command \{(.*?)\n\}", main_rs, re.S).group(1)
subcommands = {re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in re.findall(r"^\s{4}(\w+)\b", enum, re.M)}


def flowfarm_invocations():
    """(where, argv after `flowfarm`) from compose, k8s manifests and systemd units."""
    found = []
    compose = yaml.safe_load(open("deploy/compose/compose.yaml"))
    for name, svc in compose["services"].items():
        image = str(svc.get("image", ""))
        if image.startswith("flowfarm/") and "entrypoint" not in svc and svc.get("command"):
            found.append((f"compose {name}", svc["command"]))
        for text in (svc.get("command") or []) if "entrypoint" in svc else []:
            # `flowfarm` where a shell command starts, not as an argument.
            for m in re.finditer(r"(?:^|[;&|(])\s*flowfarm\s+([a-z-]+)", str(text), re.M):
                found.append((f"compose {name}", [m.group(1)]))
    for path in glob.glob("deploy/k8s/**/*.yaml", recursive=True):
        for doc in yaml.safe_load_all(open(path)):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                if c.get("command"):
                    # A shell in front: `flowfarm` where a shell command starts.
                    text = "\n".join(map(str, c["command"] + c.get("args", [])))
                    for m in re.finditer(r"(?:^|[;&|(])\s*(?:exec\s+)?flowfarm\s+([a-z-]+)", text, re.M):
                        found.append((f"{path} {c['name']}", [m.group(1)]))
                elif c.get("args"):
                    found.append((f"{path} {c['name']}", c["args"]))
    for path in glob.glob("deploy/systemd/*.service"):
        for m in re.finditer(r"^ExecStart=\S*flowfarm (.*)$", read(path), re.M):
            found.append((path, m.group(1).split()))
    return found


problems = []
invocations = flowfarm_invocations()
for where, argv in invocations:
    if not argv or argv[0] not in subcommands:
        problems.append(f"{where}: `flowfarm {' '.join(map(str, argv))}` (subcommands: {', '.join(sorted(subcommands))})")
for flag in re.findall(r"flowfarm token create ((?:--[a-z-]+ \S+ ?)+)", read("deploy/compose/compose.yaml")):
    for name in re.findall(r"--([a-z-]+)", flag):
        if not re.search(rf"\b{name.replace('-', '_')}\s*:", main_rs):
            problems.append(f"compose: `flowfarm token create --{name}` is not a flag of main.rs")
if not invocations:
    problems.append("found no flowfarm invocations to check")
report("flowfarm subcommands and flags exist", problems)


# ---- compose ------------------------------------------------------------------

compose_path = "deploy/compose/compose.yaml"
compose_dir = os.path.dirname(compose_path)
compose = yaml.safe_load(open(compose_path))
services = compose.get("services", {})
named_volumes = set((compose.get("volumes") or {}).keys())

problems = []
for name, svc in services.items():
    build = svc.get("build")
    if build is not None:
        build = {"context": build} if isinstance(build, str) else build
        context = os.path.normpath(os.path.join(compose_dir, build.get("context", ".")))
        dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
        if not os.path.isdir(context):
            problems.append(f"{name}: build context {context} is missing")
        if not os.path.isfile(dockerfile):
            problems.append(f"{name}: {dockerfile} is missing")
    elif not svc.get("image"):
        problems.append(f"{name}: neither build nor image")
report("compose: build contexts and Dockerfiles exist", problems)

problems = []
for name, svc in services.items():
    image = svc.get("image", "")
    if "build" in svc or not image:
        continue
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not tag or tag == "latest":
        problems.append(f"{name}: {image} is not pinned to a version")
report("compose: pulled images are pinned", problems)

problems = []
for name, svc in services.items():
    for vol in svc.get("volumes", []):
        source = vol.get("source") if isinstance(vol, dict) else vol.split(":")[0]
        if source.startswith((".", "/")):
            if not os.path.exists(os.path.join(compose_dir, source)):
                problems.append(f"{name}: {source} does not exist")
        elif source not in named_volumes:
            problems.append(f"{name}: volume {source} is not declared under volumes:")
report("compose: mounted paths and volumes exist", problems)

problems = []
for name, svc in services.items():
    deps = svc.get("depends_on", {})
    deps = {d: {} for d in deps} if isinstance(deps, list) else deps
    for dep, cond in deps.items():
        if dep not in services:
            problems.append(f"{name}: depends on unknown service {dep}")
            continue
        condition = (cond or {}).get("condition", "service_started")
        if condition == "service_healthy" and "healthcheck" not in services[dep]:
            problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        if condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
            problems.append(f"{name}: waits for {dep} to complete, which restarts")
for db in ("postgres", "redis"):
    if db in services and "healthcheck" not in services[db]:
        problems.append(f"{db}: no healthcheck")
report("compose: depends_on targets and conditions hold", problems)

problems = []
for name, svc in services.items():
    env = svc.get("environment") or {}
    env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
    for key, value in env.items():
        m = re.match(r"^[a-z0-9+]+://(?:[^@/]*@)?([^:/]+)", str(value))
        if m and m.group(1) not in services and m.group(1) not in ("127.0.0.1", "localhost") \
                and not str(value).startswith("s3://"):
            problems.append(f"{name}: {key} points at {m.group(1)}, which is not a compose service")
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
for job in prom.get("scrape_configs", []):
    for sc in job.get("static_configs", []):
        for target in sc.get("targets", []):
            if target.split(":")[0] not in services:
                problems.append(f"prometheus job {job['job_name']}: {target} is not a compose service")
report("compose: URLs and scrape targets name compose services", problems)


# ---- Dockerfiles ----------------------------------------------------------------

def dockerfile_instructions(path):
    text = re.sub(r"\\\n", " ", read(path))
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def ignore_patterns(dockerfile):
    path = dockerfile + ".dockerignore"
    if not os.path.exists(path):
        return []
    return [l.strip().lstrip("/") for l in read(path).splitlines() if l.strip() and not l.startswith("#")]


def ignored(path, patterns):
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pat = pattern[3:] if pattern.startswith("**/") else pattern
        if any(fnmatch.fnmatch(p, pattern) or (pattern != pat and fnmatch.fnmatch(p.split("/")[-1], pat))
               for p in prefixes):
            return True
    return False


def package_dirs():
    out = {}
    for manifest in glob.glob("crates/*/Cargo.toml"):
        m = re.search(r'^name\s*=\s*"([^"]+)"', read(manifest), re.M)
        if m:
            out[m.group(1)] = os.path.dirname(manifest)
    return out


PACKAGES = package_dirs()
dockerfiles = sorted(glob.glob("deploy/docker/*.Dockerfile"))
for df in dockerfiles:
    problems = []
    patterns = ignore_patterns(df)
    for word, rest in dockerfile_instructions(df):
        if word != "COPY" or "--from=" in rest:
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        for source in args[:-1]:
            if not os.path.exists(source):
                problems.append(f"COPY {source}: not in the repository")
            elif ignored(source, patterns):
                problems.append(f"COPY {source}: excluded by {df}.dockerignore")
    report(f"dockerfile COPY sources exist: {df}", problems)

    problems = []
    text = re.sub(r"\\\n", " ", read(df))
    builds = re.findall(r"cargo build ([^\n&]*)", text)
    if not builds:
        problems.append("no cargo build")
    for args in builds:
        if "--locked" not in args:
            problems.append(f"cargo build {args.strip()}: without --locked")
        for b in re.findall(r"--bin (\S+)", args):
            if b not in PACKAGES or not os.path.exists(os.path.join(PACKAGES[b], "src/main.rs")):
                problems.append(f"--bin {b}: no such binary in crates/")
        pkg = re.search(r"-p (\S+)", args)
        for feature in re.findall(r"--features (\S+)", args):
            if not pkg or pkg.group(1) not in PACKAGES:
                problems.append(f"--features {feature} without a -p naming a crate")
                continue
            manifest = read(os.path.join(PACKAGES[pkg.group(1)], "Cargo.toml"))
            features = re.search(r"^\[features\]\n(.*?)(?:^\[|\Z)", manifest, re.M | re.S)
            if not features or not re.search(rf"^{re.escape(feature)}\s*=", features.group(1), re.M):
                problems.append(f"--features {feature}: not a feature of {pkg.group(1)}")
    # The ports it listens on (environment and baked-in worker config) are the ports it exposes.
    listen = set(re.findall(r"FLOWFARM_(?:METRICS_|STATUS__)?LISTEN=[\d.]+:(\d+)", text))
    exposed = set()
    for word, rest in dockerfile_instructions(df):
        if word == "EXPOSE":
            exposed |= {p.split("/")[0] for p in rest.split()}
    if listen != exposed:
        problems.append(f"EXPOSE {sorted(exposed)} but listens on {sorted(listen)}")
    report(f"dockerfile builds with --locked, real binaries, features and ports: {df}", problems)


# ---- Kubernetes (rendered) --------------------------------------------------------

def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o.get("kind") == kind}


def worker_toml_of(objs, deployment):
    cms = by_kind(objs, "ConfigMap")
    for vol in deployment["spec"]["template"]["spec"].get("volumes", []):
        if "configMap" in vol and vol["configMap"]["name"] in cms:
            data = cms[vol["configMap"]["name"]].get("data", {})
            if "worker.toml" in data:
                return tomllib.loads(data["worker.toml"])
    return None


def k8s_common(objs):
    problems = []
    deployments = by_kind(objs, "Deployment")
    cms = by_kind(objs, "ConfigMap")
    for name, d in deployments.items():
        spec = d["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in cms:
                problems.append(f"{name}: ConfigMap {vol['configMap']['name']} is not rendered")
        for c in spec["containers"]:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            missing = mounts - {v["name"] for v in spec.get("volumes", [])}
            if missing:
                problems.append(f"{name}: mounts undeclared volumes {sorted(missing)}")
    for kind in ("Service", "PodDisruptionBudget"):
        for name, o in by_kind(objs, kind).items():
            sel = o["spec"]["selector"]
            sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
            matched = [d for d in deployments.values()
                       if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            if not matched:
                problems.append(f"{kind} {name}: selector {sel} matches no pod template")
            if kind == "Service" and matched:
                ports = {p.get("name") for c in matched[0]["spec"]["template"]["spec"]["containers"]
                         for p in c.get("ports", [])}
                for p in o["spec"]["ports"]:
                    if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports:
                        problems.append(f"Service {name}: targetPort {p['targetPort']} is not a container port")
    worker = deployments.get("flowfarm-worker")
    if worker is None:
        problems.append("no flowfarm-worker Deployment")
    else:
        wt = worker_toml_of(objs, worker)
        grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if wt is None:
            problems.append("flowfarm-worker mounts no ConfigMap with worker.toml")
        elif grace <= wt.get("drain_timeout_seconds", 300.0):
            problems.append(f"terminationGracePeriodSeconds {grace} <= drain_timeout_seconds {wt.get('drain_timeout_seconds', 300.0)}")
        pdbs = [p for p in by_kind(objs, "PodDisruptionBudget").values()
                if p["spec"]["selector"]["matchLabels"].items()
                <= worker["spec"]["template"]["metadata"]["labels"].items()]
        if not pdbs:
            problems.append("no PodDisruptionBudget covers the workers")
        coordinator_toml = None
        for cm in cms.values():
            if "flowfarm.toml" in cm.get("data", {}):
                coordinator_toml = tomllib.loads(cm["data"]["flowfarm.toml"])
        if wt is not None and coordinator_toml is not None:
            if wt.get("results_url") != coordinator_toml.get("results", {}).get("url"):
                problems.append("worker results_url differs from the coordinator's results.url")
    return problems


if tomllib is None:
    print("SKIP\tk8s checks: need Python 3.11 (tomllib) or tomli")
else:
    for label, path in (("base", base_render), ("cpu-dev", dev_render)):
        try:
            objs = docs(path)
            report(f"k8s {label}: references, selectors, PDB, grace period > drain timeout",
                   k8s_common(objs) if objs else ["nothing rendered"])
        except Exception as e:
            report(f"k8s {label}: references, selectors, PDB, grace period > drain timeout", [e])

    try:
        objs = docs(base_render)
        problems = []
        coord = by_kind(objs, "Deployment")["flowfarm-coordinator"]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in coord.get("env", [])}
        if "secretKeyRef" not in env.get("FLOWFARM_DATABASE_URL", {}).get("valueFrom", {}):
            problems.append("coordinator FLOWFARM_DATABASE_URL does not come from a Secret")
        worker = by_kind(objs, "Deployment")["flowfarm-worker"]
        wc = worker["spec"]["template"]["spec"]["containers"][0]
        if str(wc.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
            problems.append("worker does not request nvidia.com/gpu: 1")
        if "worker-cuda" not in wc["image"]:
            problems.append(f"worker image {wc['image']} is not the CUDA one")
        wt = worker_toml_of(objs, worker)
        if not str(wt.get("device", "")).startswith("cuda"):
            problems.append(f"worker.toml device {wt.get('device')} is not a GPU")
        vols = worker["spec"]["template"]["spec"]["volumes"]
        token_vol = [v for v in vols if "secret" in v]
        token_dirs = [m["mountPath"] for m in wc["volumeMounts"] if m["name"] in {v["name"] for v in token_vol}]
        if not any(str(wt.get("token_file", "")).startswith(d + "/") for d in token_dirs):
            problems.append(f"token_file {wt.get('token_file')} is not in a Secret's mount {token_dirs}")
        report("k8s base: DATABASE_URL Secret, GPU request, CUDA image, token file", problems)
    except Exception as e:
        report("k8s base: DATABASE_URL Secret, GPU request, CUDA image, token file", [repr(e)])

    def mounted(spec, container, path):
        """The volume a container sees `path` in, and the key of a Secret
        volume's file there (None if the Secret does not project it)."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            if os.path.dirname(path) == m["mountPath"].rstrip("/"):
                volume = volumes.get(m["name"], {})
                items = (volume.get("secret") or {}).get("items")
                name = os.path.basename(path)
                key = name if items is None else next((i["key"] for i in items if i["path"] == name), None)
                return volume, key
        return {}, None

    def tls_problems(objs):
        problems = []
        deployments = by_kind(objs, "Deployment")
        spec = deployments["flowfarm-coordinator"]["spec"]["template"]["spec"]
        coord = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in coord.get("env", [])}
        for var, key in (("FLOWFARM_SERVER__TLS__CERT_FILE", "tls.crt"), ("FLOWFARM_SERVER__TLS__KEY_FILE", "tls.key"),
                         ("FLOWFARM_SERVER__TLS__CLIENT_CA_FILE", "ca.crt")):
            volume, found = mounted(spec, coord, env.get(var) or "")
            if (volume.get("secret") or {}).get("secretName") != "flowfarm-tls" or found != key:
                problems.append(f"coordinator {var}={env.get(var)} is not key {key} of the mounted Secret flowfarm-tls")
        volume, _ = mounted(spec, coord, env.get("FLOWFARM_AUTH__ADMIN_TOKEN_FILE") or "")
        if "emptyDir" not in volume:
            problems.append("coordinator FLOWFARM_AUTH__ADMIN_TOKEN_FILE is not on an emptyDir (the root file system is read-only)")
        # gRPC probes cannot speak TLS: HTTP on the metrics port, the port flowfarm.toml serves it on.
        ports = {p["name"]: p["containerPort"] for p in coord["ports"]}
        coordinator_toml = next(tomllib.loads(cm["data"]["flowfarm.toml"]) for cm in by_kind(objs, "ConfigMap").values()
                                if "flowfarm.toml" in cm.get("data", {}))
        listen = str(coordinator_toml.get("metrics", {}).get("listen", ""))
        if not listen.endswith(f":{ports.get('metrics')}"):
            problems.append(f"metrics.listen {listen!r} is not the metrics containerPort {ports.get('metrics')}")
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = coord.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in ("metrics", ports.get("metrics")):
                problems.append(f"coordinator {probe}: not httpGet {path} on the metrics port")
        worker = deployments["flowfarm-worker"]
        spec = worker["spec"]["template"]["spec"]
        wc = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in wc.get("env", [])}
        if not str(worker_toml_of(objs, worker).get("coordinator", "")).startswith("https://"):
            problems.append("worker.toml coordinator is not https://")
        volume, found = mounted(spec, wc, env.get("FLOWFARM_WORKER__TLS_CA_FILE") or "")
        secret = volume.get("secret") or {}
        if secret.get("secretName") != "flowfarm-tls" or found != "ca.crt":
            problems.append("worker FLOWFARM_WORKER__TLS_CA_FILE is not key ca.crt of the mounted Secret flowfarm-tls")
        elif [i["key"] for i in secret.get("items") or [{"key": "everything"}]] != ["ca.crt"]:
            problems.append("workers mount more of flowfarm-tls than ca.crt (the server's key must stay with the server)")
        for var, key in (("FLOWFARM_WORKER__TLS_CERT_FILE", "tls.crt"), ("FLOWFARM_WORKER__TLS_KEY_FILE", "tls.key")):
            volume, found = mounted(spec, wc, env.get(var) or "")
            secret = volume.get("secret") or {}
            if secret.get("secretName") != "flowfarm-worker-tls" or not secret.get("optional") or found != key:
                problems.append(f"worker {var} is not key {key} of the optional Secret flowfarm-worker-tls")
        return problems

    for label, path in (("base", base_render), ("cpu-dev", dev_render)):
        name = f"k8s {label}: TLS files from Secrets, https:// workers, HTTP probes on the metrics port, admin token on an emptyDir"
        try:
            report(name, tls_problems(docs(path)))
        except Exception as e:
            report(name, [repr(e)])

    try:
        objs = docs(dev_render)
        problems = []
        worker = by_kind(objs, "Deployment")["flowfarm-worker"]
        spec = worker["spec"]["template"]["spec"]
        if "nvidia.com/gpu" in json.dumps(spec):
            problems.append("worker still asks for nvidia.com/gpu")
        if spec.get("tolerations"):
            problems.append("worker still tolerates the GPU taint")
        if "worker-cpu" not in spec["containers"][0]["image"]:
            problems.append(f"worker image {spec['containers'][0]['image']} is not the CPU one")
        if worker_toml_of(objs, worker).get("device") != "cpu":
            problems.append("worker.toml device is not cpu")
        report("k8s cpu-dev: CPU image, no GPU request or toleration, device cpu", problems)
    except Exception as e:
        report("k8s cpu-dev: CPU image, no GPU request or toleration, device cpu", [repr(e)])


# ---- Dashboard and alert rules: metrics and labels exist -------------------------------

samples, metric_labels = exported_metrics()
STANDARD_LABELS = {"le", "instance", "job"}


def metric_problems(queries):
    """(problems, flowfarm names used) for the metrics some queries select."""
    problems, used = [], set()
    for q in queries:
        for metric in promql_metrics(q):
            if metric in PROMETHEUS_MADE:
                continue
            used.add(metric)
            if metric not in samples:
                problems.append(f"{metric} is not exported (crates/*/src/metrics.rs)")
    return sorted(set(problems)), used


def label_problems(queries):
    return sorted({f"label {label} is not set in metrics.rs"
                   for q in queries for label in promql_labels(q) - STANDARD_LABELS - metric_labels})


dash_path = DASHBOARD
dash = json.load(open(dash_path))
queries = dashboard_queries()
problems, used = metric_problems(queries)
if not used:
    problems.append("the dashboard queries no flowfarm metric")
report(f"dashboard metrics exist in metrics.rs ({len(used)} names, {len(queries)} queries)", problems)
report("dashboard labels exist in metrics.rs", label_problems(queries))

try:
    rules = alert_rules()
    exprs = [str(rule.get("expr", "")) for _, rule in rules]
    problems, used = metric_problems(exprs)
    if not used:
        problems.append("the alert rules use no flowfarm metric")
    report(f"alert rule metrics exist in metrics.rs ({len(used)} names, {len(rules)} rules)", problems)
    report("alert rule labels exist in metrics.rs", label_problems(exprs))

    problems = []
    prom = yaml.safe_load(open(PROMETHEUS_CONFIG))
    jobs = {job["job_name"] for job in prom.get("scrape_configs", [])}
    names = [rule.get("alert") for _, rule in rules]
    if {group for group, _ in rules} != {"flowfarm"}:
        problems.append(f"rule groups {sorted({str(g) for g, _ in rules})}, expected one named flowfarm")
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: defined twice")
    for _, rule in rules:
        name = rule.get("alert")
        if not name:  # a recording rule
            continue
        if not rule.get("for"):
            problems.append(f"{name}: no for:")
        if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{name}: labels.severity is not critical, warning or info")
        for key in ("summary", "description"):
            if not str((rule.get("annotations") or {}).get(key, "")).strip():
                problems.append(f"{name}: no annotations.{key}")
        for job in re.findall(r'\bjob\s*=\s*"([^"]*)"', str(rule.get("expr", ""))):
            if job not in jobs:
                problems.append(f"{name}: job {job} is not a scrape job of {PROMETHEUS_CONFIG} ({', '.join(sorted(jobs))})")
    report("alert rules: group flowfarm, each with for, severity, summary, description; jobs are scrape jobs", problems)

    # prometheus.yml's rule_files are resolved against its own folder, here
    # (by promtool) and in the container (by Prometheus): compose must mount
    # each rule file where the container's prometheus.yml names it.
    problems = []
    mounts, config_in_container = {}, None
    for vol in services.get("prometheus", {}).get("volumes", []):
        if isinstance(vol, str) and vol.startswith((".", "/")):
            source, target = vol.split(":")[:2]
            mounts[os.path.normpath(target)] = os.path.normpath(os.path.join(compose_dir, source))
            if mounts[os.path.normpath(target)] == os.path.normpath(PROMETHEUS_CONFIG):
                config_in_container = os.path.normpath(target)
    rule_files = prom.get("rule_files") or []
    if config_in_container is None:
        problems.append(f"compose's prometheus does not mount {PROMETHEUS_CONFIG}")
    if os.path.normpath(ALERTS) not in {os.path.normpath(os.path.join(os.path.dirname(PROMETHEUS_CONFIG), f))
                                        for f in rule_files}:
        problems.append(f"{PROMETHEUS_CONFIG}: rule_files does not name {ALERTS} (relative to itself)")
    for f in rule_files:
        here = os.path.normpath(os.path.join(os.path.dirname(PROMETHEUS_CONFIG), f))
        if not os.path.isfile(here):
            problems.append(f"rule file {f}: {here} does not exist")
        if config_in_container:
            there = os.path.normpath(os.path.join(os.path.dirname(config_in_container), f))
            if mounts.get(there) != here:
                problems.append(f"rule file {f}: the container reads {there}, where compose mounts {mounts.get(there, 'nothing')}")
    report("prometheus rule_files exist and compose mounts them where prometheus.yml names them", problems)
except Exception as e:
    report("alert rules: parse and check", [repr(e)])

problems = []
ds_uids = set()
for path in glob.glob("deploy/grafana/provisioning/datasources/*.yaml"):
    ds_uids |= {d.get("uid") for d in yaml.safe_load(open(path)).get("datasources", [])}
for uid in set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps(dash.get("panels", [])) + json.dumps(dash.get("templating", {})))):
    if uid not in ds_uids:
        problems.append(f"datasource uid {uid} is not provisioned")
providers = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/flowfarm.yaml"))["providers"]
mounts = [v for v in services.get("grafana", {}).get("volumes", []) if isinstance(v, str)]
for p in providers:
    path = p["options"]["path"]
    if not any(m.split(":")[1] == path and os.path.exists(os.path.join(compose_dir, m.split(":")[0], os.path.basename(dash_path)))
               for m in mounts):
        problems.append(f"provider path {path} is not where compose mounts {dash_path}")
report("grafana provisioning: datasource uid and dashboard path line up", problems)
PY

if [ "$mode" = list-metrics ]; then
  if [ "$have_yaml" != 1 ]; then
    echo "check.sh --list-metrics: needs PyYAML (pip install pyyaml)" >&2
    exit 1
  fi
  python3 "$work/checks.py" --list-metrics
  exit
fi

# --- every YAML and JSON file parses -----------------------------------------

mapfile -t yaml_files < <(find deploy -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
for f in "${yaml_files[@]}"; do
  if [ "$have_yaml" = 1 ]; then
    check "yaml parses: $f" python3 -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$f"
  elif command -v yq >/dev/null; then
    check "yaml parses: $f" yq . "$f"
  else
    fail "yaml parses: $f" "neither PyYAML (pip install pyyaml) nor yq is available"
  fi
done

mapfile -t json_files < <(find deploy -type f -name '*.json' | sort)
for f in "${json_files[@]}"; do
  check "json parses: $f" python3 -m json.tool "$f"
done

# --- kustomize renders -------------------------------------------------------

for k in deploy/k8s/base deploy/k8s/overlays/cpu-dev; do
  out="$work/$(basename "$k").yaml"
  if [ ${#kustomize_cmd[@]} -eq 0 ]; then
    fail "kustomize renders: $k" "neither kubectl nor kustomize is installed"
    : > "$out"
  elif err=$("${kustomize_cmd[@]}" "$k" 2>&1 > "$out"); then
    pass "kustomize renders: $k"
  else
    fail "kustomize renders: $k" "$err"
  fi
done

# --- structured checks (Python, above) ----------------------------------------

if [ "$have_yaml" = 1 ]; then
  while IFS=$'\t' read -r status name detail; do
    case $status in
      PASS) pass "$name" ;;
      FAIL) fail "$name" "${detail//' | '/$'\n'}" ;;
      SKIP) skip "$name" ;;
    esac
  done < <(python3 "$work/checks.py" "$work/base.yaml" "$work/cpu-dev.yaml" 2>&1 \
           || echo $'FAIL\tstructured checks ran to the end\tthe Python checker crashed (see above)')
else
  fail "structured checks (compose, k8s, Dockerfiles, configs, dashboard, alert rules)" "need PyYAML: pip install pyyaml"
fi

# --- promtool --------------------------------------------------------------------

# The unit tests in alerts.test.yml expect labels only, and promtool compares
# annotations whole: they run against a copy of alerts.yml without them.
test_rules() {
  local dir="$work/rules"
  mkdir -p "$dir"
  python3 - deploy/prometheus/alerts.yml "$dir/alerts.yml" <<'PY' || return 1
import sys

import yaml

doc = yaml.safe_load(open(sys.argv[1]))
for group in doc["groups"]:
    for rule in group["rules"]:
        rule.pop("annotations", None)
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
PY
  cp deploy/prometheus/alerts.test.yml "$dir/"
  (cd "$dir" && promtool test rules alerts.test.yml)
}

if command -v promtool >/dev/null; then
  # check config also loads the rule_files, resolved next to prometheus.yml.
  check "promtool check config: deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
  check "promtool check rules: deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
  if [ "$have_yaml" = 1 ]; then
    check "promtool test rules: deploy/prometheus/alerts.test.yml" test_rules
  else
    skip "promtool test rules: deploy/prometheus/alerts.test.yml (needs PyYAML)"
  fi
else
  skip "promtool check config: promtool not installed (Debian package prometheus)"
  skip "promtool check rules: promtool not installed (Debian package prometheus)"
  skip "promtool test rules: promtool not installed (Debian package prometheus)"
fi

# --- systemd units ---------------------------------------------------------------
# systemd-analyze verify insists that ExecStart's binary exists and that the
# units' dependencies load, so the units are verified inside a scratch root
# holding the system's own units and a stand-in for each binary.

verify_unit() {
  local unit=$1 root out
  root=$(mktemp -d "$work/root.XXXXXX")
  mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd"
  for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -d "$dir" ]; then cp -r "$dir" "$root/usr/lib/systemd/" && break; fi
  done
  cp "$unit" "$root/etc/systemd/system/"
  local exe
  for exe in $(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "$unit"); do
    mkdir -p "$root$(dirname "$exe")"
    printf '#!/bin/sh\n' > "$root$exe"
    chmod +x "$root$exe"
  done
  out=$(systemd-analyze verify --man=no --root="$root" "$root/etc/systemd/system/$(basename "$unit")" 2>&1)
  local rc=$?
  # Warnings (unknown keys, bad values) do not change the exit status.
  if [ $rc -ne 0 ] || grep -q "$(basename "$unit" .service | sed 's/@$//')" <<<"$out"; then
    printf '%s\n' "$out"
    return 1
  fi
}

for unit in deploy/systemd/*.service; do
  if command -v systemd-analyze >/dev/null; then
    check "systemd-analyze verify: $unit" verify_unit "$unit"
  else
    skip "systemd-analyze verify: $unit (systemd-analyze not installed)"
  fi
done

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
