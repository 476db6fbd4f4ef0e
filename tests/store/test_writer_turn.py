"""SQLite writers take turns through a lock file: across processes, one at a time, handed on
at once; a group commit may hold the turn around its transaction (it nests)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from gpufleet.store import create_engine, upgrade
from gpufleet.store.engine import write_turn, write_tx


def test_the_turn_nests_in_one_thread(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with write_turn(engine) as held, write_tx(engine) as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    assert held is True
    with write_tx(engine) as conn:  # released: the next writer gets it
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))


def test_another_thread_waits_for_the_turn(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    order: list[str] = []
    with write_turn(engine):
        th = threading.Thread(target=lambda: (write_tx(engine).__enter__(), order.append("b")))
        th.start()
        time.sleep(0.2)
        order.append("a")
    th.join(5)
    assert order == ["a", "b"]


def test_a_writer_in_another_process_waits_for_the_turn(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    upgrade(engine)
    with write_tx(engine) as conn:
        conn.execute(sa.text("CREATE TABLE t (who TEXT, at REAL)"))
    child = textwrap.dedent(f"""
        import time, sqlalchemy as sa
        from gpufleet.store import create_engine
        from gpufleet.store.engine import write_tx
        engine = create_engine("sqlite:///{db}")
        print("ready", flush=True)
        with write_tx(engine) as conn:
            conn.execute(sa.text("INSERT INTO t VALUES ('child', :at)"), {{"at": time.time()}})
    """)
    with write_turn(engine):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the child is blocked on the turn meanwhile
        released = time.time()
    assert proc.wait(30) == 0
    with engine.connect() as conn:
        [(at,)] = conn.execute(sa.text("SELECT at FROM t WHERE who = 'child'")).all()
    assert at >= released
    assert (tmp_path / ".db.sqlite.writer").exists()
