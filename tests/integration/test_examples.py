"""The models of ``examples/``, served together by one real ``gpufleet serve`` on loopback:
each publishes its schema and example, answers correctly, and refuses a bad input at submit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serve_helpers import Serve, serving

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = ("text-stats", "slow-diffusion", "digit-classifier")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    args = [a for name in NAMES for a in ("--model", str(EXAMPLES / name))]
    with serving(tmp_path_factory.mktemp("examples"), *args) as s:
        yield s


def test_every_example_publishes_a_schema_and_answers_its_example(served: Serve) -> None:
    with served.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert set(models) == set(NAMES)
        for name in NAMES:
            assert models[name]["input_schema"]["type"] == "object", name
            r = c.post(
                f"/v1/models/{name}/infer",
                params={"wait": 60},
                json={"input": models[name]["example_input"]},
            )
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


def test_text_stats_counts_and_reverses(served: Serve) -> None:
    with served.client() as c:
        r = c.post(
            "/v1/models/text-stats/infer",
            params={"wait": 60},
            json={"input": {"text": "hello big world"}},
        )
        assert r.json()["result"] == {"words": 3, "chars": 15, "reversed": "dlrow gib olleh"}
        missing = c.post("/v1/models/text-stats/infer", json={"input": {}})
        typo = c.post("/v1/models/text-stats/infer", json={"input": {"text": "", "txt": "x"}})
    assert missing.status_code == 422 and typo.status_code == 422
    assert missing.json()["error"]["code"] == "invalid_input"
    assert "'text' is a required property" in missing.json()["error"]["message"]
    assert "('txt' was unexpected)" in typo.json()["error"]["message"]


def test_slow_diffusion_reaches_its_target_in_the_steps_asked(served: Serve) -> None:
    with served.client() as c:
        r = c.post(
            "/v1/models/slow-diffusion/infer",
            params={"wait": 60},
            json={"input": {"seed": 5, "steps": 6, "size": 8, "step_ms": 20}},
        )
        out = r.json()["result"]
        assert out["steps"] == 6 and len(out["trace"]) == 6
        assert out["trace"][-1] == 0.0 and out["trace"][0] > out["trace"][-1]
        assert len(out["image"]) == 8 and all(0 <= v <= 255 for row in out["image"] for v in row)
        assert "batch of 1: step 6/6" in served.output()  # its progress, in the worker's log
        bad = c.post("/v1/models/slow-diffusion/infer", json={"input": {"steps": 500}})
    assert bad.status_code == 422 and "input.steps" in bad.json()["error"]["message"]


def glyph_image(rows: list[str], dx: int, dy: int) -> list[list[int]]:
    image = [[0] * 8 for _ in range(8)]
    for y, row in enumerate(rows):
        for x, c in enumerate(row):
            image[y + dy][x + dx] = 16 if c == "#" else 0
    return image


SEVEN = ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]
FOUR = ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]


def test_digit_classifier_reads_shifted_digits(served: Serve) -> None:
    with served.client() as c:
        for rows, digit, dx, dy in ((SEVEN, 7, 3, 1), (FOUR, 4, 0, 0), (FOUR, 4, 2, 1)):
            r = c.post(
                "/v1/models/digit-classifier/infer",
                params={"wait": 60},
                json={"input": {"pixels": glyph_image(rows, dx, dy)}},
            )
            out = r.json()["result"]
            assert out["digit"] == digit, out
            assert abs(sum(out["probabilities"]) - 1) < 1e-3
        short = c.post("/v1/models/digit-classifier/infer", json={"input": {"pixels": [[0]]}})
    assert short.status_code == 422
