"""CLI and client start-up: how long a fresh process takes to show ``gpufleet --help``, to
``import gpufleet.client``, and to show ``gpufleet tasks --help`` (median of ``--runs``), and
which of the server's heavy packages each one imported (it should be none). Two floors for
scale: httpx and pydantic alone, and a bare interpreter.

``--compare SRC`` measures another checkout's ``src`` in the same run, interleaved with this
one, so that a loaded, shared machine slows both alike (before / after a change).

    python bench/cli_start.py [--runs 15] [--quick] [--json PATH] [--compare /tmp/base/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import Row, report, result  # noqa: E402

SRC = HERE.parent / "src"
HEAVY = ("sqlalchemy", "alembic", "fastapi", "starlette", "pydantic_settings")
# What runs in each fresh process; the argv is the same for every checkout.
CASES: dict[str, list[str]] = {
    "help": ["-m", "gpufleet", "--help"],
    "import_client": ["-c", "import gpufleet.client"],
    "tasks_help": ["-m", "gpufleet", "tasks", "--help"],
    # The floor under import_client: what it cannot do without (httpx as the client imports
    # it, and pydantic's BaseModel), and a bare interpreter.
    "floor_httpx_pydantic": [
        "-c",
        "import sys; sys.modules['httpx._main'] = None\nimport httpx\n"
        "from pydantic import BaseModel",
    ],
    "floor_python": ["-c", "pass"],
}
TARGETS = {"help_s": 0.3, "import_client_s": 0.15, "tasks_help_s": 0.3}
# Run the case, then print which heavy packages it left in sys.modules (at exit).
PROBE = (
    "import atexit, sys; atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join("
    "m for m in {heavy!r} if m in sys.modules) + '\\n'))\n"
    "sys.argv = {argv!r}\n"
    "import runpy\n"
    "{run}"
)


def _env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return env | {"PYTHONPATH": str(src), "COLUMNS": "80", "NO_COLOR": "1"}


def time_once(src: Path, argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=_env(src), capture_output=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with {src}: {proc.stderr.decode()[-500:]}")
    return took


def heavy_modules(src: Path, argv: list[str]) -> list[str]:
    """The heavy packages the case imports, from a separate run (not timed)."""
    if argv[0] == "-m":
        run = f"runpy.run_module({argv[1]!r}, run_name='__main__')"
        args = ["gpufleet", *argv[2:]]
    else:
        run = argv[1]
        args = ["-c"]
    code = PROBE.format(heavy=HEAVY, argv=args, run=run)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(src), capture_output=True,
                          text=True, check=False)  # fmt: skip
    line = next((x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")), "HEAVY=?")
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="fresh processes per case")
    ap.add_argument("--quick", action="store_true", help="3 runs per case")
    ap.add_argument("--json", type=Path, default=None, help="write the result JSON here")
    ap.add_argument("--compare", type=Path, default=None, help="another checkout's src/")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    srcs = {"": SRC} | ({"before_": args.compare} if args.compare else {})
    # The floors do not depend on the checkout: measured once.
    plan = [(f"{p}{c}", src, argv) for p, src in srcs.items() for c, argv in CASES.items()
            if not (p and c.startswith("floor_"))]  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    for _, src, argv in plan:  # warm the page cache and .pyc files first
        time_once(src, argv)
    for _ in range(runs):
        for name, src, argv in plan:
            times[name].append(time_once(src, argv))
    metrics = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    rows: list[Row] = []
    heavy: dict[str, list[str]] = {}
    for name, src, argv in plan:
        heavy[name] = heavy_modules(src, argv)
        target = TARGETS.get(f"{name}_s")
        rows.append((
            f"{name}: median of {runs} (min {min(times[name]):.3f} s); heavy: "
            f"{', '.join(heavy[name]) or 'none'}",
            f"{metrics[f'{name}_s']:.3f} s",
            f"<= {target} s" if target else "-",
        ))  # fmt: skip
    out = result("cli_start", metrics, {k: ("<=", v) for k, v in TARGETS.items()},
                 runs=runs, load_1m=os.getloadavg()[0], compare=str(args.compare or ""),
                 heavy_modules=heavy)  # fmt: skip
    report(out, rows, args.json)


if __name__ == "__main__":
    main()
