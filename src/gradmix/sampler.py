"""MixtureSampler: turns live domain weights into batches of (domain, example) pairs.

Guarantees (each tested):
- per-batch domain counts sum to the batch size; in ``quota`` mode each count is the largest-remainder rounding of
  ``batch_size * w_k`` (so within 1 of it); in ``multinomial`` mode counts are drawn from the weights;
- inside a domain, examples follow a seeded permutation, pass after pass, never repeated inside a pass;
- ``max_repeats`` caps the passes a domain may get: an exhausted domain's weight moves to the others (warning-free
  here, but recorded as an event the controller reports), never silently repeated;
- deterministic from (seed, weight history); exact ``state_dict`` / ``load_state_dict`` at any batch boundary,
  including batches a DataLoader has prefetched but the loop has not consumed (see ``state_dict(batch_index=...)``);
- with ``rank`` / ``world_size``, every rank computes the same global batch and takes a disjoint, strided share.

When a weight change takes effect behind a DataLoader: ``set_weights`` applies from the next batch the sampler
*produces*. A DataLoader with ``num_workers > 0`` draws ``num_workers * prefetch_factor`` batches of indices ahead
(``num_workers = 0``: none), so a change made after consuming batch t first shows in batch t + 1 + that depth. The
sampler records the weights each produced batch used, so a checkpoint taken at the consumed step replays the
prefetched batches with the weights they had: resume is exact either way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from gradmix.methods.base import validate_weights

__all__ = ["MixtureSampler", "SamplerEvent", "DataExhaustedError", "largest_remainder_counts"]


class DataExhaustedError(StopIteration):
    """Every domain with weight has used up its ``max_repeats`` passes."""


@dataclass(frozen=True)
class SamplerEvent:
    batch_index: int
    domain: int
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "domain": self.domain, "kind": self.kind, "message": self.message}


def largest_remainder_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` with |count_k - total*w_k| < 1 (Hamilton's method).

    Ties in the remainders go to the lower domain index, so the result is deterministic.
    """
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        remainders = exact - counts
        # stable sort on -remainder keeps lower indices first among equal remainders
        order = np.argsort(-remainders, kind="stable")
        counts[order[:short]] += 1
    return counts


@dataclass
class _BatchRecord:
    """Undo log of one produced batch: enough to rebuild the state before it."""

    batch_index: int
    weights: np.ndarray
    touched: np.ndarray
    old_cursor: np.ndarray
    old_passes: np.ndarray
    old_exhausted: np.ndarray
    num_events: int
    pending_before: tuple
    deferred_before: dict


