"""``gpufleet doctor``: exit codes 0 / 1 / 2, the table and the JSON, facts saved on one host
and diagnosed from the file, models given as directories, built-ins and registry versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.cli.main import app
from gpufleet.gpu.nvml import RECORDING_ENV
from tests.models.registry_helpers import make_scale_model

HOSTS = Path(__file__).parents[1] / "gpu" / "fixtures" / "hosts"
H100_RECORDING = Path(__file__).parents[1] / "gpu" / "fixtures" / "h100.nvml.json"
runner = CliRunner()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv(RECORDING_ENV, raising=False)
    env = {"GPUFLEET_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "250", "NO_COLOR": "1"}

    def invoke(*args: str, **extra: str) -> Result:
        return runner.invoke(app, list(args), env=env | extra)

    return invoke


def host(name: str) -> str:
    return str(HOSTS / f"{name}.json")


def test_errors_found_exit_1_with_why_and_fix(cli: Any) -> None:
    out = cli("doctor", "--facts", host("a10-driver515-cu121"), "builtin:digits")
    assert out.exit_code == 1, out.output
    assert "severity" in out.output and "subject" in out.output and "found" in out.output
    assert "torch 2.5.1+cu121 is built for CUDA 12.1; driver 515.65.01" in out.output
    assert "  why: A driver older than the runtime's major version" in out.output
    assert "  fix: upgrade the driver to one for CUDA 12.x, or pick a base image" in out.output
    assert out.output.rstrip().endswith("1 error, 0 warnings")


def test_a_healthy_host_exits_0(cli: Any) -> None:
    out = cli("doctor", "--facts", host("h100-driver580-cu130"), "builtin:digits")
    assert out.exit_code == 0, out.output
    assert "GPU 0 NVIDIA H100 80GB HBM3" in out.output and "digits@1" in out.output
    assert "why:" not in out.output  # info rows carry no explanation
    assert out.output.rstrip().endswith("0 errors, 0 warnings")


def test_json_shape(cli: Any) -> None:
    out = cli("doctor", "--json", "--facts", host("a10-driver515-cu121"))
    assert out.exit_code == 1
    report = json.loads(out.stdout)
    assert set(report) == {"findings", "errors", "warnings"}
    assert (report["errors"], report["warnings"]) == (1, 0)
    for finding in report["findings"]:
        assert set(finding) == {"severity", "check", "found", "why", "fix", "subject"}
    assert [f["check"] for f in report["findings"] if f["severity"] == "error"] == [
        "cuda.driver_older_than_runtime"
    ]


def test_a_model_directory_on_a_t4(cli: Any, tmp_path: Path) -> None:
    bf16 = make_scale_model(tmp_path / "bf16", extra="  precision: bf16\n")
    out = cli("doctor", "--facts", host("t4-driver535"), str(bf16))
    assert out.exit_code == 1
    assert "scale@1.0.0 on GPU 0 Tesla T4" in out.output
    assert "  fix: set precision: fp16" in out.output


def test_a_registry_version(cli: Any, tmp_path: Path) -> None:
    mps = "  resources: {gpu: {mode: mps, memory_gb: 4, compute_percent: 50}}\n"
    model = make_scale_model(tmp_path / "m", version="2.0.0", extra=mps)
    assert cli("models", "package", str(model)).exit_code == 0
    old = json.loads(
        cli("doctor", "--json", "--facts", host("v100-driver470"), "scale@2.0.0").stdout
    )
    assert [f["check"] for f in old["findings"] if f["severity"] == "error"] == ["mps.memory_limit"]
    new = cli("doctor", "--facts", host("v100-driver535"), "scale@2.0.0")
    assert new.exit_code == 0, new.output


def test_save_facts_then_diagnose_from_the_file(cli: Any, tmp_path: Path) -> None:
    saved = tmp_path / "h100.json"
    replay = {RECORDING_ENV: str(H100_RECORDING)}
    here = cli("doctor", "--json", "--save-facts", str(saved), "builtin:digits", **replay)
    assert here.exit_code in (0, 1), here.output  # this machine's torch may lack CUDA
    data = json.loads(saved.read_text())
    assert data["format"] == "gpufleet-doctor-facts/1"
    assert data["host"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert {"runtimes", "tools"} <= set(data)
    offline = cli("doctor", "--json", "--facts", str(saved), "builtin:digits")
    assert offline.exit_code == here.exit_code
    assert json.loads(offline.stdout) == json.loads(here.stdout)


def test_explain_a_crash_log(cli: Any, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(
        "loading\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB.\n"
    )
    out = cli("doctor", "--explain", str(log))
    assert out.exit_code == 1 and "cuda.out_of_memory" in out.output
    assert "memory_gb" in out.output
    calm = cli("doctor", "--explain", "-", input="all fine\n")
    assert calm.exit_code == 0 and "0 errors" in calm.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/model"], "'/no/such/model' is not a model directory"),
        (["builtin:nope"], "unknown built-in model 'nope'; known: digits, tiny-lm"),
        (["--facts", "/no/such/facts.json"], "cannot read facts file /no/such/facts.json"),
        (["--explain", "/no/such.log"], "cannot read /no/such.log"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli: Any, args: list[str], message: str) -> None:
    out = cli("doctor", "--facts", host("t4-driver535"), *args)
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in out.output


def test_a_file_that_is_not_facts(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = cli("doctor", "--facts", str(bad))
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [
        f"invalid_input: {bad} is not a gpufleet doctor facts file (JSONDecodeError: Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1)); write one with "
        "gpufleet doctor --save-facts FILE"
    ]
