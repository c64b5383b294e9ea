"""MixtureSampler: counts, no repeats inside a pass, determinism, resume, max_repeats, ranks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradmix import MixtureSampler, WeightError
from gradmix.sampler import largest_remainder_counts

sizes_st = st.lists(st.integers(1, 60), min_size=1, max_size=7)


def weights_for(k: int):
    return st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=k, max_size=k).filter(lambda w: sum(w) > 1e-6)


@st.composite
def sampler_case(draw):
    sizes = draw(sizes_st)
    k = len(sizes)
    batch = draw(st.integers(1, 40))
    history = draw(st.lists(weights_for(k), min_size=1, max_size=12))
    mode = draw(st.sampled_from(["quota", "multinomial"]))
    seed = draw(st.integers(0, 2**31))
    return sizes, batch, history, mode, seed


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampler_case())
def test_counts_sum_quota_rounding_and_no_repeat_within_a_pass(case):
    sizes, batch, history, mode, seed = case
    s = MixtureSampler(sizes, batch, history[0], seed=seed, mode=mode)
    streams: list[list[int]] = [[] for _ in sizes]
    for w in history:
        s.set_weights(w)
        domains, examples = s.next_global_arrays()
        assert len(domains) == batch
        counts = np.bincount(domains, minlength=len(sizes))
        w_norm = np.asarray(w) / np.sum(w)
        if mode == "quota":
            assert np.all(np.abs(counts - batch * w_norm) < 1 + 1e-9)
        assert np.all(counts[w_norm == 0] == 0)
        for d in range(len(sizes)):
            streams[d].extend(examples[domains == d].tolist())
    for d, n in enumerate(sizes):
        stream = streams[d]
        # consecutive chunks of n examples are whole passes: each a permutation of the domain
        for start in range(0, len(stream), n):
            chunk = stream[start:start + n]
            assert len(set(chunk)) == len(chunk), "example repeated inside one pass"
            assert all(0 <= i < n for i in chunk)
            if len(chunk) == n:
                assert sorted(chunk) == list(range(n))
        assert s.passes[d] == max(1, -(-len(stream) // n))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=30).filter(lambda w: sum(w) > 0),
       st.integers(0, 5000))
def test_largest_remainder_is_within_one(weights, total):
    w = np.asarray(weights) / np.sum(weights)
    counts = largest_remainder_counts(w, total)
    assert counts.sum() == total
    assert np.all(np.abs(counts - total * w) < 1 + 1e-9)
    assert np.all(counts >= 0)


def test_full_pass_visits_every_example_once():
    s = MixtureSampler([7, 13], 4, [0.5, 0.5], seed=3)
    got = {0: [], 1: []}
    for _ in range(3):  # 12 draws: 6 per domain < 7
        d, i = s.next_global_arrays()
        for dd, ii in zip(d, i):
            got[int(dd)].append(int(ii))
    assert len(got[0]) == len(set(got[0])) == 6
    assert len(got[1]) == len(set(got[1])) == 6


def test_same_seed_and_weight_history_gives_same_batches_and_different_seed_differs():
    def run(seed):
        s = MixtureSampler([50, 80, 20], 16, seed=seed, mode="multinomial")
        out = []
        for t in range(30):
            s.set_weights([1 + t % 3, 2, 0.5 + t / 10])
            out.append(next(s))
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_state_dict_resume_is_exact_at_any_boundary():
    rng = np.random.default_rng(0)
    weights = rng.random((40, 4)) + 0.01
    ref = MixtureSampler([9, 30, 5, 64], 12, seed=5, max_repeats=None)
    ref_batches = []
    states = []
    for w in weights:
        states.append(ref.state_dict())
        ref.set_weights(w)
        ref_batches.append(next(ref))
    for m in (0, 7, 23, 39):
        s = MixtureSampler([9, 30, 5, 64], 12, seed=5)
        s.load_state_dict(states[m])
        for t in range(m, 40):
            s.set_weights(weights[t])
            assert next(s) == ref_batches[t]


def test_rollback_to_consumed_batch_replays_prefetched_weights():
    """A DataLoader drew batches 10..12 ahead; the loop consumed 10; weights changed after that."""
    s = MixtureSampler([40, 40, 40], 9, seed=1)
    for _ in range(10):
        next(s)
    s.set_weights([1, 0, 0])
    prefetched = [next(s) for _ in range(3)]  # batches 10, 11, 12 made with [1, 0, 0]
    s.set_weights([0, 0, 1])  # the loop's update after consuming batch 10
    state = s.state_dict(batch_index=11)
    later = [next(s) for _ in range(3)]
    r = MixtureSampler([40, 40, 40], 9, seed=1)
    r.load_state_dict(state)
    assert [next(r) for _ in range(5)] == prefetched[1:] + later


def test_max_repeats_moves_weight_and_records_event():
    s = MixtureSampler([3, 100], 4, [0.5, 0.5], max_repeats=1, domain_names=["small", "big"])
    seen_small = []
    for _ in range(5):
        d, i = s.next_global_arrays()
        seen_small += i[d == 0].tolist()
        assert len(d) == 4
    assert sorted(seen_small) == [0, 1, 2]  # never repeated
    assert s.exhausted.tolist() == [True, False]
    assert any(e.kind == "exhausted" and "small" in e.message for e in s.events)


def test_all_domains_exhausted_stops_cleanly():
    s = MixtureSampler([2, 2], 2, max_repeats=1)
    batches = list(s)
    assert sum(len(b) for b in batches) == 4


def test_ranks_get_disjoint_share_of_same_global_batch():
    sizes, bs = [30, 50, 11], 12
    ranks = [MixtureSampler(sizes, bs, seed=4, rank=r, world_size=3) for r in range(3)]
    full = MixtureSampler(sizes, bs, seed=4)
    for t in range(20):
        w = [1 + t % 2, 1, 3]
        for s in ranks + [full]:
            s.set_weights(w)
        shares = [next(s) for s in ranks]
        glob = next(full)
        merged = sorted(p for share in shares for p in share)
        assert merged == sorted(glob)
        assert sum(len(x) for x in shares) == bs and len(set(merged)) == len(merged)


@pytest.mark.parametrize("bad, match", [
    ([0, 0, 0], "all zero"),
    ([1, -1, 1], "negative value -1.0 for domain 'b'"),
    ([1, float("nan"), 1], "non-finite value nan for domain 'b'"),
    ([1, 1], "has 2 entries but there are 3 domains"),
])
def test_bad_weights_name_the_fault(bad, match):
    s = MixtureSampler([5, 5, 5], 4, domain_names=["a", "b", "c"])
    with pytest.raises(WeightError, match=match):
        s.set_weights(bad)


def test_bad_construction():
    with pytest.raises(ValueError, match="domain 'b' has size 0"):
        MixtureSampler([5, 0], 4, domain_names=["a", "b"])
    with pytest.raises(ValueError, match="not divisible by world_size"):
        MixtureSampler([5, 5], 5, world_size=2, rank=1)
    with pytest.raises(ValueError, match="mode"):
        MixtureSampler([5], 2, mode="poisson")


def test_checkpoint_from_other_domains_is_refused():
    a = MixtureSampler([5, 5], 2, domain_names=["en", "de"])
    b = MixtureSampler([5, 5], 2, domain_names=["en", "fr"])
    with pytest.raises(ValueError, match=r"other domains.*missing here: \['de'\].*new here: \['fr'\]"):
        b.load_state_dict(a.state_dict())
