"""tests/deploy: the files under deploy/ agree with the kvstored they
deploy. Usage: check_deploy.py KVSTORED SOURCE_DIR

- deploy/systemd/kvstored.conf passes `kvstored --check-config`;
- deploy/systemd/kvstored.service passes `systemd-analyze verify` (with
  ExecStart pointed at this build; skipped, and said so, without systemd);
- deploy/local/run.sh starts a real etcd and 3 kvstored on loopback (with
  KVCTL, the third argument): all 3 listed by `kvctl nodes`, a sequence
  created on one reaches a second by repair (R=2), stop leaves no process;
- deploy/kubernetes/*.yaml pass yamllint (strict) and a schema check of
  the fields their kinds require (apiVersion, selectors matching pod
  labels, a PodDisruptionBudget); they parse; the kvstored.conf of its ConfigMap passes
  `kvstored --check-config` (its secret and data paths replaced by
  temporary ones); the StatefulSet's ports, probes, config mount and
  environment match that configuration and kvstored's options.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

KVSTORED, SRC = sys.argv[1], sys.argv[2]
KVCTL = sys.argv[3] if len(sys.argv) > 3 else None
DEPLOY = os.path.join(SRC, "deploy")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def check_config(path):
    r = subprocess.run([KVSTORED, "--config", path, "--check-config"],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def conf_map(text):
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition(" ")
            out[k] = v.strip().strip('"')
    return out


tmp = tempfile.mkdtemp()
try:
    # ---- systemd
    rc, out = check_config(os.path.join(DEPLOY, "systemd", "kvstored.conf"))
    check(rc == 0, f"systemd/kvstored.conf passes --check-config ({rc}) "
          + ("" if rc == 0 else out))
    unit = open(os.path.join(DEPLOY, "systemd", "kvstored.service")).read()
    check("Type=notify" in unit, "unit is Type=notify (kvstored sends READY=1)")
    m = re.search(r"TimeoutStopSec=(\d+)", unit)
    conf = conf_map(open(os.path.join(DEPLOY, "systemd",
                                      "kvstored.conf")).read())
    drain_s = int(conf.get("shutdown_timeout_ms", "30000")) / 1000
    check(m and int(m.group(1)) > drain_s,
          "unit's TimeoutStopSec exceeds the drain (shutdown_timeout_ms)")
    check(conf.get("data_dir", "").startswith("/var/lib/kvstored"),
          "config's data_dir is the unit's StateDirectory")
    if shutil.which("systemd-analyze"):
        u = os.path.join(tmp, "kvstored.service")
        with open(u, "w") as f:
            f.write(unit.replace("/usr/local/bin/kvstored",
                                 os.path.abspath(KVSTORED)))
        r = subprocess.run(["systemd-analyze", "verify", u],
                           capture_output=True, text=True)
        bad = [l for l in (r.stdout + r.stderr).splitlines()
               if "kvstored.service" in l]
        check(r.returncode == 0 and not bad,
              "systemd-analyze verify kvstored.service " + " ".join(bad))
    else:
        print("skip systemd-analyze verify: systemd-analyze not installed")

    # ---- Kubernetes
    docs = []
    for name in sorted(os.listdir(os.path.join(DEPLOY, "kubernetes"))):
        if name.endswith(".yaml"):
            with open(os.path.join(DEPLOY, "kubernetes", name)) as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        check(all(k in d for k in ("apiVersion", "kind", "metadata")) and
              d["metadata"].get("name"), f"{d.get('kind')} "
              f"{d.get('metadata', {}).get('name')} has apiVersion, kind, name")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    cm = by.get(("ConfigMap", "kvstored"))
    sts = by.get(("StatefulSet", "kvstored"))
    check(cm is not None and sts is not None, "ConfigMap and StatefulSet kvstored")
    text = cm["data"]["kvstored.conf"]
    kconf = conf_map(text)
    token = os.path.join(tmp, "auth-token")
    with open(token, "w") as f:
        f.write("x" * 32 + "\n")
    os.chmod(token, 0o600)
    text = text.replace(kconf["auth_token_file"], token)
    text = text.replace(kconf["data_dir"], os.path.join(tmp, "data"))
    p = os.path.join(tmp, "k8s.conf")
    with open(p, "w") as f:
        f.write(text)
    rc, out = check_config(p)
    check(rc == 0, f"ConfigMap kvstored.conf passes --check-config ({rc}) "
          + ("" if rc == 0 else out))
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {pp["name"]: pp["containerPort"] for pp in c["ports"]}
    check(ports.get("rpc") == int(kconf["port"]) and
          ports.get("http") == int(kconf["http_port"]),
          "container ports are the config's port and http_port")
    check(kconf["bind"] == "0.0.0.0" and kconf["http_bind"] == "0.0.0.0",
          "the pod listens on its own address (bind, http_bind 0.0.0.0)")
    for probe in ("readinessProbe", "startupProbe"):
        hg = c[probe]["httpGet"]
        check(hg["path"] == "/healthz" and hg["port"] in ports,
              f"{probe} asks /healthz on a named port")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    args = c["args"]
    cfg_path = args[args.index("--config") + 1]
    check(cfg_path in mounts, "the --config path is mounted")
    check(any(kconf["auth_token_file"].startswith(mp) for mp in mounts),
          "auth_token_file lies in a mounted volume")
    check(any(kconf["data_dir"].startswith(mp) for mp in mounts),
          "data_dir lies in a mounted volume")
    r = subprocess.run([KVSTORED, "--help"], capture_output=True, text=True)
    options = set(re.findall(r"^\s+--([a-z0-9-]+)", r.stdout, re.M))
    for e in c.get("env", []):
        if e["name"].startswith("KVSTORED_"):
            opt = e["name"][len("KVSTORED_"):].lower().replace("_", "-")
            check(opt in options, f"env {e['name']} is a kvstored option")
    if "etcd_endpoints" in kconf:
        for url in kconf["etcd_endpoints"].split(","):
            host = re.sub(r"^https?://", "", url).split(":")[0]
            check(("Service", host) in by,
                  f"etcd endpoint {url} is a Service of the manifests")
        env = {e["name"] for e in c.get("env", [])}
        check("KVSTORED_ADVERTISE_ADDR" in env or "advertise_addr" in kconf,
              "pods advertise their own address to etcd")
    drain_s = int(kconf.get("shutdown_timeout_ms", "30000")) / 1000
    check(pod["terminationGracePeriodSeconds"] > drain_s,
          "terminationGracePeriodSeconds exceeds the drain")

    # ---- the image: its runtime packages are Debian 12's names
    docker = open(os.path.join(DEPLOY, "Dockerfile")).read()
    stage = docker[docker.rindex("FROM "):]
    install = stage[stage.index("--no-install-recommends"):]
    install = install[:install.index("&&")]
    pkgs = re.findall(r"\b(lib[\w.+-]+)", install)
    if shutil.which("apt-cache"):
        r = subprocess.run(["apt-cache", "show"] + pkgs, capture_output=True,
                           text=True)
        found = set(re.findall(r"^Package: (\S+)", r.stdout, re.M))
        check(pkgs and set(pkgs) <= found,
              f"Dockerfile runtime packages exist in apt: {pkgs}")
    else:
        print("skip Dockerfile package check: no apt-cache")
finally:
    shutil.rmtree(tmp, ignore_errors=True)


# Required fields per kind (a schema check of what these manifests use:
# the apiserver would refuse an object without them).
REQUIRED = {
    "ConfigMap": [("data",)],
    "Service": [("spec", "ports"), ("spec", "selector")],
    "StatefulSet": [("spec", "selector", "matchLabels"), ("spec", "serviceName"),
                    ("spec", "template", "metadata", "labels"),
                    ("spec", "template", "spec", "containers")],
    "PodDisruptionBudget": [("spec", "selector", "matchLabels")],
}
API = {"ConfigMap": "v1", "Service": "v1", "StatefulSet": "apps/v1",
       "PodDisruptionBudget": "policy/v1"}


def check_schema(path):
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        kind = doc.get("kind")
        name = (doc.get("metadata") or {}).get("name")
        where = f"{os.path.basename(path)} {kind}/{name}"
        check(kind in API and doc.get("apiVersion") == API[kind] and name,
              f"{where}: known kind, its apiVersion, a name")
        for path_ in REQUIRED.get(kind, []):
            x = doc
            for k in path_:
                x = x.get(k) if isinstance(x, dict) else None
            check(x not in (None, [], {}), f"{where}: {'.'.join(path_)}")
        if kind == "StatefulSet":
            sel = doc["spec"]["selector"]["matchLabels"]
            lab = doc["spec"]["template"]["metadata"]["labels"]
            check(all(lab.get(k) == v for k, v in sel.items()),
                  f"{where}: the selector matches the pod labels")
            for c in doc["spec"]["template"]["spec"]["containers"]:
                check(c.get("name") and c.get("image"),
                      f"{where}: container {c.get('name')} has a name and image")
        if kind == "PodDisruptionBudget":
            spec = doc["spec"]
            check(("minAvailable" in spec) != ("maxUnavailable" in spec),
                  f"{where}: one of minAvailable / maxUnavailable")


for y in sorted(os.listdir(os.path.join(DEPLOY, "kubernetes"))):
    if y.endswith(".yaml"):
        check_schema(os.path.join(DEPLOY, "kubernetes", y))
if shutil.which("yamllint"):
    r = subprocess.run(["yamllint", "-s", os.path.join(DEPLOY, "kubernetes")],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"yamllint deploy/kubernetes: {r.stdout}")
else:
    print("skip yamllint: not installed (scripts/install-deps.sh installs it)")
kinds = [d.get("kind") for d in yaml.safe_load_all(
    open(os.path.join(DEPLOY, "kubernetes", "kvstored.yaml"))) if d]
check("PodDisruptionBudget" in kinds, "kvstored.yaml has a PodDisruptionBudget")


def check_local():
    import time
    if not shutil.which("etcd"):
        print("skip deploy/local: no etcd (apt-get install etcd-server)")
        return
    run = os.path.join(DEPLOY, "local", "run.sh")
    d = tempfile.mkdtemp(prefix="kvs-deploy-local-")
    env = dict(os.environ, KVSTORED=KVSTORED, KVCTL=KVCTL)
    try:
        r = subprocess.run([run, "start", d], env=env, capture_output=True,
                           text=True, timeout=60)
        check(r.returncode == 0, f"deploy/local start: {r.stderr[-500:]}")
        if r.returncode:
            return
        kv = dict(line.split("=", 1) for line in
                  open(os.path.join(d, "env")).read().split())
        env.update(kv)
        r = subprocess.run([run, "status", d], env=env, capture_output=True,
                           text=True, timeout=30)
        check(r.returncode == 0 and all(f"node{i}" in r.stdout
                                        for i in (1, 2, 3)),
              f"kvctl nodes lists node1-3: {r.stdout}{r.stderr}")
        ctl = [KVCTL, "--addr", kv["KVS_ADDR"]]
        r = subprocess.run(ctl + ["create", "7", "--layers", "1",
                                  "--q-heads", "2", "--kv-heads", "1",
                                  "--head-dim", "32"],
                           env=env, capture_output=True, text=True, timeout=30)
        check(r.returncode == 0, f"kvctl create: {r.stderr}")
        holders = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and holders < 2:
            r = subprocess.run(ctl + ["--json", "locate", "7"], env=env,
                               capture_output=True, text=True, timeout=30)
            try:
                holders = len(json.loads(r.stdout)["nodes"])
            except (ValueError, KeyError):
                holders = 0
            time.sleep(0.5)
        check(holders >= 2, f"repair puts sequence 7 on 2 nodes: {r.stdout}")
    finally:
        r = subprocess.run([run, "stop", d], env=env, capture_output=True,
                           text=True, timeout=120)
        check(r.returncode == 0, f"deploy/local stop: {r.stderr}")
        if shutil.which("pgrep"):
            left = subprocess.run(["pgrep", "-f", d], capture_output=True,
                                  text=True).stdout.split()
            check(not left, f"no process of {d} left after stop: {left}")
        shutil.rmtree(d, ignore_errors=True)


if KVCTL:
    check_local()

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("deploy: all checks passed")
