"""``gpufleet serve`` end to end on loopback: the API, the supervisor and real worker processes
serving the built-in demo model on SQLite."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpufleet.queue import TaskQueue, TaskSpec
from gpufleet.store import LocalBlobStore, create_engine
from tests.integration.serve_helpers import Serve, children, gone, serving, wait_done

pytestmark = pytest.mark.slow

SEVEN = {"prompt": "a handwritten 7", "seed": 1, "steps": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One server for the tests that do not stop or kill anything."""
    with serving(tmp_path_factory.mktemp("serve"), "--cpu-slots", "2") as s:
        yield s.wait_workers_ready("digits", 2)


def test_submit_then_result_for_the_demo_model(served: Serve) -> None:
    with served.client() as c:
        r = c.post("/v1/tasks", json={"model": "digits", "input": SEVEN})
        assert r.status_code == 202, r.text
        tid = r.json()["id"]
        assert r.headers["location"] == f"/v1/tasks/{tid}"
        [view] = wait_done(c, [tid]).values()
        assert view["status"] == "succeeded"
        out = c.get(f"/v1/tasks/{tid}/result").json()["result"]
    assert out["digit"] == 7
    assert base64.b64decode(out["png_base64"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_infer_waits_for_the_result(served: Serve) -> None:
    with served.client() as c:
        r = c.post("/v1/models/digits/infer", params={"wait": 30}, json={"input": SEVEN})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert r.json()["result"]["digit"] == 7


def test_models_lists_the_demo_with_a_working_example(served: Serve) -> None:
    with served.client() as c:
        [model] = c.get("/v1/models").json()["models"]
        assert model["name"] == "digits"
        assert model["batching"] == {"max_batch_size": 32, "max_queue_delay_ms": 5.0}
        assert isinstance(model["batching"]["max_batch_size"], int)  # not 32.0
        assert model["workers"] == {"ready": 2, "total": 2}
        r = c.post("/v1/models/digits/infer", json={"input": model["example_input"]})
    assert r.json()["status"] == "succeeded"


def test_an_input_that_breaks_the_models_schema_is_refused_at_submit(served: Serve) -> None:
    """``steps: 200`` breaks the demo's published input_schema (at most 100): 422 at once,
    naming the field and the reason, on every way in; nothing is queued."""
    bad = {**SEVEN, "steps": 200}
    with served.client() as c:
        before = c.get("/v1/tasks", params={"limit": 1000}).json()["tasks"]
        for r in (
            c.post("/v1/tasks", json={"model": "digits", "input": bad}),
            c.post("/v1/models/digits/infer", json={"input": bad}),
        ):
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_input"
            assert err["details"]["field"] == "input.steps"
            assert "200 is greater than the maximum of 100" in err["message"]
        r = c.post("/v1/tasks/batch", json={"tasks": [
            {"model": "digits", "input": SEVEN},
            {"model": "digits", "input": {"prompt": "a 3", "stepz": 8}},
        ]})  # fmt: skip
        assert r.status_code == 200, r.text
        first, second = r.json()["tasks"]
        assert "id" in first
        assert second["error"]["code"] == "invalid_input"
        assert "'stepz' was unexpected" in second["error"]["message"]
        wait_done(c, [first["id"]])
        after = c.get("/v1/tasks", params={"limit": 1000}).json()["tasks"]
    assert len(after) == len(before) + 1  # only the good one of the bulk


def test_interactive_goes_ahead_of_a_batch_backlog(served: Serve) -> None:
    # The backlog goes straight into the queue: over HTTP it would drain as fast as it came.
    q = TaskQueue(create_engine(f"sqlite:///{served.data_dir / 'gpufleet.db'}"),
                  LocalBlobStore(served.data_dir / "blobs"))  # fmt: skip
    slow = TaskSpec("digits", "1", {"prompt": "3", "steps": 100}, lane="batch")
    backlog = [sub.task.id for sub in q.submit_many([slow] * 400)]
    q.close()
    with served.client() as c:
        r = c.post("/v1/models/digits/infer", params={"wait": 60}, json={"input": SEVEN})
        assert r.json()["status"] == "succeeded"
        done_at = c.get(f"/v1/tasks/{r.json()['id']}").json()["finished_at"]
        views = wait_done(c, backlog, timeout=240)
    # Submitted last, the interactive task finished ahead of most of the backlog.
    later = [v for v in views.values() if v["finished_at"] > done_at]
    assert len(later) > 200


def test_cancel_a_queued_task(served: Serve) -> None:
    # Slow tasks ahead of the target (and the target last in line), so the worker cannot reach
    # it before the cancel does: one-statement claims drain 200 quick tasks in well under the
    # time it takes to submit them.
    slow = {**SEVEN, "steps": 100}
    body = {"model": "digits", "input": slow, "lane": "batch"}
    with served.client() as c:
        ids = [c.post("/v1/tasks", json=body).json()["id"] for _ in range(200)]
        ids.append(c.post("/v1/tasks", json={**body, "priority": -100}).json()["id"])
        r = c.delete(f"/v1/tasks/{ids[-1]}")
        assert r.status_code == 200
        views = wait_done(c, ids)
    assert views[ids[-1]]["status"] == "cancelled"
    assert c is not None


def test_idempotent_submit(served: Serve) -> None:
    body = {"model": "digits", "input": SEVEN, "idempotency_key": "order-17"}
    with served.client() as c:
        first = c.post("/v1/tasks", json=body).json()
        again = c.post("/v1/tasks", json=body).json()
        other = c.post("/v1/tasks", json={**body, "input": {"prompt": "1"}})
    assert first["created"] and not again["created"]
    assert again["id"] == first["id"]
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"


def test_tenants_see_only_their_own_tasks(served: Serve) -> None:
    keys = {}
    for tenant in ("acme", "globex"):
        out = subprocess.run(
            [sys.executable, "-m", "gpufleet", "keys", "create", "--tenant", tenant, "--json"],
            env={**os.environ, "GPUFLEET_DATA_DIR": str(served.data_dir)},
            capture_output=True,
            text=True,
            check=True,
        )
        keys[tenant] = json.loads(out.stdout)["key"]
    with served.client(keys["acme"]) as acme, served.client(keys["globex"]) as globex:
        tid = acme.post("/v1/tasks", json={"model": "digits", "input": SEVEN}).json()["id"]
        assert acme.get(f"/v1/tasks/{tid}").status_code == 200
        for method in ("GET", "DELETE"):
            r = globex.request(method, f"/v1/tasks/{tid}")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "not_found"
        assert tid not in {t["id"] for t in globex.get("/v1/tasks").json()["tasks"]}
    with served.client("gfk_000000000000_not-a-real-key") as nobody:
        r = nobody.get("/v1/tasks")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


class _Hooks(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hooks.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_is_called_when_the_task_ends(served: Serve) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        with served.client() as c:
            tid = c.post(
                "/v1/tasks", json={"model": "digits", "input": SEVEN, "webhook_url": hook}
            ).json()["id"]
            deadline = time.monotonic() + 30
            while not _Hooks.received and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        receiver.shutdown()
    [call] = _Hooks.received
    assert call["id"] == tid
    assert call["status"] == "succeeded"
    assert call["result"]["digit"] == 7


@pytest.mark.parametrize("agent", ["on", "off"])
def test_sigkill_of_a_worker_mid_batch_loses_nothing(tmp_path: Path, agent: str) -> None:
    """With a queue agent too (worker.agent): it dies with its worker, and nothing it was
    claiming or committing is lost."""
    env = {"GPUFLEET_LEASE_S": "2", "GPUFLEET_QUEUE_AGENT": agent}
    with serving(tmp_path, "--cpu-slots", "2", env=env) as s:
        with s.client() as c:
            ids = [
                c.post("/v1/tasks", json={"model": "digits",
                                          "input": {"prompt": "5", "steps": 50}}).json()["id"]
                for _ in range(150)
            ]  # fmt: skip
            time.sleep(1.0)  # workers are mid-batch
            victim = s.workers()[0]
            agents = children(victim)  # the agent (and multiprocessing's resource tracker)
            assert bool(agents) == (agent == "on")
            os.kill(victim, signal.SIGKILL)
            views = wait_done(c, ids, timeout=180)
            assert all(v["status"] == "succeeded" for v in views.values())
            # the supervisor restarted the killed worker
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                [m] = c.get("/v1/models").json()["models"]
                if m["workers"]["ready"] == 2:
                    break
                time.sleep(0.2)
            assert m["workers"]["ready"] == 2
        assert victim not in s.workers()
        assert all(gone(pid) for pid in agents)


BENCH_MODELS = Path(__file__).resolve().parents[2] / "bench" / "models"
FIXED_COST = BENCH_MODELS / "fixed_cost"


@pytest.mark.timeout(600)
def test_sigterm_drains_and_exits_within_the_grace_period(tmp_path: Path) -> None:
    # A model that waits 0.5 s a batch of up to 32 with the CPU free, so that however fast or
    # loaded the machine, 7 batches are more than the second before SIGTERM and the drain
    # (the batch in hand) can finish: some tasks are still queued when it ends. With a queue
    # agent: the drain's last results commit through it before it stops.
    env = {"GPUFLEET_QUEUE_AGENT": "on", "SLEEP_MS": "500"}
    args = ("--model", str(BENCH_MODELS / "sleep"), "--cpu-slots", "1")
    s = Serve(tmp_path, *args, "--grace", "10", env=env).start()
    q = TaskQueue(create_engine(f"sqlite:///{tmp_path / 'gpufleet.db'}"),
                  LocalBlobStore(tmp_path / "blobs"))  # fmt: skip
    ids = [sub.task.id for sub in q.submit_many(
        [TaskSpec("sleep", "1", {"n": i}, lane="batch") for i in range(200)])]  # fmt: skip
    time.sleep(1.0)
    started = time.monotonic()
    assert s.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 20
    assert "stopping: draining workers" in s.output()
    # Nothing is left leased to the stopped workers: finished, or back in the queue.
    states = {t.status.value for t in q.get_many(ids).values()}
    q.close()
    assert states <= {"succeeded", "queued"}
    assert "queued" in states
    # Restart on the same data dir: the rest runs, nothing is lost.
    with serving(tmp_path, *args, env=env) as again, again.client(s.key) as c:
        done = wait_done(c, ids, timeout=480)
    assert all(v["status"] == "succeeded" for v in done.values())


def test_the_address_comes_from_the_environment_too(tmp_path: Path) -> None:
    s = Serve(tmp_path, "--cpu-slots", "1", env={"GPUFLEET_HOST": "127.0.0.1"})
    s.cmd.remove("--port")
    s.cmd.remove(str(s.port))
    s.env["GPUFLEET_PORT"] = str(s.port)
    try:
        s.start()  # ready on the port the environment named
        assert f"http://127.0.0.1:{s.port}/v1" in s.output()
    finally:
        s.stop()


def test_ctrl_c_stops_without_restarting_anything(tmp_path: Path) -> None:
    """Ctrl-C reaches the server, its API processes and its workers at once (one process
    group): they drain and exit, and nothing is reported as exited and restarted."""
    s = Serve(tmp_path, "--cpu-slots", "2", "--api-workers", "2").start(own_group=True)
    assert s.proc is not None
    os.killpg(s.proc.pid, signal.SIGINT)
    assert s.proc.wait(60) == 0
    out = s.output()
    assert "stopping: draining workers" in out
    assert "restarting in" not in out and "starting another" not in out, out


def test_cancel_a_running_task(tmp_path: Path) -> None:
    env = {"FIXED_COST_MS": "3000", "GPUFLEET_LEASE_S": "3"}  # heartbeats every second
    with serving(tmp_path, "--model", str(FIXED_COST), env=env) as s, s.client() as c:
        tid = c.post("/v1/tasks", json={"model": "fixed-cost", "input": {"n": 1}}).json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/v1/tasks/{tid}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = c.delete(f"/v1/tasks/{tid}")
        assert r.status_code == 200
        assert r.json()["cancel_requested"] is True
        [view] = wait_done(c, [tid]).values()  # uncancelled, it would end succeeded
        assert view["status"] == "cancelled"
        r = c.get(f"/v1/tasks/{tid}/result")
        assert r.json()["status"] == "cancelled"
        assert r.json()["result"] is None
