"""A real PostgreSQL server for tests (Debian's `postgresql` package: initdb, pg_ctl, postgres).

`PgServer().start()` makes a temporary directory (under /tmp: pytest's tmp_path is closed to other
users), runs `initdb` there as an unprivileged user (root's own runs drop to `nobody`, or to a
system user `speedsync-pg` made with useradd where there is no nobody: PostgreSQL refuses to run as
root), and `pg_ctl start` on a free port, listening on a unix socket in that directory only (no
TCP), trust authentication. `create_database()` returns the `catalog_url` of a new empty database.
`stop()` (pg_ctl stop -m fast) and `start()` again keep the data: an outage, then recovery.
`remove()` stops it and deletes the directory. It never touches a system PostgreSQL or its service.

`why_unavailable()` says why no server can run here (the binaries are missing); the tests skip on
that, or fail when CI=true (tests/needs.py: CI must run them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from roles.localprocs import free_ports, wait_for
from tests.harness import tail

SUPERUSER = "speedsync"


def bindir() -> str | None:
    """The directory of initdb/pg_ctl/postgres: SPEEDSYNC_PG_BINDIR, else Debian's newest, else PATH."""
    if os.environ.get("SPEEDSYNC_PG_BINDIR"):
        return os.environ["SPEEDSYNC_PG_BINDIR"]
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4])
                    if p.split("/")[4].isdigit() else 0)
    if debian:
        return os.path.dirname(debian[-1])
    found = shutil.which("postgres")
    return os.path.dirname(found) if found else None


def why_unavailable() -> str | None:
    where = bindir()
    if where is None:
        return "no PostgreSQL server binaries (apt-get install postgresql; make debian-deps does it as root)"
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not os.access(os.path.join(where, tool), os.X_OK):
            return f"no {tool} in {where} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    return None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "speedsync-pg"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "speedsync-pg"],
                   check=True, capture_output=True)
    return pwd.getpwnam("speedsync-pg")


class PgServer:
    def __init__(self):
        self.bin = bindir()
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="speedsync-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        (self.port,) = free_ports(1)
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.initialised = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run([os.path.join(self.bin, args[0]), *args[1:]], capture_output=True, text=True,
                              check=check, cwd=self.root, env={**os.environ, "LC_ALL": "C", "HOME": str(self.root)},
                              timeout=120, **kwargs)

    def start(self) -> "PgServer":
        if not self.initialised:
            done = self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                             "--no-sync", "--no-instructions", check=False)
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr}{done.stdout}")
            self.initialised = True
        options = f"-p {self.port} -k {self.root} -c listen_addresses='' -c max_connections=50"
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "-t", "60",
                         "start", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stderr}{done.stdout}\n"
                               f"{self.log_tail()}")
        wait_for(self._accepts, 30, "postgresql accepting connections", 0.1, on_timeout=self.log_tail)
        return self

    def _accepts(self) -> bool:
        return self._run("pg_isready", "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER,
                         check=False).returncode == 0

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.root}&port={self.port}"

    def create_database(self) -> str:
        import psycopg
        name = f"catalog_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """pg_ctl stop -m fast: sessions are ended, the data stays."""
        if self.initialised and (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return "----- postgres.log -----\n" + tail(self.log_path, lines)
