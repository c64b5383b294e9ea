"""What gradmix needs from torch.distributed: a process-group timeout with a gradmix default, and one check, at
construction, that the ranks agree.

**Timeout.** A collective waits for every rank; torch's default process-group timeout is 30 minutes, so a rank that
hangs (a stuck data read, a deadlocked dataloader worker) blocks its peers for half an hour. gradmix's default is
``DEFAULT_TIMEOUT_S`` (10 minutes: long enough for a checkpoint save while the others wait at a barrier), or the
number of seconds in the environment variable ``GRADMIX_DIST_TIMEOUT``. ``init_process_group`` applies it; for the
frameworks that create the group themselves pass ``default_timeout()`` on:
``TrainingArguments(ddp_timeout=int(default_timeout().total_seconds()))`` (HF) and
``DDPStrategy(timeout=default_timeout())`` (Lightning). After the timeout the waiting collective raises on the
ranks that still run (with gloo; NCCL needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, torch's default).

**Agreement.** Ranks built with different domains, batch sizes or methods run on silently: duplicated examples,
weights drifting apart, one domain's statistics pooled into another's. ``check_agreement`` all-gathers what must
agree (one collective, at construction) and raises the same one-line ``RankMismatchError`` on every rank, naming
each field that differs and which ranks hold which value. An error one rank hit before the check (rank 0 could not
take the run folder) travels with the same collective, so every rank stops with it instead of waiting for a peer
that has left.

**Exit under gloo.** A gloo run that returns normally after ``destroy_process_group()`` can abort a rank at
interpreter exit ("terminate called without an active exception", SIGABRT). This is a torch fault (2.13): once
``torch._dynamo`` has been imported while the group exists (DDP and optimizers import it), torch keeps the group and
its worker threads alive until the process ends. Any collective on a tensor made in Python, gradmix's statistics
included, can leave a worker thread to release that tensor, and the thread needs the GIL for it. If that happens
while the interpreter is finalising, CPython ends the thread inside a C++ destructor. ``exit_rank()`` leaves with
``os._exit`` after a barrier, ``destroy_process_group()`` and flushed output. docs/bad_inputs.md has the details and
a reproducer without gradmix.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "RankMismatchError",
    "check_agreement",
    "default_timeout",
    "exit_rank",
    "init_process_group",
    "is_distributed",
    "raise_on_any_rank",
]

DEFAULT_TIMEOUT_S = 600.0
"""gradmix's process-group timeout, seconds (torch's default is 1800)."""
TIMEOUT_ENV = "GRADMIX_DIST_TIMEOUT"
"""Environment variable overriding ``DEFAULT_TIMEOUT_S`` (seconds)."""


class RankMismatchError(ValueError):
    """Ranks that must agree (domains, batch geometry, method, seed, ...) do not."""


def default_timeout() -> datetime.timedelta:
    """The process-group timeout gradmix uses: ``$GRADMIX_DIST_TIMEOUT`` seconds, else ``DEFAULT_TIMEOUT_S``."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_process_group(
    backend: str | None = None, *, timeout: datetime.timedelta | float | None = None, **kwargs: Any
) -> None:
    """``torch.distributed.init_process_group`` with gradmix's timeout (``default_timeout()``) unless one is given
    (a ``timedelta`` or seconds). Other arguments pass through."""
    if timeout is None:
        timeout = default_timeout()
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    torch.distributed.init_process_group(backend, timeout=timeout, **kwargs)


def exit_rank(code: int = 0, *, wait_for_peers: bool = True, message: str | None = None) -> NoReturn:
    """End this torchrun rank without the interpreter's finalisation (see "Exit under gloo" above): with
    ``wait_for_peers`` every rank passes a barrier and the process group is destroyed first (the normal end, after all
    work is saved); without it (an error, a simulated kill: the peers may be gone) it only flushes and leaves.

    ``message`` (one line, e.g. ``f"rank {rank}: cannot start: {exc}"``) goes to stderr first, in a single write:
    ``print(..., file=sys.stderr)`` writes the text and its newline separately (stderr writes through), so when every
    rank fails at once their lines run together."""
    if message is not None:
        sys.stderr.write(message.rstrip("\n") + "\n")
    dist = torch.distributed
    if wait_for_peers and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return f"ranks {shown}"


