"""tiny-lm on CPU: deterministic generation for a seed whatever the batch, per-item errors,
the KV cache against recomputing from scratch, and the generate CLI's model directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet.errors import InvalidInput
from gpufleet.models.demo import tiny_lm
from gpufleet.models.demo.tiny_lm import BOS, TinyLM, TinyLMConfig
from gpufleet.models.directory import load_model_dir
from gpufleet.models.runtime import ItemError, ModelRunner

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The model is tiny: on a busy 2-core machine, torch's spinning OpenMP threads make each
    # step ten times slower than one thread does.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> TinyLM:
    runner = TinyLM()
    runner.load("cpu")
    return runner


def test_is_a_model_runner_with_a_working_example(model: TinyLM) -> None:
    assert isinstance(model, ModelRunner)
    assert (model.info.name, model.info.version) == ("tiny-lm", "1.0.0")
    assert "RANDOM weights" in model.info.description
    assert 1_000_000 <= model.config.param_count() <= 5_000_000
    assert (model.batching.max_batch_size, model.batching.max_queue_delay_ms) == (16, 10)
    assert set(model.info.input_schema["properties"]) == {
        "prompt",
        "max_new_tokens",
        "temperature",
        "seed",
    }
    [out] = model.predict([model.info.example_input])
    assert out["tokens"] == 16
    assert isinstance(out["text"], str)
    assert out["tokens_per_s"] > 0


def test_same_seed_same_text_whatever_the_batch(model: TinyLM) -> None:
    item = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.9, "seed": 7}
    [alone] = model.predict([item])
    [again] = model.predict([item])
    assert (again["text"], again["tokens"]) == (alone["text"], alone["tokens"])
    batch = model.predict([{"prompt": "x", "max_new_tokens": 5}, item, {**item, "seed": 8}])
    assert batch[1]["text"] == alone["text"]
    assert batch[2]["text"] != alone["text"]
    # The default model is built from a fixed seed: a fresh one says the same.
    other = TinyLM()
    other.load("cpu")
    assert other.predict([item])[0]["text"] == alone["text"]


def test_greedy_is_deterministic_and_batch_independent(model: TinyLM) -> None:
    items = [{"prompt": p, "max_new_tokens": 12} for p in ("a", "a longer prompt here", "mid")]
    together = model.predict(items)
    for item, out in zip(items, together, strict=True):
        assert model.predict([item])[0]["text"] == out["text"]


def test_bad_items_fail_alone(model: TinyLM) -> None:
    outputs = model.predict(
        [
            {"prompt": "fine", "max_new_tokens": 3},
            "not an object",
            {"prompt": "x", "max_new_tokens": 0},
            {"prompt": "x", "max_tokens": 3},
            {"prompt": "x" * 600},
            {"prompt": 5},
            {"prompt": "also fine", "max_new_tokens": 2, "temperature": 1.5, "seed": 1},
        ]
    )
    assert outputs[0]["tokens"] <= 3 and outputs[6]["tokens"] <= 2
    errors = outputs[1:6]
    assert all(isinstance(e, ItemError) and e.code == "invalid_input" for e in errors)
    assert "JSON object" in errors[0].message
    assert "max_new_tokens" in errors[1].message
    assert "max_tokens" in errors[2].message
    assert "context of 512 tokens" in errors[3].message


def test_predict_before_load_raises() -> None:
    with pytest.raises(RuntimeError, match="before load"):
        TinyLM().predict([{"prompt": "x"}])


def test_kv_cache_gives_the_logits_of_a_full_recompute(model: TinyLM) -> None:
    net = model._net
    assert net is not None
    prompts = [[BOS, *b"hello there"], [BOS, *b"hi"]]
    b, p, steps = len(prompts), max(map(len, prompts)), 4
    ids = torch.full((b, p), tiny_lm.EOS, dtype=torch.long)
    valid = torch.zeros((b, p + steps), dtype=torch.bool)
    for r, prompt in enumerate(prompts):
        ids[r, p - len(prompt) :] = torch.tensor(prompt)
        valid[r, p - len(prompt) : p] = True
    positions = (valid[:, :p].long().cumsum(1) - 1).clamp(min=0)
    cache = net.new_cache(b, p + steps)
    with torch.inference_mode():
        logits = net.forward(ids, positions, valid[:, :p], cache, 0)[:, -1]
        seq, pos = ids, positions
        for step in range(steps):
            token = logits.argmax(-1)
            seq = torch.cat([seq, token[:, None]], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            valid[:, p + step] = True
            full = net.forward(seq, pos, valid[:, : p + step + 1])[:, -1]
            logits = net.forward(
                token[:, None], pos[:, -1:], valid[:, : p + step + 1], cache, p + step
            )[:, 0]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        # Left padding changes nothing: the short prompt alone gives the same last logits.
        alone = torch.tensor([prompts[1]])
        alone_pos = torch.arange(len(prompts[1]))[None]
        ref = net.forward(alone, alone_pos, torch.ones_like(alone, dtype=torch.bool))[0, -1]
        padded = net.forward(ids, positions, valid[:, :p])[1, -1]
        torch.testing.assert_close(padded, ref, atol=1e-4, rtol=1e-4)


def test_unpadded_attention_gives_the_logits_of_the_masked_path(model: TinyLM) -> None:
    # A batch without padding skips the mask (causal prompt, unmasked decode): same numbers.
    net = model._net
    assert net is not None
    ids = torch.tensor([[BOS, *b"same length"], [BOS, *b"other words"]])
    b, p, steps = ids.shape[0], ids.shape[1], 3
    positions = torch.arange(p).expand(b, p)
    valid = torch.ones((b, p + steps), dtype=torch.bool)
    with torch.inference_mode():
        caches = {flag: net.new_cache(b, p + steps) for flag in (False, True)}
        logits = {
            flag: net.forward(ids, positions, valid[:, :p], caches[flag], 0, unpadded=flag)
            for flag in (False, True)
        }
        torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
        last = net.forward(ids, positions, valid[:, :p], unpadded=True, last_only=True)
        torch.testing.assert_close(last[:, 0], logits[False][:, -1], atol=1e-4, rtol=1e-4)
        token = logits[False][:, -1].argmax(-1)[:, None]
        for step in range(steps):
            pos = torch.full((b, 1), p + step)
            step_logits = [
                net.forward(token, pos, valid[:, : p + step + 1], caches[f], p + step, unpadded=f)
                for f in (False, True)
            ]
            torch.testing.assert_close(step_logits[1], step_logits[0], atol=1e-4, rtol=1e-4)
            token = step_logits[0][:, -1].argmax(-1)[:, None]


def test_the_static_step_gives_the_logits_of_the_cached_forward(model: TinyLM) -> None:
    # ``step`` is what the CUDA decode graph captures: fixed shapes, the slot as a tensor,
    # attention over the whole cache with -inf past the filled keys.
    net = model._net
    assert net is not None
    prompt = torch.tensor([[BOS, *b"static shapes"]])
    p, length = prompt.shape[1], 64
    ones = torch.ones((1, length), dtype=torch.bool)
    with torch.inference_mode():
        static, growing = net.new_cache(1, length), net.new_cache(1, length)
        positions = torch.arange(p)[None]
        net.forward(prompt, positions, ones[:, :p], static, 0, unpadded=True, last_only=True)
        want = net.forward(prompt, positions, ones[:, :p], growing, 0)
        bias = torch.full((1, 1, 1, length), float("-inf"), dtype=net.dtype)
        bias[..., :p] = 0
        for at in range(p, p + 5):
            token = want[:, -1].argmax(-1).view(1, 1)
            bias[..., at] = 0
            got = net.step(token, torch.tensor([at]), bias, static)
            want = net.forward(token, torch.tensor([[at]]), ones[:, : at + 1], growing, at)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generate_cli_writes_a_loadable_dir_of_the_requested_size(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    tiny_lm.main(["generate", str(out), "--params", "3e6", "--dtype", "fp32", "--seed", "3"])
    config = TinyLMConfig.model_validate(json.loads((out / "config.json").read_text()))
    params = config.param_count()
    assert 2e6 <= params <= 4e6
    size = (out / "model.safetensors").stat().st_size
    assert params * 4 < size < params * 4 + 64 * 1024
    spec = yaml.safe_load((out / "model.yaml").read_text())["model"]
    assert spec["runtime"] == "python:gpufleet.models.demo.tiny_lm:TinyLM"
    assert (spec["name"], spec["version"], spec["precision"]) == ("tiny-lm", "1.0.0", "fp32")
    assert "random weights" in (out / "README.md").read_text()
    runner = load_model_dir(out)
    runner.load("cpu")
    runner.warmup()
    [result] = runner.predict([{"prompt": "abc", "max_new_tokens": 4, "seed": 1}])
    assert 1 <= result["tokens"] <= 4
    # Same seed, same bytes: the directory can be regenerated instead of copied.
    again = tmp_path / "again"
    tiny_lm.main(["generate", str(again), "--params", "3e6", "--dtype", "fp32", "--seed", "3"])
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_bf16_dir_runs_in_bf16_on_cpu_and_fp16_in_fp32(tmp_path: Path) -> None:
    for dtype, want in (("bf16", torch.bfloat16), ("fp16", torch.float32)):
        out = tmp_path / dtype
        tiny_lm.generate_model_dir(out, 1e6, dtype=dtype, progress=False)
        runner = TinyLM(out)
        runner.load("cpu")
        assert runner._net is not None
        assert runner._net.w["embed.weight"].dtype == want
        assert runner.predict([{"prompt": "hi", "max_new_tokens": 2}])[0]["tokens"] >= 1


def test_bad_config_is_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"d_model": "big"}))
    with pytest.raises(InvalidInput, match=r"config\.json"):
        TinyLM(tmp_path)


def test_for_params_hits_the_size() -> None:
    for params in (2.5e7, 1e8, 5e8, 5e9):
        got = TinyLMConfig.for_params(params).param_count()
        assert 0.8 * params <= got <= 1.2 * params, (params, got)