class MixtureSampler:
    """Yields batches as lists of ``(domain_index, example_index)`` pairs (this rank's share of a global batch).

    Args:
        sizes: examples per domain (all > 0).
        batch_size: GLOBAL batch size; must be divisible by ``world_size``.
        weights: initial weights (default uniform); any non-negative vector with a positive sum.
        seed: seeds every permutation and multinomial draw.
        mode: ``"quota"`` (deterministic largest-remainder counts) or ``"multinomial"``.
        rank, world_size: this process's place in a data-parallel group.
        max_repeats: most passes any domain may get (1 = no example is ever seen twice); None = unlimited.
        domain_names: names used in errors and events.
        history: how many produced batches can be rolled back by ``state_dict(batch_index=...)`` (the DataLoader
            prefetch depth must be below it).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        mode: str = "quota",
        rank: int = 0,
        world_size: int = 1,
        max_repeats: int | None = None,
        domain_names: Sequence[str] | None = None,
        history: int = 64,
    ) -> None:
        sizes_arr = np.asarray(sizes)
        if sizes_arr.ndim != 1 or sizes_arr.shape[0] == 0:
            raise ValueError("sizes must be a non-empty 1-D sequence of example counts, one per domain")
        self.domain_names = list(domain_names) if domain_names is not None else [str(i) for i in range(len(sizes_arr))]
        if len(self.domain_names) != len(sizes_arr):
            raise ValueError(f"{len(self.domain_names)} domain names for {len(sizes_arr)} sizes")
        for i, size in enumerate(sizes_arr.tolist()):
            if not float(size).is_integer() or size <= 0:
                raise ValueError(f"domain {self.domain_names[i]!r} has size {size}; every domain needs >= 1 example")
        self.sizes = sizes_arr.astype(np.int64)
        self.num_domains = int(self.sizes.shape[0])
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if mode not in ("quota", "multinomial"):
            raise ValueError(f"mode must be 'quota' or 'multinomial', got {mode!r}")
        if max_repeats is not None and (int(max_repeats) != max_repeats or max_repeats < 1):
            raise ValueError(f"max_repeats must be a positive integer or None, got {max_repeats!r}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mode = mode
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_repeats = None if max_repeats is None else int(max_repeats)
        self.history = int(history)

        self._weights = self._check(weights if weights is not None else np.ones(self.num_domains))
        self._pending: deque[np.ndarray] = deque()  # weights owed to batches replayed after a resume
        self._cursor = np.zeros(self.num_domains, dtype=np.int64)  # position inside the current pass
        self._passes = np.ones(self.num_domains, dtype=np.int64)  # passes started (the first starts at once)
        self._exhausted = np.zeros(self.num_domains, dtype=bool)
        self._batch_index = 0
        self._events: list[SamplerEvent] = []
        self._log: deque[_BatchRecord] = deque(maxlen=max(self.history, 1))
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        self._deferred: dict[int, np.ndarray] = {}  # per domain: examples pushed to the back of the current pass

    # -- weights ------------------------------------------------------------------------------------------------
    def _check(self, weights: Any) -> np.ndarray:
        return validate_weights(weights, self.num_domains, names=self.domain_names)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Use these weights from the next batch this sampler produces."""
        self._weights = self._check(weights)

    @property
    def weights(self) -> np.ndarray:
        return self._weights.copy()

    @property
    def batch_index(self) -> int:
        """Number of global batches produced so far."""
        return self._batch_index

    @property
    def passes(self) -> np.ndarray:
        """Passes started per domain (1 before any repeat); ``passes - 1`` is the number of repeats."""
        return self._passes.copy()

    @property
    def epochs(self) -> np.ndarray:
        """Fractional passes completed per domain (examples drawn / domain size)."""
        return (self._passes - 1) + self._cursor / self.sizes

    @property
    def exhausted(self) -> np.ndarray:
        return self._exhausted.copy()

    @property
    def events(self) -> list[SamplerEvent]:
        return list(self._events)

    # -- sampling -----------------------------------------------------------------------------------------------
    def _permutation(self, domain: int, pass_index: int) -> np.ndarray:
        """The seeded order of a pass; examples in ``_deferred[domain]`` (just used at the end of the previous pass,
        inside the same batch) are moved to the back, so a batch that wraps around a pass never repeats one."""
        cached = self._perm_cache.get(domain)
        if cached is not None and cached[0] == pass_index:
            return cached[1]
        perm = np.random.default_rng([self.seed, domain, pass_index]).permutation(int(self.sizes[domain]))
        deferred = self._deferred.get(domain)
        if deferred is not None and deferred.size and deferred.size < perm.size:
            late = np.isin(perm, deferred)
            perm = np.concatenate([perm[~late], perm[late]])
        self._perm_cache[domain] = (pass_index, perm)
        return perm

    def _effective_weights(self, requested: np.ndarray) -> np.ndarray:
        """Requested weights with exhausted domains removed; their mass goes to the others in proportion."""
        if not self._exhausted.any():
            return requested
        live = ~self._exhausted
        if not live.any():
            raise DataExhaustedError("every domain has used its max_repeats passes")
        w = np.where(live, requested, 0.0)
        if w.sum() <= 0:  # all requested mass sat on exhausted domains: spread it over the live ones
            w = live.astype(np.float64)
        return w / w.sum()

    def _counts(self, weights: np.ndarray, total: int, batch_index: int, salt: int) -> np.ndarray:
        if self.mode == "quota":
            return largest_remainder_counts(weights, total)
        rng = np.random.default_rng([self.seed, 7919, batch_index, salt])
        return rng.multinomial(total, weights).astype(np.int64)

    def _take(self, domain: int, count: int, batch_index: int) -> np.ndarray:
        """Take up to ``count`` examples from a domain, crossing pass boundaries; may exhaust the domain."""
        parts = []
        need = count
        size = int(self.sizes[domain])
        while need > 0:
            cursor = int(self._cursor[domain])
            if cursor >= size:
                if self.max_repeats is not None and self._passes[domain] >= self.max_repeats:
                    break  # last allowed pass used up
                self._passes[domain] += 1
                self._cursor[domain] = 0
                cursor = 0
                if parts:  # the new pass starts inside this batch: keep what was just used for its end
                    self._deferred[domain] = np.concatenate(parts)
                else:
                    self._deferred.pop(domain, None)
            perm = self._permutation(domain, int(self._passes[domain]))
            take = min(need, size - cursor)
            parts.append(perm[cursor:cursor + take])
            self._cursor[domain] = cursor + take
            need -= take
        if self.max_repeats is not None and self._cursor[domain] >= size and self._passes[domain] >= self.max_repeats:
            # mark at once (also when the last pass ends exactly here) so the next draw already avoids the domain
            self._exhausted[domain] = True
            self._events.append(SamplerEvent(
                batch_index, domain, "exhausted",
                f"domain {self.domain_names[domain]!r} used its max_repeats={self.max_repeats} passes at batch "
                f"{batch_index}; its weight is moved to the other domains",
            ))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def next_global_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Produce the next GLOBAL batch as (domain ids, example ids), sorted by domain. Advances the state."""
        from_pending = bool(self._pending)
        requested = self._pending.popleft() if from_pending else self._weights
        pending_before = tuple(w.copy() for w in self._pending)
        batch_index = self._batch_index
        old_cursor, old_passes, old_exhausted = self._cursor.copy(), self._passes.copy(), self._exhausted.copy()
        num_events = len(self._events)
        deferred_before = dict(self._deferred)

        domains_out: list[np.ndarray] = []
        examples_out: list[np.ndarray] = []
        remaining = self.batch_size
        salt = 0
        try:
            while remaining > 0:
                weights = self._effective_weights(requested)
                counts = self._counts(weights, remaining, batch_index, salt)
                for domain in np.flatnonzero(counts):
                    got = self._take(int(domain), int(counts[domain]), batch_index)
                    if got.size:
                        domains_out.append(np.full(got.size, domain, dtype=np.int64))
                        examples_out.append(got)
                        remaining -= got.size
                salt += 1
        except DataExhaustedError:
            # roll back the partial batch so the state stays at a clean boundary
            self._cursor, self._passes, self._exhausted = old_cursor, old_passes, old_exhausted
            self._deferred = deferred_before
            self._perm_cache.clear()
            del self._events[num_events:]
            if from_pending:
                self._pending.appendleft(requested)
            raise
        domains = np.concatenate(domains_out)
        examples = np.concatenate(examples_out)
        if salt > 1:  # shortfall refills appended domains out of order: keep the batch sorted by domain
            order = np.argsort(domains, kind="stable")
            domains, examples = domains[order], examples[order]

        touched = np.flatnonzero((old_cursor != self._cursor) | (old_passes != self._passes)
                                 | (old_exhausted != self._exhausted))
        if self.history > 0:
            self._log.append(_BatchRecord(batch_index, requested, touched, old_cursor[touched], old_passes[touched],
                                          old_exhausted[touched], num_events, pending_before,
                                          deferred_before))
        self._batch_index += 1
        return domains, examples

    def next_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the next global batch as (domain ids, example ids)."""
        domains, examples = self.next_global_arrays()
        if self.world_size > 1:
            domains, examples = domains[self.rank::self.world_size], examples[self.rank::self.world_size]
        return domains, examples

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            try:
                yield next(self)
            except DataExhaustedError:
                return

    def __next__(self) -> list[tuple[int, int]]:
        domains, examples = self.next_arrays()
        return list(zip(domains.tolist(), examples.tolist()))

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self, batch_index: int | None = None) -> dict[str, Any]:
        """The state before global batch ``batch_index`` (default: after the last batch produced).

        Passing the number of batches the training loop has *consumed* gives an exact checkpoint even while a
        DataLoader holds prefetched batches: those are rolled back and their weights kept, so a resumed sampler
        reproduces them.
        """
        cursor, passes, exhausted = self._cursor.copy(), self._passes.copy(), self._exhausted.copy()
        num_events = len(self._events)
        pending = [w.copy() for w in self._pending]
        deferred = dict(self._deferred)
        if batch_index is not None and batch_index != self._batch_index:
            if not 0 <= batch_index < self._batch_index:
                raise ValueError(f"cannot checkpoint at batch {batch_index}: sampler has produced {self._batch_index}")
            records = [r for r in self._log if r.batch_index >= batch_index]
            if not records or records[0].batch_index != batch_index:
                raise ValueError(
                    f"cannot roll back to batch {batch_index}: only the last {len(self._log)} batches are kept "
                    f"(history={self.history}); raise history above the DataLoader's prefetch depth"
                )
            for record in reversed(records):
                cursor[record.touched] = record.old_cursor
                passes[record.touched] = record.old_passes
                exhausted[record.touched] = record.old_exhausted
                num_events = record.num_events
                if record.deferred_before is not None:
                    deferred = dict(record.deferred_before)
            pending = [r.weights.copy() for r in records] + pending
            pending = list(records[0].pending_before) + pending
        else:
            batch_index = self._batch_index
        return {
            "format": "gradmix.MixtureSampler/1",
            "sizes": self.sizes.tolist(),
            "domain_names": list(self.domain_names),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "mode": self.mode,
            "max_repeats": self.max_repeats,
            "world_size": self.world_size,
            "batch_index": int(batch_index),
            "weights": self._weights.tolist(),
            "pending_weights": [w.tolist() for w in pending],
            "cursor": cursor.tolist(),
            "passes": passes.tolist(),
            "exhausted": exhausted.tolist(),
            "deferred": {str(d): v.tolist() for d, v in deferred.items()},
            "events": [e.to_dict() for e in self._events[:num_events]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; refuses one from a run with other domains, sizes or batch geometry."""
        if state.get("format") != "gradmix.MixtureSampler/1":
            raise ValueError(f"not a MixtureSampler state (format={state.get('format')!r})")
        if list(state["domain_names"]) != self.domain_names:
            theirs, ours = list(state["domain_names"]), self.domain_names
            missing = [d for d in theirs if d not in ours]
            extra = [d for d in ours if d not in theirs]
            raise ValueError(
                "checkpoint is from a run with other domains: "
                f"checkpoint has {theirs}, this sampler has {ours} (missing here: {missing}, new here: {extra})"
            )
        for key, mine in (("sizes", self.sizes.tolist()), ("batch_size", self.batch_size), ("seed", self.seed),
                          ("mode", self.mode), ("max_repeats", self.max_repeats)):
            if state[key] != mine:
                raise ValueError(f"checkpoint has {key}={state[key]!r} but this sampler has {key}={mine!r}")
        self._weights = self._check(state["weights"])
        self._pending = deque(self._check(w) for w in state["pending_weights"])
        self._cursor = np.asarray(state["cursor"], dtype=np.int64)
        self._passes = np.asarray(state["passes"], dtype=np.int64)
        self._exhausted = np.asarray(state["exhausted"], dtype=bool)
        self._batch_index = int(state["batch_index"])
        self._events = [SamplerEvent(**e) for e in state["events"]]
        self._deferred = {int(d): np.asarray(v, dtype=np.int64) for d, v in state.get("deferred", {}).items()}
        self._log.clear()
        self._perm_cache.clear()
