"""A real Prometheus server for end-to-end tests (Debian's `prometheus` package).

`PrometheusServer(root).start(jobs)` writes `prometheus.yml` under `root`
(one scrape job per name, static targets `host:port`, every second), runs
`prometheus --config.file ... --storage.tsdb.path ... --web.listen-address
127.0.0.1:<free port>` as a child process with its log in `root`, and waits
until `/-/ready` answers. `query(expr)` asks `/api/v1/query` and returns the
vector result as [(labels, value)]; `value(expr)` the single value or None.
`stop()` ends the process (SIGTERM, then SIGKILL) and deletes its data
directory. It never touches a system Prometheus or its service.

`why_unavailable()` says why no server can run here (the binary is missing);
the tests skip on that, or fail when CI=true (CI must run them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.harness import tail

from roles.localprocs import free_ports, wait_for

BINARY = os.environ.get("SPEEDSYNC_PROMETHEUS", "/usr/bin/prometheus")


def why_unavailable() -> str | None:
    path = BINARY if os.path.isabs(BINARY) else shutil.which(BINARY)
    if not path or not os.access(path, os.X_OK):
        return f"no prometheus binary at {BINARY} (apt-get install prometheus; make debian-deps does it as root)"
    return None


class PrometheusServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "tsdb"
        self.log_path = self.root / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"

    def start(self, jobs: dict[str, list[str]], timeout_s: float = 60) -> "PrometheusServer":
        self.root.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                                     for job, targets in jobs.items()]}
        config_path = self.root / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BINARY, f"--config.file={config_path}", f"--storage.tsdb.path={self.data}",
                                      f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, cwd=self.root)
        wait_for(self._ready, timeout_s, f"prometheus ready at {self.url}", 0.2, on_timeout=self.log_tail)
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """An instant query: [(labels, value)] of the vector it returns (a scalar as one entry)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                doc = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400: not valid PromQL; 422: cannot be evaluated
            raise AssertionError(f"query {expr!r} refused: {exc.code} {exc.read().decode(errors='replace')}") from None
        if doc["status"] != "success":
            raise AssertionError(f"query {expr!r} failed: {doc}")
        data = doc["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The one value `expr` yields, or None while it yields none (not scraped yet)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} yields {len(result)} series: {result}"
        return result[0][1] if result else None

    def log_tail(self, lines: int = 30) -> str:
        return "----- prometheus.log -----\n" + tail(self.log_path, lines)

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.data, ignore_errors=True)
