"""Read the manifests under k8s/ and turn the Job's container into a command this machine can run.

The point is to execute the manifest's own command and environment, not a copy: `job_command()` takes
them from the YAML and changes only what a pod has and a local process does not, each change explicit:
  - the completion index, which Kubernetes puts in the pod's annotation (downward API `fieldRef`);
  - `$(VAR)` references, expanded as the kubelet does;
  - stable hostnames (nvp-train-0.nvp-train), mapped to loopback;
  - mount paths (/etc/nvp-dist, /workspace, ...), mapped to local directories;
  - the container's init (tini -g): locally the caller starts the argv in a new session and signals its
    process group, which is what `tini -g` does in the pod.
"""
from __future__ import annotations

import re
import socket
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


def load_manifests(directory: Path = K8S) -> list[tuple[Path, dict]]:
    """Every document of every *.yaml/*.yml/*.json directly in `directory`, as `kubectl apply -f DIR` reads them."""
    docs = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
            docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[tuple[Path, dict]], kind: str, name: Optional[str] = None) -> dict:
    found = [d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def trainer_container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


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


def container_env(container: dict, index: int) -> dict[str, str]:
    """The container's environment as the kubelet builds it for completion index `index`."""
    env: dict[str, str] = {}
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
                cwd: Path, env_overrides: Optional[Mapping[str, str]] = None) -> LocalCommand:
    """The Job container's argv and env for completion `index`, with stable hostnames replaced through
    `hosts` and mount paths through `paths` ({mountPath: local dir}); `cwd` stands for the image's workingDir.
    Start `argv` with `start_new_session=True` and signal the group, as tini -g would."""
    container = trainer_container(job)
    if container.get("command") != INIT:
        raise ValueError(f"expected the container's command to be {INIT}, got {container.get('command')}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    unknown = set(paths) - mounts
    if unknown:
        raise ValueError(f"not mount paths of the container: {sorted(unknown)}")
    env = container_env(container, index)
    env.update(env_overrides or {})

    def localize(text: str) -> str:
        for host, addr in hosts.items():
            text = text.replace(host, addr)
        return localize_paths(text, paths)

    env = {k: localize(v) for k, v in env.items()}
    argv = [localize(expand_vars(a, env)) for a in container["args"]]
    return LocalCommand(argv, env, cwd)


def localize_paths(text: str, paths: Mapping[str, Path]) -> str:
    """`text` with every mount path of `paths` ({mountPath: local dir}) replaced by its local directory: what
    the pod reads at /workspace/... this machine reads in the directory standing for that volume."""
    # Longest first, so that a mount nested in another maps to its own directory.
    for mount in sorted(paths, key=len, reverse=True):
        text = re.sub(re.escape(mount) + r"(?=/|\b|$)", str(paths[mount]), text)
    return text


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
