"""The torchscript, onnx and hf loaders on CPU, with tiny models built in a temp dir: outputs
equal to running the model directly, bad items failing alone, precisions, and clear errors for
broken model directories."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from gpufleet.errors import InvalidInput  # noqa: E402
from gpufleet.models import ItemError, ModelRunner  # noqa: E402
from gpufleet.models.formats import create_runner  # noqa: E402
from gpufleet.models.formats.fp8 import FP8, Fp8Linear, quantize_fp8_  # noqa: E402
from tests.models import format_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    return {
        "ts": fx.make_torchscript_dir(base / "ts"),
        "ts_pair": fx.make_torchscript_dir(base / "ts_pair", pair=True),
        "onnx": fx.make_onnx_dir(base / "onnx"),
        "onnx16": fx.make_onnx_dir(base / "onnx16", precision="fp16"),
        "onnx_pair": fx.make_onnx_dir(base / "onnx_pair", pair=True),
        "lm": fx.make_hf_causal_lm_dir(base / "lm"),
        "cls": fx.make_hf_classifier_dir(base / "cls"),
    }


def loaded(model_dir: Path, device: str = "cpu", **overrides: Any) -> Any:
    runner = fx.runner_from_dir(model_dir, **overrides)
    assert isinstance(runner, ModelRunner)
    runner.load(device)
    return runner


def errors_of(outputs: list[Any]) -> list[int]:
    return [i for i, out in enumerate(outputs) if isinstance(out, ItemError)]


def assert_invalid(match: str | None, model_dir: Path, **overrides: Any) -> InvalidInput:
    with pytest.raises(InvalidInput, match=match) as caught:
        fx.runner_from_dir(model_dir, **overrides)
    assert "\n" not in caught.value.message
    return caught.value


# create_runner


PROBE = """
import sys
from pathlib import Path

import yaml

from gpufleet.models.formats import create_runner

for model_dir in map(Path, sys.argv[1:]):
    m = yaml.safe_load((model_dir / "model.yaml").read_text())["model"]
    runner = create_runner(
        model_dir, format=m["format"], name=m["name"], version=m["version"], description="",
        precision=m["precision"], entry=m.get("entry"), task=None, batching=None,
        example_input=m.get("example_input"),
    )
    assert runner.info.example_input is not None, model_dir
