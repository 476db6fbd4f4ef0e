"""model.yaml: the whole schema, defaults, and errors that name their path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpufleet.errors import InvalidInput
from gpufleet.models.manifest import Gate, ModelManifest

DESIGN_EXAMPLE = """
model:
  name: llm-small-ru
  version: 1.4.2
  format: hf
  precision: fp16
  files: [{path: model.safetensors}, {path: tokenizer.json}]
  batching: {max_batch_size: 16, max_queue_delay_ms: 10}
  resources: {gpu: {mode: fraction, memory_gb: 16, compute_percent: 50}}
  metrics: {token_rate_tok_s: 650, vram_peak_gb: 14.3}
  compatibility: {cuda: ">=12.2", arch: ["8.0", "8.6", "8.9", "9.0"]}
promote:
  tests: [smoke, "perf_token_rate >= 500", "latency_p95_ms <= 1200", "vram_headroom_gb >= 2"]
  rollout: {canary_traffic: 0.05, rollback_slo: {latency_p95_ms: 1200, error_rate: 0.5}}
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "model.yaml").write_text(text)
    return tmp_path


def test_the_design_example_reads_with_every_section(tmp_path: Path) -> None:
    m = ModelManifest.from_yaml(write(tmp_path, DESIGN_EXAMPLE))
    assert m.model.precision == "fp16"
    assert m.model.resources.gpu.mode == "fraction" and m.model.resources.gpu.memory_gb == 16
    assert m.model.compatibility.capabilities() == [(8, 0), (8, 6), (8, 9), (9, 0)]
    assert m.model.metrics.token_rate_tok_s == 650
    assert m.promote.tests[1] == Gate(metric="perf_token_rate", op=">=", value=500)
    assert [str(g) for g in m.promote.tests][2] == "latency_p95_ms <= 1200"
    assert m.promote.rollout.rollback_slo.error_rate == 0.5
    # Plain data round-trips (the registry stores it as the artifact's config).
    assert ModelManifest.from_data(m.to_data()) == m


def test_defaults(tmp_path: Path) -> None:
    m = ModelManifest.from_yaml(write(tmp_path, "model: {name: m, version: '1', format: onnx}\n"))
    assert m.model.precision == "fp32"
    assert m.model.resources.gpu.mode == "whole" and m.model.resources.gpu.gpus == 1
    assert m.model.batching is None and m.promote.tests == []
    assert m.promote.rollout.strategy == "canary"


def bad(data: dict[str, Any]) -> str:
    with pytest.raises(InvalidInput) as caught:
        ModelManifest.from_data(data)
    return caught.value.message


BASE: dict[str, Any] = {"name": "m", "version": "1.0", "format": "onnx"}


@pytest.mark.parametrize(
    ("model", "promote", "expected"),
    [
        (
            {"compatibility": {"cuda": ">=12.x"}},
            {},
            "model.compatibility.cuda: '>=12.x' is not a version range",
        ),
        (
            {"compatibility": {"arch": ["ampere"]}},
            {},
            "model.compatibility.arch: 'ampere' is not a compute capability",
        ),
        ({"batching": {"max_batchsize": 3}}, {}, "model.batching.max_batchsize: unknown key"),
        (
            {"precision": "int4"},
            {},
            "model.precision: Input should be 'fp32', 'fp16', 'bf16' or 'fp8'",
        ),
        (
            {"resources": {"gpu": {"mode": "mps", "memory_gb": 4}}},
            {},
            "model.resources.gpu: mode mps needs compute_percent",
        ),
        (
            {"resources": {"gpu": {"mode": "whole", "memory_gb": 4}}},
            {},
            "memory_gb only apply to mode fraction or mps",
        ),
        (
            {"resources": {"gpu": {"mode": "fraction", "memory_gb": 4, "compute_percent": 101}}},
            {},
            "model.resources.gpu.compute_percent",
        ),
        (
            {"files": [{"path": "../etc/passwd"}]},
            {},
            "model.files.0.path: '../etc/passwd' must be a relative path",
        ),
        ({"task": "text-generation"}, {}, "task only applies to format hf"),
        ({"metrics": {"latency_p95_ms": -1}}, {}, "model.metrics.latency_p95_ms"),
        (
            {},
            {"tests": ["smoke", "latency_p95 <= 3"]},
            "promote.tests.1: 'latency_p95 <= 3': unknown metric",
        ),
        ({}, {"tests": ["fast please"]}, "promote.tests.0: 'fast please' is not a test"),
        ({}, {"rollout": {"canary_traffic": 0}}, "promote.rollout.canary_traffic"),
        ({}, {"extra": 1}, "promote.extra: unknown key"),
    ],
)
def test_errors_name_their_path(
    model: dict[str, Any], promote: dict[str, Any], expected: str
) -> None:
    assert expected in bad({"model": BASE | model, "promote": promote})


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(InvalidInput) as caught:
        ModelManifest.from_data(
            {"model": BASE | {"precision": "x", "compatibility": {"cuda": "12"}}, "oops": 1}
        )
    problems = caught.value.details["problems"]
    assert [p.split(":")[0] for p in problems] == [
        "model.precision",
        "model.compatibility.cuda",
        "oops",
    ]


def test_arch_spellings_normalise() -> None:
    m = ModelManifest.from_data(
        {"model": BASE | {"compatibility": {"arch": ["sm_90", "8.9", "86"]}}}
    )
    assert m.model.compatibility.arch == ["9.0", "8.9", "8.6"]
