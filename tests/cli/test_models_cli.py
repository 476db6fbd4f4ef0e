"""``gpufleet models ...`` on a data dir's registry: readable lines, exit codes, --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpufleet.cli.main import app
from tests.models.registry_helpers import make_scale_model

runner = CliRunner()


@pytest.fixture
def cli(models_cli: Any) -> Any:
    return models_cli


def test_validate_ok_and_every_problem_on_its_own_line(cli: Any, tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    ok = cli("validate", str(model))
    assert ok.exit_code == 0 and "ok: scale@1.0.0 (python, fp32" in ok.output
    (model / "model.yaml").write_text(
        "model:\n  name: scale\n  version: '1'\n  format: hf\n  precision: fp4\n"
        "  compatibility: {cuda: '>=12.x'}\n"
    )
    bad = cli("validate", str(model))
    assert bad.exit_code == 1
    lines = bad.output.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        "model.precision: Input should be 'fp32', 'fp16', 'bf16' or 'fp8' (got 'fp4')"
    )
    assert lines[1].endswith(
        "model.compatibility.cuda: '>=12.x' is not a version range "
        "(write e.g. '>=12.2' or '>=11.8,<13')"
    )
    assert "Traceback" not in bad.output
    as_json = json.loads(cli("validate", str(model), "--json").stdout)
    assert as_json["valid"] is False and len(as_json["problems"]) == 2


def test_validate_builds_loads_and_tries_the_model(cli: Any, tmp_path: Path) -> None:
    extra = "  example_input: {x: 2}\n  resources: {gpu: {mode: none}}\n"
    model = make_scale_model(tmp_path / "m", extra=extra)
    ok = cli("validate", str(model))
    assert ok.exit_code == 0, ok.output
    assert "built, loaded on cpu, predict answered the example_input" in ok.output
    (model / "weights.safetensors").unlink()
    bad = cli("validate", str(model / "model.yaml"))
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    first, *frames = bad.output.strip().splitlines()
    assert first.startswith(f"{model / 'runner.py'}: load: load('cpu') raised ")
    assert frames[0].strip().startswith('File "runner.py", line') and "in load" in frames[0]
    as_json = json.loads(cli("validate", str(model), "--json").stdout)
    assert as_json["valid"] is False
    assert as_json["problems"][0].startswith("load: load('cpu') raised")
    assert as_json["details"][0]["where"] == "load" and as_json["device"] is None


def test_package_stores_nothing_for_a_model_that_fails(cli: Any, tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m", extra="  example_input: {y: 2}\n")
    out = cli("package", str(model))
    assert out.exit_code == 1
    assert "predict: raised KeyError: 'x' on a batch of 1" in out.output
    assert "not packaged: fix the problems above" in out.output
    assert json.loads(cli("list", "--json").stdout) == []
    unchecked = json.loads(cli("package", str(model), "--no-check", "--json").stdout)
    assert (unchecked["name"], unchecked["version"]) == ("scale", "1.0.0")  # model.yaml only
    assert cli("rm", "scale@1.0.0").exit_code == 0
    yaml_text = (model / "model.yaml").read_text()
    (model / "model.yaml").write_text(yaml_text.replace("{y: 2}", "{x: 2}"))
    (model / "link.txt").symlink_to("/etc/passwd")
    refused = cli("package", str(model))
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert "link.txt -> /etc/passwd (outside" in refused.output
    assert json.loads(cli("list", "--json").stdout) == []


def test_package_list_show_tag_rm_gc(cli: Any, tmp_path: Path) -> None:
    packaged = json.loads(cli("package", str(make_scale_model(tmp_path / "a")), "--json").stdout)
    assert packaged["name"] == "scale" and packaged["digest"].startswith("sha256:")
    out = cli(
        "package", str(make_scale_model(tmp_path / "b", version="2.0.0", scale=2)), "-t", "canary"
    )
    assert out.exit_code == 0 and "scale@2.0.0 sha256:" in out.output and "canary" in out.output
    listing = json.loads(cli("list", "--json").stdout)
    assert [(a["version"], a["tags"]) for a in listing] == [("1.0.0", []), ("2.0.0", ["canary"])]
    table = cli("list").output
    assert "scale" in table and "canary" in table
    shown = json.loads(cli("show", "scale@canary", "--json").stdout)
    assert [f["path"] for f in shown["files"]] == ["model.yaml", "runner.py", "weights.safetensors"]
    assert shown["manifest"]["model"]["version"] == "2.0.0"
    assert "weights.safetensors" in cli("show", "scale@1.0.0").output
    assert cli("tag", "scale@1.0.0", "stable").exit_code == 0
    assert cli("verify", "scale").output.startswith("ok: scale@1.0.0")
    refused = cli("rm", "scale@1.0.0")
    assert refused.exit_code == 1 and refused.output.startswith("conflict: scale@1.0.0 is tagged")
    assert cli("rm", "scale@1.0.0", "--force").exit_code == 0
    assert "unreferenced blobs" in cli("gc").output
    missing = cli("show", "scale@1.0.0")
    assert missing.exit_code == 1 and missing.output.startswith(
        "not_found: 'scale@1.0.0' not found"
    )


def test_package_refuses_changed_content_under_a_version(cli: Any, tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    assert cli("package", str(model)).exit_code == 0
    make_scale_model(model, scale=7.0)
    out = cli("package", str(model))
    assert out.exit_code == 1 and "versions are immutable" in out.output
    assert cli("package", str(tmp_path / "nope")).output.startswith("invalid_input:")


def test_push_pull_round_trip_through_a_real_registry(cli: Any, tmp_path: Path) -> None:
    from gpufleet.testing.oci_registry import OciRegistryServer, find_registry_binary

    if find_registry_binary() is None:
        pytest.skip("docker-registry (Debian package) is not installed")
    model = make_scale_model(tmp_path / "m", scale=4.0)
    packaged = json.loads(cli("package", str(model), "--json").stdout)
    with OciRegistryServer() as server:
        target = f"{server.host}/team/scale"
        pushed = cli("push", "scale@1.0.0", target, "--json")
        assert pushed.exit_code == 0, pushed.output
        assert json.loads(pushed.stdout)["target"] == f"{target}:1.0.0"
        # A second machine: an empty data dir pulls it, digests checked, same artifact.
        env = {"GPUFLEET_DATA_DIR": str(tmp_path / "other"), "NO_COLOR": "1"}
        pulled = runner.invoke(app, ["models", "pull", f"{target}:1.0.0", "--json"], env=env)
        assert pulled.exit_code == 0, pulled.output
        assert json.loads(pulled.stdout)["digest"] == packaged["digest"]
        shown = runner.invoke(app, ["models", "show", "scale@1.0.0", "--json"], env=env)
        assert json.loads(shown.stdout)["digest"] == packaged["digest"]
        missing = runner.invoke(app, ["models", "pull", f"{target}:9.9.9"], env=env)
        assert missing.exit_code == 1 and missing.output.startswith("not_found:")


def test_pull_refuses_a_manifest_its_blobs_contradict(cli: Any, tmp_path: Path) -> None:
    from gpufleet.models.registry import A_BLAKE3, Registry
    from gpufleet.models.remote import push
    from gpufleet.testing.oci_registry import OciRegistryServer, find_registry_binary

    if find_registry_binary() is None:
        pytest.skip("docker-registry (Debian package) is not installed")
    packaged = json.loads(cli("package", str(make_scale_model(tmp_path / "m")), "--json").stdout)
    local = Registry(tmp_path / "data" / "registry")
    manifest = json.loads(local.manifest_bytes(packaged["digest"]))
    manifest["layers"][0]["annotations"][A_BLAKE3] = "0" * 64  # every sha256 still right
    forged = local.write_blob(json.dumps(manifest).encode())
    with OciRegistryServer() as server:
        target = f"{server.host}/team/scale:forged"
        push(local.root, forged, target)
        env = {"GPUFLEET_DATA_DIR": str(tmp_path / "other"), "NO_COLOR": "1"}
        pulled = runner.invoke(app, ["models", "pull", target], env=env)
        assert pulled.exit_code == 1, pulled.output
        assert pulled.output.startswith("integrity_error:") and "blake3" in pulled.output
        listed = runner.invoke(app, ["models", "list", "--json"], env=env)
        assert listed.exit_code == 0 and json.loads(listed.stdout) == []


@pytest.mark.parametrize("name", ["text-stats", "slow-diffusion", "digit-classifier"])
def test_validate_passes_on_every_example(cli: Any, name: str) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / name
    out = cli("validate", str(example))
    assert out.exit_code == 0, out.output
    assert "loaded on cpu, predict answered the example_input" in out.output