heavy = [name for name in ("torch", "onnxruntime", "transformers") if name in sys.modules]
assert not heavy, f"create_runner imported {heavy}"
"""


def test_create_runner_imports_no_framework(dirs: dict[str, Path]) -> None:
    paths = [str(dirs[name]) for name in ("ts", "ts_pair", "onnx", "lm", "cls")]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *paths], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_defaults_and_info(dirs: dict[str, Path]) -> None:
    runner = fx.runner_from_dir(dirs["onnx"], description="a tiny regression", entry=None)
    assert (runner.info.name, runner.info.version) == ("onnx", "1.0.0")
    assert runner.info.description == "a tiny regression"
    assert (runner.batching.max_batch_size, runner.batching.max_queue_delay_ms) == (8, 5)
    from gpufleet.models import Batching

    custom = Batching(max_batch_size=2, max_queue_delay_ms=1)
    assert fx.runner_from_dir(dirs["onnx"], batching=custom).batching == custom


def test_entry_is_found_or_the_error_says_how_to_name_it(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(dirs["ts"], model_dir)
    assert fx.runner_from_dir(model_dir, entry=None).spec.entry.name == "model.pt"

    shutil.copy(model_dir / "model.pt", model_dir / "other.ts")
    error = assert_invalid(r"2 candidate files \(model\.pt, other\.ts\)", model_dir, entry=None)
    assert error.details["field"] == "model.entry"
    assert "set model.entry" in error.message
    assert fx.runner_from_dir(model_dir, entry="other.ts").spec.entry.name == "other.ts"

    (model_dir / "model.pt").unlink()
    (model_dir / "other.ts").unlink()
    assert_invalid(
        r"no \*\.pt / \*\.ts / \*\.torchscript file .* set model\.entry", model_dir, entry=None
    )
    assert_invalid(r"model\.entry: 'missing\.onnx' is not a file", model_dir, entry="missing.onnx")
    assert_invalid(
        r"'\.\./ts/model\.pt' is outside the model directory", model_dir, entry="../ts/model.pt"
    )
    assert_invalid(
        r"model\.entry: 'model\.yaml' is not a directory", dirs["lm"], entry="model.yaml"
    )


def test_unknown_fields_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert_invalid(r"model\.precision: unknown precision 'int4'", dirs["ts"], precision="int4")
    assert_invalid(r"model\.format: unknown format 'tflite'", dirs["ts"], format="tflite")
    assert_invalid(
        r"model\.task: task applies to format 'hf' only", dirs["ts"], task="text-generation"
    )
    with pytest.raises(InvalidInput, match="does not exist"):
        create_runner(
            tmp_path / "nowhere",
            format="onnx",
            name="x",
            version="1",
            description="",
            precision="fp32",
            entry=None,
            task=None,
            batching=None,
        )


# torchscript


def test_torchscript_matches_the_module_and_groups_shapes(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["ts"])
    runner.warmup()
    module = torch.jit.load(str(dirs["ts"] / "model.pt"))
    items: list[Any] = [
        [0.1, 0.2, 0.3, 0.4],
        [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]],  # another shape: a batch of its own
        [1, 2, 3, 4],  # whole numbers still feed a float input
        [-1.0, 0.5, 0.25, 8.0],
    ]
    outputs = runner.predict(items)
    for item, output in zip(items, outputs, strict=True):
        want = module(torch.tensor([item], dtype=torch.float32))[0]
        np.testing.assert_allclose(output, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    alone = runner.predict([items[0]])[0]
    np.testing.assert_allclose(alone, outputs[0], rtol=1e-5, atol=1e-7)


def test_torchscript_bad_items_fail_alone(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["ts"])
    good = [0.5, -1.0, 2.0, 0.25]
    outputs = runner.predict(
        [good, [1.0, 2.0], "text", [[1.0, 2.0], [3.0]], {"inputs": {"y": good}}, {"x": good}, good]
    )
    assert errors_of(outputs) == [1, 2, 3, 4, 5]
    assert outputs[0] == outputs[6]
    np.testing.assert_allclose(outputs[0], runner.predict([good])[0], rtol=1e-5, atol=1e-7)
    assert all(out.code == "invalid_input" for out in outputs[1:6])
    assert "mat1 and mat2 shapes cannot be multiplied" in outputs[1].message
    assert "must hold numbers only" in outputs[2].message
    assert "rectangular" in outputs[3].message
    assert "unknown ['y']; this model takes x" in outputs[4].message
    assert '{"inputs": {name: nested list}}' in outputs[5].message


def test_torchscript_named_inputs_and_outputs(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["ts_pair"])
    module = torch.jit.load(str(dirs["ts_pair"] / "model.pt"))
    features, ids = [0.5, 1.0, -2.0, 0.0], [3, 7]
    outputs = runner.predict(
        [
            {"inputs": {"features": features, "ids": ids}},
            {"inputs": {"features": features, "ids": [1.5, 2]}},  # ids must be whole numbers
            [1.0, 2.0, 3.0, 4.0],  # two inputs: they must be named
            {"inputs": {"features": features}},
        ]
    )
    assert errors_of(outputs) == [1, 2, 3]
    assert "whole numbers" in outputs[1].message
    assert 'send {"inputs"' in outputs[2].message
    assert "missing ['ids']" in outputs[3].message
    want_proj, want_sum = module(torch.tensor([features]), torch.tensor([ids]))
    assert set(outputs[0]) == {"output_0", "output_1"}
    np.testing.assert_allclose(outputs[0]["output_0"], want_proj[0].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(outputs[0]["output_1"], want_sum[0].item(), rtol=1e-5)
    names = runner.info.input_schema["properties"]["inputs"]["required"]
    assert names == ["features", "ids"]
    jsonschema.validate(runner.info.example_input, runner.info.input_schema)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", "float16"), ("bf16", "bfloat16")])
def test_torchscript_precision(dirs: dict[str, Path], precision: str, dtype: str) -> None:
    items = [[0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.5, 3.0]]
    want = loaded(dirs["ts"]).predict(items)
    runner = loaded(dirs["ts"], precision=precision)
    assert {p.dtype for p in runner._module.parameters()} == {getattr(torch, dtype)}
    got = runner.predict(items)
    assert got != want  # rounded in the lower precision ...
    np.testing.assert_allclose(got, want, rtol=0.03, atol=0.02)  # ... but close


def test_torchscript_refuses_fp8_and_bad_archives(dirs: dict[str, Path], tmp_path: Path) -> None:
    error = assert_invalid(
        r"model\.precision: fp8 is not available for torchscript", dirs["ts"], precision="fp8"
    )
    assert "bf16 or fp16" in error.message
    assert_invalid(
        r"model\.example_input: 'input' must hold numbers only", dirs["ts"], example_input=["a"]
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"not a zip archive")
    runner = create_runner(
        broken,
        format="torchscript",
        name="broken",
        version="1",
        description="",
        precision="fp32",
        entry=None,
        task=None,
        batching=None,
    )
    with pytest.raises(RuntimeError, match="before load"):
        runner.predict([[1.0]])
    with pytest.raises(InvalidInput, match=r"model\.pt is not a TorchScript archive"):
        runner.load("cpu")


# onnx


def _onnx_reference(model_dir: Path, x: list[Any]) -> np.ndarray:
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    return np.asarray(x, dtype=np.float64) @ weights["W"] + weights["b"]


def test_onnx_matches_the_graph_and_describes_its_input(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["onnx"])
    assert runner.providers == ["CPUExecutionProvider"]
    runner.warmup()
    schema, example = runner.info.input_schema, runner.info.example_input
    assert example == [0.0, 0.0, 0.0, 0.0]
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([1.0, 2.0], schema)
    items = [[0.5, -1.0, 2.0, 0.25], [1, 2, 3, 4], {"inputs": {"x": [0.0, 0.0, 0.0, 1.0]}}]
    for item, output in zip(items, runner.predict(items), strict=True):
        x = item["inputs"]["x"] if isinstance(item, dict) else item
        np.testing.assert_allclose(output, _onnx_reference(dirs["onnx"], x), rtol=1e-5)


def test_onnx_bad_items_fail_alone(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["onnx_pair"])
    x = [1.0, 2.0, 3.0, 4.0]
    outputs = runner.predict(
        [
            {"inputs": {"x": x, "k": 3}},
            {"inputs": {"x": x, "k": 2.5}},
            {"inputs": {"x": [1.0, 2.0], "k": 1}},
            {"inputs": {"x": [x], "k": 1}},
            {"inputs": {"x": ["a", "b", "c", "d"], "k": 1}},
            {"inputs": {"x": x, "k": 2**70}},
            {"inputs": {"x": x, "k": -2}},
        ]
    )
    assert errors_of(outputs) == [1, 2, 3, 4, 5]
    assert "takes whole numbers (int64)" in outputs[1].message
    assert "must have shape [4] (one item, batch dimension left out), got [2]" in outputs[2].message
    assert "got [1, 4]" in outputs[3].message
    for output, k in ((outputs[0], 3), (outputs[6], -2)):
        assert set(output) == {"y", "scaled"}
        np.testing.assert_allclose(output["scaled"], np.multiply(x, k))
        np.testing.assert_allclose(output["y"], _onnx_reference(dirs["onnx_pair"], x), rtol=1e-5)
    assert runner.info.example_input == {"inputs": {"x": [0.0] * 4, "k": 0}}


def test_onnx_precision_is_the_models_own(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["onnx16"])
    x = [0.5, -1.0, 2.0, 0.25]
    (got,) = runner.predict([x])
    np.testing.assert_allclose(got, _onnx_reference(dirs["onnx16"], x), rtol=0.01, atol=0.01)

    error = assert_invalid(None, dirs["onnx"], precision="fp16")
    assert error.message.endswith(
        "model.precision: model.onnx is float32 but model.yaml says precision: fp16; "
        "export it in fp16 or set precision: fp32"
    )
    assert_invalid(
        "model.onnx is float16 but model.yaml says precision: bf16",
        dirs["onnx16"],
        precision="bf16",
    )


def test_onnx_on_a_cuda_device_without_the_cuda_provider_runs_on_cpu(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with caplog.at_level(logging.WARNING, logger="gpufleet.models.formats.onnx"):
        runner = loaded(dirs["onnx"], device="cuda:0")
    assert runner.providers == ["CPUExecutionProvider"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no CUDAExecutionProvider" in warnings[0]
    assert "onnxruntime-gpu" in warnings[0]
    x = [0.5, -1.0, 2.0, 0.25]
    np.testing.assert_allclose(runner.predict([x])[0], _onnx_reference(dirs["onnx"], x), rtol=1e-5)


def test_onnx_batch_dimension(tmp_path: Path) -> None:
    error = assert_invalid(None, fx.make_onnx_dir(tmp_path / "fixed4", batch_dim=4))
    assert "input 'x' has shape [4, 4]" in error.message
    assert "export it with a dynamic batch axis" in error.message

    runner = loaded(fx.make_onnx_dir(tmp_path / "fixed1", batch_dim=1))
    items = [[float(i), 1.0, 2.0, 3.0] for i in range(3)]
    for item, output in zip(items, runner.predict(items), strict=True):
        np.testing.assert_allclose(output, _onnx_reference(tmp_path / "fixed1", item), rtol=1e-5)


def test_onnx_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x00garbage")
    fx.write_model_yaml(tmp_path, format="onnx", precision="fp32")
    assert_invalid(r"model\.entry: model\.onnx is not a readable ONNX model", tmp_path)


# hf: text generation


def _greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(out, skip_special_tokens=True), len(out)


@pytest.fixture(scope="module")
def lm(dirs: dict[str, Path]) -> Any:
    runner = loaded(dirs["lm"])
    runner.warmup()
    return runner


def test_generation_batches_prompts_of_any_length_like_one_at_a_time(
    lm: Any, dirs: dict[str, Path]
) -> None:
    assert lm.task == "text-generation"
    items = [
        {"prompt": "hello world", "max_new_tokens": 6},
        {"prompt": "the quick brown fox jumps over the lazy dog", "max_new_tokens": 3},
        {"prompt": "once upon a time", "max_new_tokens": 10},
    ]
    outputs = lm.predict(items)
    for item, output in zip(items, outputs, strict=True):
        text, count = _greedy_reference(dirs["lm"], item["prompt"], item["max_new_tokens"])
        assert (output["text"], output["tokens"]) == (text, count)
        assert output["tokens"] <= item["max_new_tokens"]
        assert output["tokens_per_s"] > 0 and output["seed"] is None
    assert lm.predict(items[:1])[0]["text"] == outputs[0]["text"]


def test_generation_sampling_is_reproducible_per_seed(lm: Any) -> None:
    item = {"prompt": "a good movie", "max_new_tokens": 12, "temperature": 2.0, "seed": 7}
    alone = lm.predict([item])[0]
    batched = lm.predict([{"prompt": "hello"}, item, {**item, "seed": 8}])
    assert alone["seed"] == 7 and alone["tokens"] == 12
    assert batched[1]["text"] == alone["text"]
    assert batched[2]["text"] != alone["text"]
    unseeded = lm.predict([{"prompt": "hello", "temperature": 1.0}])[0]
    assert isinstance(unseeded["seed"], int)


def test_generation_bad_items_fail_alone(lm: Any) -> None:
    outputs = lm.predict(
        [
            {"prompt": "hello world", "max_new_tokens": 2},
            "hello",
            {"prompt": ""},
            {"prompt": "hello", "max_new_tokens": 0},
            {"prompt": "hello", "max_new_tokens": 2000},
            {"prompt": "hello", "temperature": -1},
            {"prompt": "hello", "max_new_tokens": "5"},
            {"prompt": "hello", "top_p": 0.9},
            {"prompt": "the quick brown fox " * 10, "max_new_tokens": 30},
        ]
    )
    assert errors_of(outputs) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert outputs[0]["tokens"] <= 2
    assert "must be a JSON object, got str" in outputs[1].message
    assert "max_new_tokens" in outputs[4].message and "1024" in outputs[4].message
    assert "top_p: Extra inputs are not permitted" in outputs[7].message
    assert "exceeds the model's context of 64 tokens" in outputs[8].message


def _first_logits(runner: Any, text: str) -> np.ndarray:
    ids = runner._loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = runner.model(input_ids=ids.to(runner.model.device)).logits
    return logits.float().cpu().numpy()


@pytest.mark.parametrize(
    ("precision", "dtype", "tolerance"),
    [("fp16", "float16", 0.01), ("bf16", "bfloat16", 0.05), ("fp8", "bfloat16", 0.15)],
)
def test_generation_precision(
    lm: Any, dirs: dict[str, Path], precision: str, dtype: str, tolerance: float
) -> None:
    runner = loaded(dirs["lm"], precision=precision)
    assert runner.model.dtype == getattr(torch, dtype)
    fp8_layers = [m for m in runner.model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_layers) == (8 if precision == "fp8" else 0)  # 4 per block, not lm_head
    text = "the quick brown fox"
    want, got = _first_logits(lm, text), _first_logits(runner, text)
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    assert not np.array_equal(got, want)
    output = runner.predict([{"prompt": text, "max_new_tokens": 4}])[0]
    assert 1 <= output["tokens"] <= 4


# hf: classification and embeddings


def test_classification_matches_the_model(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["cls"])
    assert runner.task == "text-classification"
    runner.warmup()
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["cls"], local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        dirs["cls"], local_files_only=True
    )
    texts = ["a good movie with a great story", "a bad movie", "the lazy dog, hello world"]
    outputs = runner.predict([{"text": t} for t in [*texts, 42]])  # type: ignore[dict-item]
    assert errors_of(outputs) == [3]
    for text, output in zip(texts, outputs[:3], strict=True):
        with torch.no_grad():
            probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
        assert output["label"] == model.config.id2label[int(probs.argmax())]
        assert output["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert len({round(out["score"], 4) for out in outputs[:3]}) == 3

    half = loaded(dirs["cls"], precision="bf16").predict([{"text": t} for t in texts])
    for full, low in zip(outputs[:3], half, strict=True):
        assert low["label"] == full["label"]
        assert low["score"] == pytest.approx(full["score"], abs=0.03)


def test_feature_extraction_mean_pools_without_padding(dirs: dict[str, Path]) -> None:
    runner = loaded(dirs["cls"], task="feature-extraction")
    texts = ["hello", "a good movie with a great story and fine actors"]
    batched = runner.predict([{"text": t} for t in texts])
    model = transformers.AutoModel.from_pretrained(dirs["cls"], local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["cls"], local_files_only=True)
    for text, output in zip(texts, batched, strict=True):
        want = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        assert len(output["embedding"]) == 32
        np.testing.assert_allclose(output["embedding"], want.detach().numpy(), atol=1e-4)

    fp8 = loaded(dirs["cls"], task="feature-extraction", precision="fp8").predict(
        [{"text": t} for t in texts]
    )
    for full, low in zip(batched, fp8, strict=True):
        cosine = np.dot(full["embedding"], low["embedding"]) / (
            np.linalg.norm(full["embedding"]) * np.linalg.norm(low["embedding"])
        )
        assert cosine > 0.99


def test_hf_task_is_inferred_and_checked(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert fx.runner_from_dir(dirs["lm"]).task == "text-generation"
    assert fx.runner_from_dir(dirs["lm"], task="feature-extraction").task == "feature-extraction"
    error = assert_invalid(None, dirs["lm"], task="text-classification")
    assert "text-classification needs a *ForSequenceClassification checkpoint" in error.message
    assert "['GPT2LMHeadModel']" in error.message
    assert_invalid(r"model\.task: unknown task 'summarization'", dirs["cls"], task="summarization")

    seq2seq = tmp_path / "t5"
    seq2seq.mkdir()
    (seq2seq / "config.json").write_text(
        json.dumps({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True})
    )
    fx.write_model_yaml(seq2seq, format="hf", precision="fp32")
    assert_invalid("is an encoder-decoder model", seq2seq)

    no_tokenizer = tmp_path / "lm"
    shutil.copytree(dirs["lm"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    error = assert_invalid(
        r"model\.entry: .*/lm has no tokenizer files \(tokenizer\.json", no_tokenizer
    )
    assert "save_pretrained()" in error.message
    (no_tokenizer / "model.safetensors").rename(no_tokenizer / "weights.npz")
    (no_tokenizer / "tokenizer.json").write_text("{}")
    assert_invalid(r"has no weight files \(\*\.safetensors", no_tokenizer)
    (tmp_path / "nested").mkdir()
    error = assert_invalid(None, tmp_path / "lm", entry="../nested")
    assert "outside the model directory" in error.message
    (no_tokenizer / "sub").mkdir()
    assert_invalid(
        r"no config\.json in sub: format hf needs a directory", no_tokenizer, entry="sub"
    )


# fp8


def test_fp8_linear_is_close_to_the_layer_it_replaces() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Fp8Linear(linear.weight, linear.bias)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (32,)
    x = torch.randn(5, 64)
    want = linear(x)
    got = layer(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    assert quantize_fp8_(model) == 1  # 32 -> 3 is too small to gain from fp8
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2], torch.nn.Linear)
    assert quantize_fp8_(torch.nn.Sequential(torch.nn.Linear(64, 32)), skip=[]) == 1
    head = torch.nn.Linear(32, 64)
    assert quantize_fp8_(torch.nn.Sequential(head), skip=[head]) == 0
    # A transposed view (GPT-2's Conv1D) is stored row-major all the same: its .t() must be
    # the column-major operand torch._scaled_mm accepts (on CUDA it refuses anything else).
    transposed = Fp8Linear(torch.randn(32, 64).t(), None)
    assert transposed.weight.is_contiguous() and transposed.weight.t().stride() == (1, 32)


def test_fp8_scaled_mm_path_where_torch_has_it_on_cpu() -> None:
    """The path CUDA devices of compute capability >= 8.9 take, checked here where torch
    implements ``_scaled_mm`` for the CPU too (tests/models/test_formats_gpu.py runs it on CUDA)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    layer = Fp8Linear(linear.weight, linear.bias)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    try:
        fast = layer._forward_scaled_mm(x).float()
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU _scaled_mm: {exc}")
    exact = linear(x.float()).detach()
    assert fast.shape == (3, 7, 128)
    assert (fast - exact).abs().max() <= 0.08 * exact.abs().max()


def test_hf_entry_may_name_a_subdirectory(dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(dirs["cls"], tmp_path / "checkpoint")
    fx.write_model_yaml(tmp_path, format="hf", precision="fp32", entry="checkpoint")
    runner = loaded(tmp_path, example_input={"text": "hello world"})
    assert runner.info.example_input == {"text": "hello world"}
    runner.warmup()
    (output,) = runner.predict([{"text": "a good movie"}])
    assert output["label"] in {"negative", "positive"}
