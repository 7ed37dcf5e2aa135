"""A real Prometheus server for the tests, shared by the whole session (a pytest plugin module).

Test modules that need it say `pytest_plugins = ["tests.prometheus_server"]` (and import nothing from it,
which would keep pytest from rewriting its asserts); pytest registers this module once, so every module
gets the same server. The server scrapes every second whatever targets the tests
register through file-based service discovery, and evaluates the project's alert rules every second:

    with prometheus.targets("two-ranks", [m0.url, m1.url], {"training_job": "local"}):
        series = prometheus.wait_for('nvp_train_step{training_job="local"}', lambda r: len(r) == 2)

`targets()` writes one file_sd file per call (removed on exit), so a test adds scrape targets, such as the
ranks of a training job it launched, without restarting or reloading the server. Debian's `prometheus`
package is installed by launch/install_debian.sh when missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest
import yaml

from tests.launch_helpers import ServerProcess

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "k8s" / "monitoring" / "prometheusrule.yaml"


def ensure_prometheus_installed() -> None:
    """Install Debian's prometheus and promtool if either is missing; fail the test run if that fails."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    done = subprocess.run(["bash", str(REPO / "launch" / "install_debian.sh"), "prometheus,promtool", "prometheus"], capture_output=True, text=True)
    if done.returncode or not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.fail(f"could not install Debian's prometheus package (root and apt are needed):\n{done.stderr[-2000:]}")


def write_rule_file(dest: Path) -> Path:
    """The PrometheusRule's spec is a plain Prometheus rule file: write it where promtool/prometheus read it."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    dest.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer(ServerProcess):
    """One prometheus process on 127.0.0.1 with a throw-away TSDB under `workdir`."""
    LOG = "prometheus.log"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sd_dir = workdir / "sd"
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        rules = write_rule_file(workdir / "nvp-rules.yaml")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "nvp",
                "file_sd_configs": [{"files": [str(self.sd_dir / "*.json")], "refresh_interval": "1s"}],
            }],
        }
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        # A free port can be taken between the probe and prometheus's bind; one more try covers that race.
        for _ in range(2):
            self.port = free_port()
            log = open(self.workdir / self.LOG, "ab")
            self._proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return
                time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log_tail()}")


    @contextlib.contextmanager
    def targets(self, name: str, urls: Sequence[str], labels: Mapping[str, str] | None = None) -> Iterator[None]:
        """Scrape these `http://host:port/metrics` URLs (with extra target labels) while the block runs."""
        hosts = []
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            if parts.path != "/metrics":
                raise ValueError(f"{url}: the scrape config reads /metrics")
            hosts.append(parts.netloc)
        path = self.sd_dir / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        # Written aside and renamed: the discovery watcher must never read a half-written file.
        tmp.write_text(json.dumps([{"targets": hosts, "labels": dict(labels or {})}]))
        os.replace(tmp, path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def api(self, endpoint: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{endpoint} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query; raises on a PromQL error. Each result: {"metric": {labels}, "value": [t, "v"]}."""
        return self.api("query", query=promql)["result"]

    def rule_groups(self) -> list[dict]:
        """The loaded rule groups with each rule's `health`, `lastError` and `state`."""
        return self.api("rules")["groups"]

    def wait_for(self, promql: str, ok: Callable[[list[dict]], bool], timeout: float = 30.0) -> list[dict]:
        """Poll an instant query until `ok(result)`; the scrape and rule intervals are 1 s."""
        return poll(lambda: self.query(promql), ok, timeout, promql)


def poll(fetch: Callable[[], list], ok: Callable[[list], bool], timeout: float, what: str) -> list:
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never satisfied the condition in {timeout}s; last result: {result}")
        time.sleep(0.5)


@pytest.fixture
def rule_file(tmp_path: Path) -> Path:
    """k8s/monitoring/prometheusrule.yaml's rules as `nvp-rules.yaml` in the test's tmp_path."""
    return write_rule_file(tmp_path / "nvp-rules.yaml")


@pytest.fixture(scope="session")
def promtool() -> str:
    ensure_prometheus_installed()
    return shutil.which("promtool")


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    ensure_prometheus_installed()
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
