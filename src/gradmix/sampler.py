"""MixtureSampler: turns live domain weights into batches of (domain, example) pairs.

Counts per batch (``mode="quota"``, the default) use error-diffusion rounding: every domain carries its rounding
residual r_k = sum_{s<=t} b*w_k(s) - C_k(t) (target minus examples drawn) from batch to batch, and a batch gives each
domain floor(r_k + b*w_k) examples plus one more to the domains with the largest remainders (ties broken by a
seeded hash, never by index). Guarantees, for the GLOBAL batch (all ranks together), each tested:

- **never ahead**: C_k(t) < T_k(t) + 1 for every domain and batch, T_k(t) = sum_{s<=t} b*w_k(s);
- **never far behind**: C_k(t) > T_k(t) - 1 while the weights stay constant, and in every weight history tried
  (random, PiKE-like drifts, weights changing every batch) the lag stayed below 2 (BENCHMARKS.md). No online
  rounding can promise less than ~H_K - 1 behind (H_K the K-th harmonic number) against weights chosen adversarially
  after seeing the counts (the "cup game"), so "within about 1 example" is the honest statement;
- per batch, a count may differ from b*w_k by up to 2 (the carried residual is below 1 either way);
- a domain with weight exactly 0 gets no examples; its residual (below 1 example) is handed to the domains that
  have weight, in proportion to their weights, so the batch stays full and T_k above includes that hand-over;
- ``mode="multinomial"``: counts are drawn i.i.d. from the weights (unbiased, variance b*w(1-w) per batch).

Order inside a domain: pass p over a domain of N examples visits ``perm_{seed,k,p}(0), ..., perm(N - 1)``, a seeded
Feistel bijection (``gradmix.permutation``): an exact permutation for any N up to 2^62, O(1) memory, computed per
batch for only the examples drawn. The state per domain is one integer (examples drawn so far) and one float (the
residual), so 10^12-example domains cost nothing. Domains marked ``shuffle=False`` (streams) get positions in order.
A batch that crosses the end of a pass may hold an example from the end of pass p and the same example from the start
of pass p + 1 (probability ~ count^2 / N; unavoidable when a domain has fewer examples than its count).

``max_repeats`` caps the passes a domain may get: an exhausted domain's weight moves to the others in proportion
(recorded as a ``SamplerEvent``; ``sampled_weights`` shows what was actually sampled); when every domain with weight
is exhausted, iteration ends (``__iter__``) or ``next()`` raises ``DataExhaustedError`` naming the domains and batch.

Deterministic from (seed, weight history); exact ``state_dict`` / ``load_state_dict`` at any batch boundary,
including batches a DataLoader has prefetched but the loop has not consumed (``state_dict(batch_index=...)``).
With ``rank`` / ``world_size``, every rank computes the same global batch and takes a disjoint, strided share; a state
can be loaded under another world size (the global batch is the same, only the shares change).

When a weight change takes effect behind a DataLoader: ``set_weights`` applies from the next batch the sampler
*produces*. A DataLoader with ``num_workers > 0`` draws ``num_workers * prefetch_factor`` batches of indices ahead,
so a change made after consuming batch t first shows in batch t + 1 + that depth; the sampler records the weights
each produced batch used, so a checkpoint taken at the consumed step replays them exactly.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from gradmix.methods.base import validate_weights
from gradmix.permutation import MAX_SIZE, feistel_permute, half_bits, mix64

__all__ = ["DataExhaustedError", "MixtureSampler", "SamplerEvent", "deficit_round"]

STATE_FORMAT = "gradmix.MixtureSampler/2"


class DataExhaustedError(RuntimeError):
    """Every domain with weight has used up its ``max_repeats`` passes (not a StopIteration: it is an error when
    raised from ``next()``; ``for batch in sampler`` simply ends)."""


@dataclass(frozen=True)
class SamplerEvent:
    batch_index: int
    domain: int
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "domain": self.domain, "kind": self.kind, "message": self.message}


def deficit_round(expected: np.ndarray, total: int, rates: np.ndarray, tie_keys: np.ndarray) -> np.ndarray:
    """Integer counts >= 0 summing to ``total`` that track ``expected`` (which should sum to ``total``).

    Domains with ``rates`` > 0 (examples owed per batch, b * w_k) are eligible; others get 0. Each eligible domain
    gets floor(expected), clipped at 0; the remaining examples go one each to the domains whose remainder would
    reach a full example soonest at their rate, (1 - remainder) / rate ("earliest deadline first", as in
    Tijdeman's chairman-assignment rounding, 1980), and any overshoot from clipping is taken back from the domains
    with the most slack. Largest-remainder alone would serve a slow domain early and later force a fast one more
    than one example behind; the deadline order avoids that. Ties go by ``tie_keys``, never by index.
    """
    eligible = rates > 0
    safe_rates = np.where(eligible, rates, 1.0)
    counts = np.where(eligible, np.maximum(np.floor(expected), 0.0), 0.0)
    short = int(total - counts.sum())
    while short:  # one round almost always; more only when a domain lags by >= 2 (adversarial weight histories)
        remainder = expected - counts
        if short > 0:
            candidates = eligible & (remainder > 0)
            if candidates.sum() < short:
                candidates = eligible
            n = min(short, int(candidates.sum()))
            with np.errstate(over="ignore", divide="ignore"):  # a tiny rate means a far deadline: inf is right
                deadline = np.where(candidates, (1.0 - remainder) / safe_rates, np.inf)
            order = np.lexsort((tie_keys, deadline))
            counts[order[:n]] += 1
        else:  # clipping at 0 overshot: take back from the domains with the most slack that have examples
            has = counts > 0
            n = min(-short, int(has.sum()))
            with np.errstate(over="ignore", divide="ignore"):
                slack = np.where(has, -remainder / safe_rates, -np.inf)
            order = np.lexsort((tie_keys, -slack))
            counts[order[:n]] -= 1
        short = int(total - counts.sum())
    return counts.astype(np.int64)


@dataclass
class _Snapshot:
    """The state before one produced batch (small: O(K)), for rolling back prefetched batches."""

    batch_index: int
    weights: np.ndarray
    drawn: np.ndarray
    residual: np.ndarray
    exhausted: np.ndarray
    num_events: int
    sampled: np.ndarray | None = None  # the weights the batch was drawn from (filled in once produced)


_BATCH_BYTES_PER_EXAMPLE = 32  # int64 domain ids, example ids and the temporaries that draw them: a lower bound


def _physical_memory() -> int | None:
    """Bytes of memory on this machine, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


class MixtureSampler:
    """Yields batches as lists of ``(domain_index, example_index)`` pairs (this rank's share of a global batch).

    Args:
        sizes: examples per domain (all >= 1, at most 2^62).
        batch_size: GLOBAL batch size; must be divisible by ``world_size``.
        weights: initial weights (default uniform); any non-negative vector with a positive sum, or a
            ``{domain name: weight}`` mapping (needs ``domain_names``; every name once, in any order).
        seed: seeds every permutation, tie-break and multinomial draw.
        mode: ``"quota"`` (error-diffusion counts, see the module docstring) or ``"multinomial"``.
        rank, world_size: this process's place in a data-parallel group.
        max_repeats: most passes any domain may get (1 = no example is ever seen twice); None = unlimited.
        domain_names: names used in errors and events, and by weights given as ``{name: weight}``.
        history: how many produced batches can be rolled back by ``state_dict(batch_index=...)`` (the DataLoader
            prefetch depth must be below it).
        shuffle: per domain (or one bool for all): False yields positions 0, 1, 2, ... in order (streams).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        weights: Sequence[float] | np.ndarray | Mapping[str, float] | None = None,
        seed: int = 0,
        mode: str = "quota",
        rank: int = 0,
        world_size: int = 1,
        max_repeats: int | None = None,
        domain_names: Sequence[str] | None = None,
        history: int = 64,
        shuffle: bool | Sequence[bool] = True,
    ) -> None:
        sizes_list = list(sizes) if not isinstance(sizes, np.ndarray) else sizes.tolist()
        if not sizes_list or any(isinstance(s, (list, tuple)) for s in sizes_list):
            raise ValueError("sizes must be a non-empty 1-D sequence of example counts, one per domain")
        self._named = domain_names is not None
        self.domain_names = (
            [str(n) for n in domain_names] if domain_names is not None else [str(i) for i in range(len(sizes_list))]
        )
        if len(self.domain_names) != len(sizes_list):
            raise ValueError(f"{len(self.domain_names)} domain names for {len(sizes_list)} sizes")
        for name, size in zip(self.domain_names, sizes_list):
            if (
                isinstance(size, bool)
                or not isinstance(size, (int, np.integer, float, np.floating))
                or not float(size).is_integer()
                or not 1 <= size <= MAX_SIZE
            ):
                raise ValueError(
                    f"domain {name!r} has size {size!r}; every domain needs an integer number of examples in [1, 2^62]"
                )
        self.sizes = np.asarray([int(s) for s in sizes_list], dtype=np.int64)
        self.num_domains = int(self.sizes.shape[0])
        for key, value in (("batch_size", batch_size), ("world_size", world_size), ("history", history)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or value < (0 if key == "history" else 1)
            ):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        memory = _physical_memory()
        if memory is not None and batch_size * _BATCH_BYTES_PER_EXAMPLE > memory:
            raise ValueError(
                f"batch_size {batch_size} is too large for this machine: drawing one batch needs about "
                f"{batch_size * _BATCH_BYTES_PER_EXAMPLE / 2**30:.0f} GiB for its index arrays alone, and it has "
                f"{memory / 2**30:.0f} GiB of memory"
            )
        if mode not in ("quota", "multinomial"):
            raise ValueError(f"mode must be 'quota' or 'multinomial', got {mode!r}")
        if max_repeats is not None and (
            isinstance(max_repeats, bool) or not isinstance(max_repeats, (int, np.integer)) or max_repeats < 1
        ):
            raise ValueError(f"max_repeats must be a positive integer or None, got {max_repeats!r}")
        shuffle_arr = (
            np.broadcast_to(np.asarray(shuffle, dtype=bool), (self.num_domains,)).copy()
            if np.ndim(shuffle) == 0
            else np.asarray(list(cast(Sequence[bool], shuffle)), dtype=bool)
        )
        if shuffle_arr.shape != (self.num_domains,):
            raise ValueError(f"shuffle has {shuffle_arr.size} entries but there are {self.num_domains} domains")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mode = mode
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_repeats = None if max_repeats is None else int(max_repeats)
        self.history = int(history)
        self.shuffle = shuffle_arr

        # per-domain constants of the bijection (computed once: Python ints, exact for any size)
        self._half = np.asarray([half_bits(int(n)) for n in self.sizes], dtype=np.uint64)
        self._domain_keys = mix64(
            mix64(
                np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF)
                ^ np.arange(self.num_domains, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            )
        )
        self._limit = None if self.max_repeats is None else self.sizes * self.max_repeats

        self._weights = self._check(weights if weights is not None else np.ones(self.num_domains))
        self._pending: deque[np.ndarray] = deque()  # weights owed to batches replayed after a resume
        self._drawn = np.zeros(self.num_domains, dtype=np.int64)  # examples drawn per domain, all passes
        self._residual = np.zeros(self.num_domains, dtype=np.float64)  # target minus drawn (quota mode)
        self._exhausted = np.zeros(self.num_domains, dtype=bool)
        self._last_sampled = self._weights.copy()
        self._batch_index = 0
        self._events: list[SamplerEvent] = []
        self._log: deque[_Snapshot] = deque(maxlen=max(self.history, 1))

    # -- weights ------------------------------------------------------------------------------------------------
    def _check(self, weights: Any) -> np.ndarray:
        # weights by name need names the caller gave (not the "0", "1", ... stand-ins)
        by_name = isinstance(weights, Mapping) and not self._named
        return validate_weights(weights, self.num_domains, names=None if by_name else self.domain_names)

    def set_weights(self, weights: Sequence[float] | np.ndarray | Mapping[str, float]) -> None:
        """Use these weights from the next batch this sampler produces (a vector, or ``{domain name: weight}``)."""
        self._weights = self._check(weights)

    @property
    def weights(self) -> np.ndarray:
        """The requested weights (what the next fresh batch will be drawn from, before exhaustion)."""
        return self._weights.copy()

    @property
    def sampled_weights(self) -> np.ndarray:
        """The weights the last produced batch was drawn from: requested weights with exhausted domains' mass
        moved to the others. This is what a metrics log should show as "the mix"."""
        return self._last_sampled.copy()

    def sampled_weights_at(self, batch_index: int) -> np.ndarray:
        """The weights global batch ``batch_index`` was drawn from (for logging the *consumed* batch while a
        DataLoader prefetches); falls back to the last produced batch's once it has left the rollback history."""
        for record in reversed(self._log):
            if record.batch_index == batch_index and record.sampled is not None:
                return record.sampled.copy()
        return self._last_sampled.copy()

    @property
    def batch_index(self) -> int:
        """Number of global batches produced so far."""
        return self._batch_index

    @property
    def drawn(self) -> np.ndarray:
        """Examples drawn per domain so far (global batch, all passes)."""
        return self._drawn.copy()

    @property
    def residuals(self) -> np.ndarray:
        """Per domain, the carried rounding residual (target minus drawn) in examples; 0 in multinomial mode."""
        return self._residual.copy()

    @property
    def passes(self) -> np.ndarray:
        """Passes started per domain (1 before any repeat); ``passes - 1`` is the number of repeats."""
        return np.maximum(1, -(-self._drawn // self.sizes))

    @property
    def epochs(self) -> np.ndarray:
        """Fractional passes completed per domain (examples drawn / domain size)."""
        return self._drawn / self.sizes

    @property
    def exhausted(self) -> np.ndarray:
        return self._exhausted.copy()

    @property
    def events(self) -> list[SamplerEvent]:
        return list(self._events)

    # -- sampling -----------------------------------------------------------------------------------------------
    def _tie_keys(self, batch_index: int, salt: int) -> np.ndarray:
        base = np.uint64((batch_index * 0x2545F4914F6CDD1D + salt * 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
        return mix64(self._domain_keys ^ base)

    def _effective(self, requested: np.ndarray, batch_index: int) -> np.ndarray:
        """Requested weights with exhausted domains removed; their mass goes to the others in proportion."""
        if not self._exhausted.any():
            return requested
        live = ~self._exhausted
        if not live.any():
            self._raise_exhausted(batch_index)
        w = np.where(live, requested, 0.0)
        if w.sum() <= 0:  # all requested mass sat on exhausted domains: spread it over the live ones
            w = live.astype(np.float64)
        return w / w.sum()

    def _raise_exhausted(self, batch_index: int) -> None:
        names = [self.domain_names[i] for i in np.flatnonzero(self._exhausted)]
        raise DataExhaustedError(
            f"batch {batch_index}: every domain has used its max_repeats={self.max_repeats} passes "
            f"(exhausted: {names}); raise max_repeats or stop the run earlier"
        )

    def _hand_over(self, weights: np.ndarray) -> None:
        """Give the residual of weight-0 domains to the others in proportion to their weights (keeps sum = 0)."""
        off = (weights <= 0) & (self._residual != 0)
        if off.any():
            self._residual += weights * self._residual[off].sum()
            self._residual[off] = 0.0

    def _quota_counts(self, weights: np.ndarray, batch_index: int) -> np.ndarray:
        self._hand_over(weights)
        expected = self._residual + self.batch_size * weights
        counts = deficit_round(expected, self.batch_size, self.batch_size * weights, self._tie_keys(batch_index, 0))
        self._residual = expected - counts
        return counts

    def _cap(self, counts: np.ndarray, weights: np.ndarray, batch_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Apply ``max_repeats``: cut counts at each domain's remaining examples, mark exhausted domains and refill
        the shortfall from the others (quota: by their residuals; multinomial: by a draw). Returns (counts,
        sampled weights)."""
        assert self._limit is not None  # only called when max_repeats is set
        salt = 1
        while True:
            room = self._limit - self._drawn
            over = np.maximum(counts - room, 0)
            newly = (counts >= room) & ~self._exhausted & (counts > 0)
            if newly.any():
                for domain in np.flatnonzero(newly):
                    self._exhausted[domain] = True
                    self._events.append(
                        SamplerEvent(
                            batch_index,
                            int(domain),
                            "exhausted",
                            f"domain {self.domain_names[domain]!r} used its max_repeats={self.max_repeats} passes at "
                            f"batch {batch_index}; its weight is moved to the other domains",
                        )
                    )
            shortfall = int(over.sum())
            if not shortfall:
                return counts, weights
            counts = counts - over
            if self.mode == "quota":
                self._residual += over  # those examples are still owed ...
            live = ~self._exhausted
            if not live.any():
                self._raise_exhausted(batch_index)
            weights = np.where(live, weights, 0.0)
            weights = weights / weights.sum() if weights.sum() > 0 else live / live.sum()
            if self.mode == "quota":  # ... by the live domains, which take over the exhausted residuals
                self._hand_over(weights)
                extra = deficit_round(
                    np.where(live, self._residual, 0.0),
                    shortfall,
                    shortfall * weights,
                    self._tie_keys(batch_index, salt),
                )
                self._residual -= extra
            else:
                extra = np.random.default_rng([self.seed, 7919, batch_index, salt]).multinomial(shortfall, weights)
            counts = counts + extra
            salt += 1

    def next_global_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Produce the next GLOBAL batch as (domain ids, example ids), sorted by domain. Advances the state."""
        from_pending = bool(self._pending)
        requested = self._pending[0] if from_pending else self._weights
        batch_index = self._batch_index
        snapshot = _Snapshot(
            batch_index, requested, self._drawn.copy(), self._residual.copy(), self._exhausted.copy(), len(self._events)
        )
        try:
            weights = self._effective(requested, batch_index)
            if self.mode == "quota":
                counts = self._quota_counts(weights, batch_index)
            else:
                counts = np.random.default_rng([self.seed, 7919, batch_index]).multinomial(self.batch_size, weights)
            if self._limit is not None:
                counts, weights = self._cap(counts, weights, batch_index)
        except DataExhaustedError:
            self._restore(snapshot)
            raise
        if from_pending:
            self._pending.popleft()

        domains = np.repeat(np.arange(self.num_domains, dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        draw = np.arange(self.batch_size, dtype=np.int64) - np.repeat(starts, counts) + self._drawn[domains]
        self._drawn += counts
        examples = self._order(domains, draw)

        self._last_sampled = weights
        if self.history > 0:
            snapshot.sampled = weights
            self._log.append(snapshot)
        self._batch_index += 1
        return domains, examples

    def _order(self, domains: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Example ids for the draw numbers (pass = draw // N, position = draw % N) via each pass's bijection."""
        sizes = self.sizes[domains]
        passes, positions = np.divmod(draw, sizes)
        shuffled = self.shuffle[domains]
        if not shuffled.any():
            return positions
        keys = mix64(self._domain_keys[domains] ^ (passes.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)))
        if shuffled.all():
            return feistel_permute(positions, sizes, self._half[domains], keys)
        out = positions.copy()
        out[shuffled] = feistel_permute(
            positions[shuffled], sizes[shuffled], self._half[domains][shuffled], keys[shuffled]
        )
        return out

    def _restore(self, snap: _Snapshot) -> None:
        self._drawn, self._residual, self._exhausted = snap.drawn.copy(), snap.residual.copy(), snap.exhausted.copy()
        del self._events[snap.num_events :]

    def next_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the next global batch as (domain ids, example ids)."""
        domains, examples = self.next_global_arrays()
        if self.world_size > 1:
            domains, examples = domains[self.rank :: self.world_size], examples[self.rank :: self.world_size]
        return domains, examples

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Batches until every domain is exhausted (forever without ``max_repeats``)."""
        while True:
            try:
                domains, examples = self.next_arrays()
            except DataExhaustedError:
                return
            yield list(zip(domains.tolist(), examples.tolist()))

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
        drawn, residual, exhausted = self._drawn, self._residual, self._exhausted
        num_events = len(self._events)
        pending = [w.copy() for w in self._pending]
        if batch_index is not None and batch_index != self._batch_index:
            if not 0 <= batch_index < self._batch_index:
                raise ValueError(f"cannot checkpoint at batch {batch_index}: sampler has produced {self._batch_index}")
            records = [r for r in self._log if r.batch_index >= batch_index]
            if not records or records[0].batch_index != batch_index:
                raise ValueError(
                    f"cannot roll back to batch {batch_index}: only the last {len(self._log)} batches are kept "
                    f"(history={self.history}); raise history above the DataLoader's prefetch depth"
                )
            first = records[0]
            drawn, residual, exhausted, num_events = first.drawn, first.residual, first.exhausted, first.num_events
            pending = [r.weights.copy() for r in records] + pending  # rolled-back batches replay their weights
        else:
            batch_index = self._batch_index
        return {
            "format": STATE_FORMAT,
            "sizes": self.sizes.tolist(),
            "domain_names": list(self.domain_names),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "mode": self.mode,
            "max_repeats": self.max_repeats,
            "shuffle": self.shuffle.tolist(),
            "world_size": self.world_size,
            "batch_index": int(batch_index),
            "weights": self._weights.tolist(),
            "pending_weights": [np.asarray(w).tolist() for w in pending],
            "drawn": np.asarray(drawn).tolist(),
            "residual": np.asarray(residual).tolist(),
            "exhausted": np.asarray(exhausted).tolist(),
            "sampled_weights": self.sampled_weights_at(batch_index - 1).tolist() if batch_index else None,
            "events": [e.to_dict() for e in self._events[:num_events]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; refuses one from a run with other domains, sizes, seed or batch geometry. All-or-nothing:
        a refused state leaves this sampler unchanged."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            hint = (
                " (written by gradmix < 0.2, whose sampler drew other examples; it cannot be resumed exactly)"
                if found == "gradmix.MixtureSampler/1"
                else ""
            )
            raise ValueError(f"not a {STATE_FORMAT} state (format={found!r}){hint}")
        if list(state["domain_names"]) != self.domain_names:
            theirs, ours = list(state["domain_names"]), self.domain_names
            missing = [d for d in theirs if d not in ours]
            extra = [d for d in ours if d not in theirs]
            raise ValueError(
                "checkpoint is from a run with other domains: "
                f"checkpoint has {theirs}, this sampler has {ours} (missing here: {missing}, new here: {extra})"
            )
        for key, mine in (
            ("sizes", self.sizes.tolist()),
            ("batch_size", self.batch_size),
            ("seed", self.seed),
            ("mode", self.mode),
            ("max_repeats", self.max_repeats),
            ("shuffle", self.shuffle.tolist()),
        ):
            if state[key] != mine:
                raise ValueError(f"checkpoint has {key}={state[key]!r} but this sampler has {key}={mine!r}")
        weights = self._check(state["weights"])
        pending = deque(self._check(w) for w in state["pending_weights"])
        k = self.num_domains
        drawn = np.asarray(state["drawn"], dtype=np.int64)
        residual = np.asarray(state["residual"], dtype=np.float64)
        exhausted = np.asarray(state["exhausted"], dtype=bool)
        for key, arr in (("drawn", drawn), ("residual", residual), ("exhausted", exhausted)):
            if arr.shape != (k,):
                raise ValueError(f"sampler state field {key!r} has shape {arr.shape}, expected ({k},)")
        if (drawn < 0).any() or not np.isfinite(residual).all():
            raise ValueError("sampler state has negative draw counts or non-finite residuals")
        events = [SamplerEvent(**e) for e in state["events"]]
        sampled = state.get("sampled_weights")
        last_sampled = self._check(sampled) if sampled is not None else weights.copy()
        self._weights, self._pending = weights, pending
        self._drawn, self._residual, self._exhausted = drawn, residual, exhausted
        self._batch_index = int(state["batch_index"])
        self._events = events
        self._last_sampled = last_sampled
        self._log.clear()
