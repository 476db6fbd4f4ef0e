"""A throwaway OCI registry (distribution's ``docker-registry``), for tests and benchmarks.

It serves plain http on a free loopback port from a generated config, with filesystem storage
in a temporary directory (``blob_path`` reaches into it, to tamper with blobs), optionally
behind htpasswd Basic auth or behind token auth answered by an in-process token service
(``TokenIssuer``: JWTs signed with ``openssl``). Unlike PostgreSQL, the registry does not
refuse to run as root, and tests must write to its storage, so it runs as the caller.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import httpx

_DEBIAN_BINARY = "/usr/bin/docker-registry"


def find_registry_binary() -> Path | None:
    """``$GPUFLEET_REGISTRY_BIN``, ``docker-registry`` on PATH or Debian's path, or None."""
    for candidate in (
        os.environ.get("GPUFLEET_REGISTRY_BIN"),
        shutil.which("docker-registry"),
        _DEBIAN_BINARY,
    ):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OciRegistryServer:
    """Start with ``start()`` (or ``with``); ``host`` is the ``127.0.0.1:<port>`` to push to.

    ``htpasswd`` is the content of an htpasswd file (bcrypt hashes only, as distribution
    requires); ``token_users`` (user -> password) turns on token auth instead, with
    ``self.issuer`` recording the token requests. Without either, anyone may push and pull.
    """

    def __init__(
        self,
        *,
        htpasswd: str | None = None,
        token_users: Mapping[str, str] | None = None,
        binary: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if htpasswd is not None and token_users is not None:
            raise ValueError("choose htpasswd or token auth, not both")
        found = binary or find_registry_binary()
        if found is None:
            raise RuntimeError(
                "docker-registry not found; install Debian's 'docker-registry' package "
                "(make test does) or set GPUFLEET_REGISTRY_BIN"
            )
        self.binary = found
        self.htpasswd = htpasswd
        self.token_users = dict(token_users) if token_users is not None else None
        self.issuer: TokenIssuer | None = None
        self.start_timeout = start_timeout
        self.port = _free_port()
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage_dir(self) -> Path:
        assert self._tmp is not None, "registry not started"
        return self._tmp / "storage"

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None, "registry not started"
        return self._tmp / "registry.log"

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps the bytes of blob ``sha256:<hex>``."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage_dir / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def start(self) -> OciRegistryServer:
        self._tmp = Path(tempfile.mkdtemp(prefix="gpufleet-registry-"))
        self.storage_dir.mkdir()
        config = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.htpasswd is not None:
            (self._tmp / "htpasswd").write_text(self.htpasswd)
            config += ["auth:", "  htpasswd:", "    realm: gpufleet-test"]
            config += [f"    path: {self._tmp / 'htpasswd'}"]
        if self.token_users is not None:
            self.issuer = TokenIssuer(self._tmp / "token", self.token_users).start()
            config += ["auth:", "  token:", f"    realm: {self.issuer.url}/token"]
            config += [f"    service: {TokenIssuer.SERVICE}", f"    issuer: {TokenIssuer.ISSUER}"]
            config += [f"    rootcertbundle: {self.issuer.cert_path}"]
        (self._tmp / "config.yml").write_text("\n".join(config) + "\n")
        with self.log_path.open("wb") as log:
            # A clean environment: distribution reads REGISTRY_* variables as config overrides.
            self._proc = subprocess.Popen(
                [str(self.binary), "serve", str(self._tmp / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TZ": "UTC"},
                cwd=self._tmp,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited at start:\n{self._log_tail()}")
            try:
                # 401 means up, behind auth.
                if httpx.get(f"{self.url}/v2/", timeout=1.0).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer /v2/:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.issuer is not None:
            self.issuer.stop()
            self.issuer = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> OciRegistryServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TokenIssuer:
    """The token service of distribution's token auth, enough for tests: it checks Basic
    credentials against ``users``, grants whatever scope is asked for, and records each request
    as ``(user or None, scopes)`` in ``requests``. Tokens are RS256 JWTs whose ``x5c`` header
    carries the self-signed certificate that the registry trusts as its root."""

    SERVICE = "gpufleet-test-registry"
    ISSUER = "gpufleet-test-issuer"

    def __init__(self, workdir: Path, users: Mapping[str, str], lifetime: int = 300) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.lifetime = lifetime
        self.requests: list[tuple[str | None, list[str]]] = []
        self.key_path = workdir / "token.key"
        self.cert_path = workdir / "token.crt"
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "token issuer not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> TokenIssuer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gpufleet-test-token",
            "-keyout",
            str(self.key_path),
            "-out",
            str(self.cert_path),
        )
        der = _openssl("x509", "-in", str(self.cert_path), "-outform", "DER")
        self._x5c = base64.b64encode(der).decode("ascii")
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = issuer._answer(self.path, self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        user: str | None = None
        if authorization is not None:
            scheme, _, encoded = authorization.partition(" ")
            name, _, password = base64.b64decode(encoded).decode().partition(":")
            if scheme != "Basic" or self.users.get(name) != password:
                return 401, b'{"details": "bad credentials"}'
            user = name
        scopes = parse_qs(urlsplit(path).query).get("scope", [])
        self.requests.append((user, scopes))
        if user is None:
            return 401, b'{"details": "credentials required"}'
        access: list[dict[str, object]] = []
        for scope in scopes:  # "repository:models/demo:pull,push"
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        return 200, json.dumps({"token": self._sign(user, access)}).encode()

    def _sign(self, user: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": user,
            "aud": self.SERVICE,
            "iat": now,
            "nbf": now - 10,
            "exp": now + self.lifetime,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header))}.{_b64url(json.dumps(claims))}"
        signature = _openssl(
            "dgst", "-sha256", "-sign", str(self.key_path), input=signing_input.encode()
        )
        return f"{signing_input}.{_b64url(signature)}"


def _openssl(*args: str, input: bytes | None = None) -> bytes:
    out = subprocess.run(["openssl", *args], input=input, capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {out.stderr.decode(errors='replace')}")
    return out.stdout


def _b64url(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
