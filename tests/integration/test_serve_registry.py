"""package -> list -> serve from the registry -> result; a tampered version is never served."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpufleet.models.registry import Registry
from tests.integration.serve_helpers import Serve, serving
from tests.models.registry_helpers import make_scale_model

pytestmark = pytest.mark.slow


def test_serve_a_packaged_version_by_tag(tmp_path: Path) -> None:
    data = tmp_path / "data"
    registry = Registry(data / "registry")
    registry.package(make_scale_model(tmp_path / "v1", scale=3.0), tags=("stable",))
    registry.package(make_scale_model(tmp_path / "v2", version="2.0.0", scale=10.0))
    assert [a.version for a in registry.versions("scale")] == ["1.0.0", "2.0.0"]
    with serving(data, "--model", "scale@stable") as s, s.client() as c:
        [model] = c.get("/v1/models").json()["models"]
        assert (model["name"], model["version"]) == ("scale", "1.0.0")
        r = c.post("/v1/models/scale/infer", params={"wait": 30}, json={"input": {"x": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["result"] == {"y": 6.0}


def test_a_tampered_version_is_refused_and_not_restarted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    registry = Registry(data / "registry")
    a = registry.package(make_scale_model(tmp_path / "m"))
    weights = registry.blob_path(next(f.blob for f in a.files if f.path.endswith(".safetensors")))
    os.chmod(weights, 0o644)
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # the scale's last byte: the file still parses
    weights.write_bytes(bytes(blob))
    s = Serve(data, "--model", "scale@1.0.0").start(ready_path="/livez")
    try:
        deadline = time.monotonic() + 60
        while "not restarting" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = s.output()
        assert "refused: integrity_error: scale@1.0.0:weights.safetensors" in out
        assert "not restarting" in out
        with s.client() as c:
            health = c.get("/healthz")
            assert health.status_code == 503  # not ready: no worker has the model
            assert health.json()["checks"]["workers:scale"] == (
                "0/1 ready, 1 refused to load it (not restarted; the reason is in the serve log)"
            )
            r = c.post("/v1/models/scale/infer", params={"wait": 1}, json={"input": {"x": 2}})
            assert r.json()["status"] == "queued"  # accepted and kept, never served wrong
    finally:
        s.stop()