def _describe(name: str, values: list[Any]) -> str:
    """``batch_size is 8 on rank 0, 16 on rank 1`` (values grouped; lists: the first index that differs)."""
    groups: list[tuple[Any, list[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if seen == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    base = groups[0][0]
    parts = []
    for value, ranks in groups[:4]:
        parts.append(f"{_short(value)} on {_ranks(ranks)}")
    if len(groups) > 4:
        parts.append(f"... ({len(groups)} different values)")
    detail = f"{name} is " + ", ".join(parts)
    other = groups[1][0]
    if isinstance(base, list) and isinstance(other, list):
        if len(base) != len(other):
            detail += f" (lengths {len(base)} and {len(other)})"
        else:
            index = next(i for i, (a, b) in enumerate(zip(base, other)) if a != b)
            detail += f" (first difference at index {index}: {_short(base[index], 30)} vs {_short(other[index], 30)})"
    return detail


def _canonical(value: Any) -> Any:
    """Plain, comparable values: numpy and tensors to lists, mappings with sorted keys as JSON text."""
    if isinstance(value, Mapping):
        from gradmix.writers import json_safe

        return json.dumps(json_safe(dict(value)), sort_keys=True, default=repr)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _gather(payload: dict[str, Any]) -> list[dict[str, Any]]:
    dist = torch.distributed
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    return gathered


def _raise_gathered_error(gathered: list[dict[str, Any]], error: BaseException | None) -> None:
    failed = [(rank, p) for rank, p in enumerate(gathered) if p.get("error")]
    if not failed:
        return
    if error is not None:
        raise error
    rank, payload = failed[0]
    kind = payload.get("error_kind")
    from gradmix.runlock import RunDirError

    cls: type[Exception] = RunDirError if kind == "RunDirError" else ValueError
    raise cls(f"rank {rank} stopped: {payload['error']}")


def raise_on_any_rank(error: BaseException | None) -> None:
    """Collective: every rank passes the error it hit (or None); if any rank has one, every rank raises (its own,
    or the first rank's message). Without torch.distributed: raises ``error`` if given."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    gathered = _gather(
        {"error": None if error is None else str(error), "error_kind": None if error is None else type(error).__name__}
    )
    _raise_gathered_error(gathered, error)


def check_agreement(
    fields: Mapping[str, Any], *, what: str = "gradmix", rank: int | None = None, error: BaseException | None = None
) -> None:
    """Collective (every rank calls it once, with the same field names): all-gather ``fields`` and raise the same
    ``RankMismatchError`` on every rank if any field differs, naming the fields and the ranks. ``rank``: the rank
    the caller was built with (it must be its torch.distributed rank). ``error``: an error this rank hit before the
    check; it is raised on every rank instead (see ``raise_on_any_rank``). Without torch.distributed (or with one
    rank) only ``error`` is raised."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    payload = {
        "fields": {name: _canonical(value) for name, value in fields.items()},
        "rank": rank,
        "error": None if error is None else str(error),
        "error_kind": None if error is None else type(error).__name__,
    }
    gathered = _gather(payload)
    _raise_gathered_error(gathered, error)
    wrong = [(r, p["rank"]) for r, p in enumerate(gathered) if p.get("rank") is not None and p["rank"] != r]
    if wrong:
        shown = ", ".join(f"process rank {r} was built with rank={given}" for r, given in wrong[:4])
        raise RankMismatchError(f"{what}: {shown}; leave rank/world_size to torch.distributed")
    names = list(gathered[0]["fields"])
    for p in gathered[1:]:
        names += [n for n in p["fields"] if n not in names]
    differing = []
    for name in names:
        values = [p["fields"].get(name) for p in gathered]
        if any(v != values[0] for v in values[1:]):
            differing.append((name, values))
    if differing:
        details = "; ".join(_describe(name, values) for name, values in differing[:3])
        more = f"; and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise RankMismatchError(
            f"{what}: the {len(gathered)} ranks disagree on {', '.join(n for n, _ in differing)}: {details}{more}"
        )
