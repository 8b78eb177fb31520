"""Checks the deployment files in deploy/: every Kubernetes manifest against the API's schema (strict, with
kubernetes-validate), the ServiceMonitor (a CRD, outside those schemas) and the references between the
manifests by hand, the compose file with docker-compose's own validator, and every `flywheel` command line in
them against the binary's flags.

    .venv/bin/python deploy/check.py --flywheel target/debug/flywheel

Needs kubernetes-validate (PyPI, in .venv) and docker-compose (Debian's package); scripts/test.sh installs
both. Exits non-zero naming each problem."""

import argparse
import glob
import os
import re
import subprocess
import sys

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KUBERNETES = "1.30.0"


def manifests():
    for path in sorted(glob.glob(os.path.join(HERE, "kubernetes", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield os.path.basename(path), doc


def command_flags(binary):
    """The flags of `flywheel serve` and `flywheel worker`, as this build's --help lists them."""
    flags = {}
    for command in ("serve", "worker"):
        out = subprocess.run([binary, command, "--help"], capture_output=True, text=True, check=True).stdout
        flags[command] = set(re.findall(r"--[a-z][a-z-]*", out))
    return flags


def check_command(where, args, flags, problems):
    if not args or args[0] not in flags:
        problems.append(f"{where}: the command is not `flywheel serve|worker …`: {args}")
        return
    for arg in args[1:]:
        if arg.startswith("--") and arg not in flags[args[0]]:
            problems.append(f"{where}: `flywheel {args[0]}` has no flag {arg}")
    if args[0] == "worker" and "--no-trainer" in args:
        problems.append(f"{where}: a worker that does not train")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flywheel", required=True, help="the flywheel binary")
    flags = command_flags(parser.parse_args().flywheel)
    problems = []
    docs = list(manifests())
    by_kind = {}
    for name, doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")
    names = {kind: {d["metadata"]["name"] for d in ds} for kind, ds in by_kind.items()}
    namespaces = names.get("Namespace", set())
    for name, doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and ns not in namespaces:
            problems.append(f"{name}: namespace {ns!r} is not created here")
    pod_labels = []
    for deploy in by_kind.get("Deployment", []):
        where = f"Deployment {deploy['metadata']['name']}"
        spec = deploy["spec"]
        labels = spec["template"]["metadata"]["labels"]
        pod_labels.append(labels)
        if any(labels.get(k) != v for k, v in spec["selector"]["matchLabels"].items()):
            problems.append(f"{where}: its selector does not match its pods")
        pod = spec["template"]["spec"]
        for c in pod["containers"]:
            check_command(where, c.get("args", []), flags, problems)
            # Liveness on /ready too: a replica whose model or trainer thread ended needs a restart.
            # A startup probe holds liveness off while the model and adapters load (/ready is 503 then).
            for probe, path in (
                ("readinessProbe", "/ready"),
                ("startupProbe", "/ready"),
                ("livenessProbe", "/ready"),
            ):
                if c.get(probe, {}).get("httpGet", {}).get("path") != path:
                    problems.append(f"{where}: {probe} should GET {path}")
            if pod.get("enableServiceLinks") is not False:
                problems.append(f"{where}: enableServiceLinks should be false (FLYWHEEL_PORT=tcp://…)")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in names.get("Secret", set()):
                    problems.append(f"{where}: secret {ref['name']} is not defined here")
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for m in mounted - volumes.keys():
                problems.append(f"{where}: mounts undeclared volume {m}")
            for v in volumes.values():
                claim = v.get("persistentVolumeClaim", {}).get("claimName")
                if claim and claim not in names.get("PersistentVolumeClaim", set()):
                    problems.append(f"{where}: claim {claim} is not defined here")
    services = by_kind.get("Service", [])
    for svc in services:
        sel = svc["spec"]["selector"]
        if not any(all(l.get(k) == v for k, v in sel.items()) for l in pod_labels):
            problems.append(f"Service {svc['metadata']['name']}: selects no pod")
    for mon in by_kind.get("ServiceMonitor", []):
        want = mon["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
        if not chosen:
            problems.append(f"ServiceMonitor {mon['metadata']['name']}: selects no Service")
        for ep in mon["spec"]["endpoints"]:
            if ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor {mon['metadata']['name']}: scrapes {ep.get('path')}, not /metrics")
            for s in chosen:
                if ep["port"] not in {p.get("name") for p in s["spec"]["ports"]}:
                    problems.append(f"ServiceMonitor: Service {s['metadata']['name']} has no port {ep['port']}")
    compose = os.path.join(HERE, "compose.yaml")
    run = subprocess.run(["docker-compose", "-f", compose, "config", "-q"], capture_output=True, text=True)
    if run.returncode != 0:
        problems.append(f"compose.yaml: {run.stderr.strip()}")
    with open(compose) as f:
        for service, spec in yaml.safe_load(f)["services"].items():
            if "command" in spec:
                check_command(f"compose service {service}", spec["command"], flags, problems)
    for p in problems:
        print(p)
    print(f"{len(docs)} Kubernetes objects and compose.yaml checked: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
