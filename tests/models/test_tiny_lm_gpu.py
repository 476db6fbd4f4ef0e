"""tiny-lm on a CUDA GPU: a lone sequence decodes by replaying one captured graph, with the
eager path's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.models.demo import transformer
from gpufleet.models.demo.tiny_lm import BOS, TinyLM, generate_model_dir

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


def test_a_lone_sequence_replays_one_graph_with_the_eager_numbers(tmp_path: Path) -> None:
    graphed, eager = _runner(tmp_path, "fp32"), _eager(_runner(tmp_path, "fp32"))
    graphed.warmup()
    assert graphed._graph is None  # a short first request does not pay for a capture
    items = [
        {"prompt": "Once upon a time", "max_new_tokens": 40},  # long enough: captures
        {"prompt": "x", "max_new_tokens": 254},  # up to the last slot of the context
        {"prompt": "sampled", "max_new_tokens": 30, "temperature": 0.8, "seed": 5},
        {"prompt": "short", "max_new_tokens": 3},  # once captured, short ones replay it too
    ]
    first = [graphed.predict([item])[0] for item in items]
    graph = graphed._graph
    assert graph is not None and graph.length == 256  # the model's whole context
    # Replays are deterministic and keep no state from one sequence to the next.
    again = [graphed.predict([item])[0] for item in reversed(items)][::-1]
    assert [(o["text"], o["tokens"]) for o in again] == [(o["text"], o["tokens"]) for o in first]
    assert graphed._graph is graph  # captured once
    assert first[1]["tokens"] >= 1 and eager.predict([items[0]])[0]["tokens"] >= 1
    # Step by step, teacher-forced over the whole context: the graph's logits are the eager
    # path's (comparing generated text instead would hinge on near-ties of random weights).
    net = graphed._net
    assert net is not None
    ids = torch.tensor([[BOS, *b"x"]], device="cuda:0")
    p = ids.shape[1]
    valid = torch.ones((1, 256), dtype=torch.bool, device="cuda:0")
    positions = torch.arange(p, device="cuda:0")[None]
    with torch.inference_mode():
        net.forward(ids, positions, valid[:, :p], graph.cache, 0, unpadded=True)
        graph.begin(p)
        cache = net.new_cache(1, 256)
        want = net.forward(ids, positions, valid[:, :p], cache, 0)
        for at in range(p, 256):
            token = want[:, -1].argmax(-1)
            got = graph.run(token, at)
            at_ = torch.tensor([[at]], device="cuda:0")
            want = net.forward(token[:, None], at_, valid[:, : at + 1], cache, at, unpadded=True)
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_bf16_generates_through_the_graph(tmp_path: Path) -> None:
    runner = _runner(tmp_path, "bf16")
    runner.warmup()
    [out] = runner.predict([{"prompt": "Hello", "max_new_tokens": 64, "seed": 0}])
    assert runner._graph is not None
    assert torch.isfinite(runner._graph.logits).all()  # unfilled cache slots are zeros
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
