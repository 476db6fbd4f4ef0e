"""A throwaway PostgreSQL server from the host's packages, for tests and benchmarks.

It runs ``initdb`` and ``pg_ctl`` in a temporary directory and listens on a free loopback port
(and a private Unix socket directory). PostgreSQL refuses to run as root, so when the caller is
root the cluster belongs to, and runs as, an unprivileged account (``postgres`` when it exists).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

_UNPRIVILEGED_USERS = ("postgres", "nobody")


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is absent."""
    candidates: list[Path] = []
    if os.environ.get("GPUFLEET_PG_BINDIR"):
        candidates.append(Path(os.environ["GPUFLEET_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    # Debian keeps the server binaries out of PATH, one directory per major version.
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """Start with ``start()`` (or ``with``); ``url(dbname)`` gives a SQLAlchemy URL."""

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        user: str = "gpufleet",
        bindir: Path | None = None,
    ) -> None:
        found = bindir or find_pg_bindir()
        if found is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found; install Debian's 'postgresql' package "
                "(make test does) or set GPUFLEET_PG_BINDIR"
            )
        self.bindir = found
        self.user = user
        self.port = _free_port()
        self.settings = dict(settings or {})
        self._tmp: str | None = None
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in _UNPRIVILEGED_USERS:
                try:
                    self._run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self._run_as is None:
                raise RuntimeError("running as root and no unprivileged user to run PostgreSQL")

    @property
    def datadir(self) -> Path:
        assert self._tmp is not None, "server not started"
        return Path(self._tmp) / "data"

    @property
    def socket_dir(self) -> Path:
        assert self._tmp is not None, "server not started"
        return Path(self._tmp) / "sock"

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if self._run_as is not None:
                os.setgid(self._run_as.pw_gid)
                os.setuid(self._run_as.pw_uid)

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=demote if self._run_as is not None else None,
            check=False,
            cwd="/",
        )

    def start(self) -> PostgresServer:
        self._tmp = tempfile.mkdtemp(prefix="gpufleet-pg-")
        self.socket_dir.mkdir()
        if self._run_as is not None:
            for p in (Path(self._tmp), self.socket_dir):
                os.chown(p, self._run_as.pw_uid, self._run_as.pw_gid)
        init = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            **self.settings,
        }
        with (self.datadir / "postgresql.conf").open("a") as f:
            for k, v in opts.items():
                f.write(f"{k} = '{v}'\n")
        ctl = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(Path(self._tmp) / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        if ctl.returncode != 0:
            log = Path(self._tmp) / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {ctl.stderr.strip()}\n{tail}")
        return self

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (optionally from ``template``) and return its URL."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            tmpl = f" TEMPLATE {template}" if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{tmpl}')
        return self.url(name)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL using psycopg 3."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def pause(self) -> None:
        """Stop the server, keeping its data (to test outages); ``resume`` starts it again."""
        out = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"]
        )
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {out.stderr.strip()}")

    def resume(self) -> None:
        log = str(Path(self._tmp or "/") / "server.log")
        out = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", log, "-w", "start"]
        )
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {out.stderr.strip()}")

    def stop(self) -> None:
        if self._tmp is None:
            return
        if (self.datadir / "postmaster.pid").exists():
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]
            )
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
