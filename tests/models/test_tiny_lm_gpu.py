"""tiny-lm on a CUDA GPU: a lone sequence decodes by replaying one captured graph, and says
exactly what the eager path says."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.models.demo import transformer
from gpufleet.models.demo.tiny_lm import TinyLM, generate_model_dir

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _runner(directory: Path, dtype: str) -> TinyLM:
    if not (directory / "model.safetensors").exists():
        generate_model_dir(directory, 20e6, dtype=dtype, max_seq=256, progress=False)  # type: ignore[arg-type]
    runner = TinyLM(directory)
    runner.load("cuda:0")
    return runner


def _eager(runner: TinyLM) -> TinyLM:
    runner._graph, runner._graph_tried = None, True
    return runner


def test_a_lone_sequence_replays_one_graph_and_matches_eager(tmp_path: Path) -> None:
    graphed, eager = _runner(tmp_path, "fp32"), _eager(_runner(tmp_path, "fp32"))
    graphed.warmup()
    assert graphed._graph is None  # a short first request does not pay for a capture
    items = [
        {"prompt": "Once upon a time", "max_new_tokens": 40},  # long enough: captures
        {"prompt": "x", "max_new_tokens": 254},  # up to the last slot of the context
        {"prompt": "sampled", "max_new_tokens": 30, "temperature": 0.8, "seed": 5},
        {"prompt": "short", "max_new_tokens": 3},  # once captured, short ones replay it too
        {"prompt": "Once upon a time", "max_new_tokens": 40},  # again: no state leaks
    ]
    graphs = []
    for item in items:
        [got], [want] = graphed.predict([item]), eager.predict([item])
        assert (got["text"], got["tokens"]) == (want["text"], want["tokens"])
        graphs.append(graphed._graph)
    graph = graphs[0]
    assert graph is not None and graph.length == 256  # the model's whole context
    assert all(g is graph for g in graphs)  # captured once
    # A batch decodes eagerly, and a lone item in it says what it says alone.
    batch = graphed.predict([items[0], {"prompt": "another prompt", "max_new_tokens": 5}])
    assert batch[0]["text"] == eager.predict([items[0]])[0]["text"]


def test_bf16_generates_through_the_graph(tmp_path: Path) -> None:
    runner = _runner(tmp_path, "bf16")
    runner.warmup()
    [out] = runner.predict([{"prompt": "Hello", "max_new_tokens": 64, "seed": 0}])
    assert runner._graph is not None
    assert 1 <= out["tokens"] <= 64 and out["tokens_per_s"] > 0


def test_a_cache_over_the_limit_decodes_eagerly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transformer, "GRAPH_CACHE_LIMIT", 1024)
    runner = _runner(tmp_path, "fp32")
    [out] = runner.predict([{"prompt": "Hello", "max_new_tokens": 40, "seed": 0}])
    assert runner._graph is None and runner._graph_tried
    assert out["tokens"] >= 1
    runner.unload()
    assert (runner._graph, runner._graph_tried) == (None, False)
