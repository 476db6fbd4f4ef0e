"""Task ids: UUIDv7, unique, and increasing in creation order (so ``ORDER BY id`` is FIFO)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

from gpufleet.queue.ids import new_task_id


def test_ids_are_rfc_9562_version_7_uuids() -> None:
    for _ in range(100):
        text = new_task_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower-case, hyphenated, 36 characters
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_ids_made_in_a_tight_loop_are_unique_and_strictly_increasing() -> None:
    ids = [new_task_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_embedded_timestamp_is_now() -> None:
    before = time.time()
    ids = [new_task_id() for _ in range(1000)]
    after = time.time()
    for text in (ids[0], ids[-1]):
        ms = uuid.UUID(text).int >> 80
        assert before - 1 <= ms / 1000 <= after + 1


def test_ids_from_many_threads_are_unique() -> None:
    per_thread, threads = 2000, 8
    results: list[list[str]] = [[] for _ in range(threads)]

    def make(out: list[str]) -> None:
        out.extend(new_task_id() for _ in range(per_thread))

    workers = [threading.Thread(target=make, args=(r,)) for r in results]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    everything = [i for r in results for i in r]
    assert len(set(everything)) == per_thread * threads
    # Each thread's own ids still come out in increasing order.
    for r in results:
        assert r == sorted(r)
