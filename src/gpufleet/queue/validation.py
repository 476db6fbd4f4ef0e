"""Checks and normalises what callers hand the queue, before anything is written.

Every refusal is an ``InvalidInput`` (or ``PayloadTooLarge``) naming the field, the value and
what would be accepted; nothing reaches the database or the blob store until all checks pass.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.errors import InvalidInput, PayloadTooLarge, size_text
from gpufleet.queue.tasks import Lane, TaskError, TaskSpec, TaskStatus

PRIORITY_MIN, PRIORITY_MAX = -100, 100
MAX_ATTEMPTS_LIMIT = 100
_NAME = (
    re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
    "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
_VERSION = (
    re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"),
    "1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit",
)
_TENANT = (
    re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"),
    "1-128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
)
_WORKER = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class Limits:
    inline_input_limit: int = 64 * 1024
    max_input_bytes: int = 16 * 1024 * 1024
    default_max_attempts: int = 3
    # Queued (not yet running) tasks one tenant may have; None: no limit.
    max_queued_per_tenant: int | None = None


@dataclass(frozen=True)
class PreparedTask:
    spec: TaskSpec
    lane: Lane
    max_attempts: int
    encoded_input: bytes  # canonical JSON
    request_hash: str


def check_name(value: object, field: str, rule: tuple[re.Pattern[str], str] = _NAME) -> str:
    pattern, text = rule
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidInput(f"{field} must be {text}; got {value!r:.80}", field=field)
    return value


def check_tenant(value: object) -> str:
    return check_name(value, "tenant", _TENANT)


def check_int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(
            f"{field} must be an integer between {lo} and {hi}, got {value!r:.40}", field=field
        )
    return value


def check_lane(value: object) -> Lane:
    try:
        if not isinstance(value, str):
            raise ValueError
        return Lane(value)
    except ValueError:
        choices = ", ".join(repr(lane.value) for lane in Lane)
        raise InvalidInput(
            f"lane must be one of {choices}, got {value!r:.40}", field="lane"
        ) from None


def check_status(value: object) -> TaskStatus:
    try:
        if not isinstance(value, str):
            raise ValueError
        return TaskStatus(value)
    except ValueError:
        choices = ", ".join(s.value for s in TaskStatus)
        raise InvalidInput(
            f"status must be one of {choices}, got {value!r:.40}", field="status"
        ) from None


def check_worker_id(value: object) -> str:
    if not isinstance(value, str) or not _WORKER.match(value):
        raise InvalidInput(
            f"worker_id must be 1-128 printable ASCII characters, got {value!r:.40}",
            field="worker_id",
        )
    return value


MAX_LEASE_S = 24 * 3600.0


def check_version(value: object) -> str:
    return check_name(value, "version", _VERSION)


def check_lease(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.1 <= value <= MAX_LEASE_S
    ):
        raise InvalidInput(
            f"lease_s must be a number of seconds from 0.1 to {MAX_LEASE_S:.0f}, got {value!r:.40}",
            field="lease_s",
        )
    return float(value)


def check_task_ids(value: object) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise InvalidInput(
            f"task_ids must be a list of task ids, got {type(value).__name__}", field="task_ids"
        )
    ids = list(dict.fromkeys(value))
    if any(not isinstance(i, str) or not 1 <= len(i) <= 64 for i in ids):
        raise InvalidInput(
            "task_ids must hold task ids (strings of 1-64 characters)", field="task_ids"
        )
    return ids


def check_error(error: object) -> TaskError:
    if not isinstance(error, TaskError):
        raise InvalidInput(
            f"error must be a TaskError(code, message), got {type(error).__name__}", field="error"
        )
    code = check_name(error.code, "error.code")
    return TaskError(code[:64], str(error.message)[:10_000])


def encode_json(value: Any, field: str, *, canonical: bool = True) -> bytes:
    """Compact JSON without NaN; ``canonical``: with sorted keys, so the same value always
    gives the same bytes."""
    try:
        text = json.dumps(value, sort_keys=canonical, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise InvalidInput(
            f"{field} contains nan or inf, which JSON cannot represent; send null or a string",
            field=field,
        ) from None
    except (TypeError, RecursionError) as e:
        raise InvalidInput(f"{field} is not JSON-serialisable: {e}", field=field) from None
    return text.encode()


def check_webhook_url(url: object) -> str:
    """An absolute http(s) URL with a host, at most 2048 characters."""
    from urllib.parse import urlsplit

    ok = isinstance(url, str) and len(url) <= 2048 and not any(c.isspace() for c in url)
    if ok:
        try:
            parts = urlsplit(str(url))
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises ValueError for a port out of range
        except ValueError:
            ok = False
    if not ok:
        raise InvalidInput(
            f"webhook_url must be an absolute http:// or https:// URL; got {url!r:.80}",
            field="webhook_url",
        )
    return str(url)


def prepare(spec: TaskSpec, limits: Limits) -> PreparedTask:
    check_name(spec.model, "model")
    check_version(spec.version)
    check_name(spec.tenant, "tenant", _TENANT)
    lane = check_lane(spec.lane)
    check_int(spec.priority, "priority", PRIORITY_MIN, PRIORITY_MAX)
    max_attempts = limits.default_max_attempts if spec.max_attempts is None else spec.max_attempts
    check_int(max_attempts, "max_attempts", 1, MAX_ATTEMPTS_LIMIT)
    key = spec.idempotency_key
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 256):
        raise InvalidInput(
            f"idempotency_key must be a string of 1-256 characters, got {key!r:.40}",
            field="idempotency_key",
        )
    if spec.webhook_url is not None:
        check_webhook_url(spec.webhook_url)
    encoded = encode_json(spec.input, "input")
    if len(encoded) > limits.max_input_bytes:
        raise PayloadTooLarge(
            f"input is {len(encoded):,} bytes as JSON; the limit is "
            f"{size_text(limits.max_input_bytes)} (GPUFLEET_MAX_INPUT_BYTES)",
            field="input",
            limit=limits.max_input_bytes,
            size=len(encoded),
        )
    h = hashlib.sha256()
    parts = (spec.model, spec.version, lane.value, str(spec.priority), str(max_attempts))
    for part in (*parts, spec.webhook_url or ""):
        h.update(part.encode())
        h.update(b"\0")
    h.update(encoded)
    return PreparedTask(spec, lane, max_attempts, encoded, h.hexdigest())
