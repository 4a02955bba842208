"""Sharded models (FSDP2, HSDP): the store combines each step's shard parts across the shard group."""

from __future__ import annotations

import math

import pytest

from healthd.rules.rank_desync import RankDesync
from healthd.settings import StoreSettings
from healthd.state.shards import ShardCombiner
from healthd.state.store import Store
from healthd.wire.records import ShardRecord, StepRecord
from healthd.wire.schema import LayerStats, NonFinite, ShardPart, StepReport


def _step(rank: int, step: int, *, group: int = 0, index: int | None = None, count: int = 2,
          grad_sq: float | None = 1.0, update_sq: float | None = None, weight_sq: float | None = None,
          fingerprint: float | None = None) -> StepReport:
    return StepReport(job="j", rank=rank, time=1.0, step=step, loss=1.0, param_fingerprint=fingerprint,
                      shard=ShardPart(group=group, index=rank if index is None else index, count=count,
                                      grad_sq=grad_sq, update_sq=update_sq, weight_sq=weight_sq))


def test_fsdp_step_waits_for_its_group_then_every_rank_shows_the_global_norm() -> None:
    store = Store(StoreSettings())
    store.apply(_step(0, 0, grad_sq=9.0, update_sq=0.01, weight_sq=1.0), 1.0)
    assert not store.jobs["j"].ranks[0].steps  # rank 1's part of step 0 is missing: nothing applied yet
    store.apply(_step(1, 0, grad_sq=16.0, update_sq=0.03, weight_sq=3.0), 1.0)
    for rank in (0, 1):
        (s,) = store.jobs["j"].ranks[rank].steps
        assert s.grad_norm == pytest.approx(5.0)  # sqrt(9 + 16), not either shard's 3 or 4
        assert s.update_ratio == pytest.approx(math.sqrt(0.04) / math.sqrt(4.0))
        assert store.jobs["j"].ranks[rank].last_values["grad_norm"] == pytest.approx(5.0)


def test_hsdp_adds_over_the_shard_dimension_only() -> None:
    """2 replicas x 2 shards: ranks 0, 1 are replica 0, ranks 2, 3 replica 1, holding equal values."""
    store = Store(StoreSettings())
    for rank in range(4):
        store.apply(_step(rank, 0, group=rank // 2, index=rank % 2, grad_sq=[9.0, 16.0][rank % 2]), 1.0)
    assert [store.jobs["j"].ranks[r].last_values["grad_norm"] for r in range(4)] == pytest.approx([5.0] * 4)


def test_ingest_reports_the_ranks_a_request_completed() -> None:
    store = Store(StoreSettings())
    first = [StepRecord(job="j", rank=0, time=1.0, step=i, shard=ShardRecord(index=0, count=2, grad_sq=1.0))
             for i in range(3)]
    assert store.apply_steps(first, 1.0) == []
    second = [StepRecord(job="j", rank=1, time=1.0, step=i, shard=ShardRecord(index=1, count=2, grad_sq=1.0))
              for i in range(2)]
    assert sorted((r, len(s)) for r, s in store.apply_steps(second, 1.0)) == [(0, 2), (1, 2)]
    assert [s.step for s in store.jobs["j"].ranks[0].steps] == [0, 1]


def test_waiting_steps_are_bounded_and_released_incomplete() -> None:
    combiner = ShardCombiner(max_pending_steps=2)
    out = [r for i in range(3) for r in combiner.add(StepRecord(
        job="j", rank=0, time=1.0, step=i, shard=ShardRecord(index=0, count=2, grad_sq=1.0)))]
    assert [(r.step, r.grad_norm) for r in out] == [(0, None)]  # a partial sum would understate


def test_rank_desync_compares_only_replicas_of_the_same_shard() -> None:
    store = Store(StoreSettings())
    # FSDP: shards differ by design; no finding.
    for rank in range(2):
        store.apply(_step(rank, 0, fingerprint=[1.0, 2.0][rank]), 1.0)
    assert RankDesync().evaluate(store.job_window("j", 2.0)) == []
    # HSDP: rank 3 (replica 1, shard 1) differs from rank 1 (replica 0, shard 1).
    store = Store(StoreSettings())
    for rank, fp in enumerate([1.0, 2.0, 1.0, 2.5]):
        store.apply(_step(rank, 0, group=rank // 2, index=rank % 2, fingerprint=fp), 1.0)
    (finding,) = RankDesync().evaluate(store.job_window("j", 2.0))
    assert finding.rank in (1, 3) and finding.evidence["ranks_compared"] == 2


def test_layer_parts_combine_into_layer_norms_and_ratios() -> None:
    store = Store(StoreSettings())
    for rank, (g, d, w) in enumerate([(9.0, 0.01, 1.0), (16.0, 0.03, 3.0)]):
        store.apply(StepReport(job="j", rank=rank, time=1.0, step=0, shard=ShardPart(index=rank, count=2, grad_sq=g),
                               layers={"fc": LayerStats(grad_sq=g, update_sq=d, weight_sq=w)}), 1.0)
    for rank in (0, 1):
        (s,) = store.jobs["j"].ranks[rank].steps
        assert s.layers["fc"].grad_norm == pytest.approx(5.0)
        assert s.layers["fc"].update_ratio == pytest.approx(0.1)
    assert store.jobs["j"].layers["fc"].grad_norm == pytest.approx(5.0)


def _nonfinite_step(rank: int, *, grads: int, grad_at: list[int] | None, params: int = 0,
                    param_at: list[int] | None = None, group: int = 0, index: int | None = None) -> StepReport:
    return StepReport(job="j", rank=rank, time=1.0, step=0, loss=1.0, nonfinite=NonFinite(grads=grads, params=params),
                      shard=ShardPart(group=group, index=rank if index is None else index, count=2, grad_sq=1.0,
                                      grad_nonfinite=grad_at, param_nonfinite=param_at))


@pytest.mark.parametrize(("parts", "want_grads", "want_params"), [
    # rank 1's shard of tensor 0 is bad, rank 0's is clean: the full gradient has one bad tensor, on both ranks
    ([(0, [], 0, []), (1, [0], 0, [])], 1, 0),
    # tensor 3 is bad in both ranks' shards: one tensor, not two; tensor 5 only on rank 1
    ([(1, [3], 1, [3]), (2, [3, 5], 1, [3])], 2, 1),
    # rank 1 did not list its tensors (too many, or params not measured this step): each keeps its own count
    ([(1, [3], 0, None), (4, None, 0, None)], None, None),
])
def test_non_finite_tensors_are_the_union_over_the_shard_group(
        parts: list[tuple[int, list[int] | None, int, list[int] | None]], want_grads: int | None,
        want_params: int | None) -> None:
    store = Store(StoreSettings())
    for rank, (grads, grad_at, params, param_at) in enumerate(parts):
        store.apply(_nonfinite_step(rank, grads=grads, grad_at=grad_at, params=params, param_at=param_at), 1.0)
    for rank in (0, 1):
        (s,) = store.jobs["j"].ranks[rank].steps
        assert s.nonfinite.grads == (parts[rank][0] if want_grads is None else want_grads)
        assert s.nonfinite.params == (parts[rank][2] if want_params is None else want_params)


def test_hsdp_replicas_count_their_non_finite_tensors_apart() -> None:
    store = Store(StoreSettings())
    for rank, at in enumerate([[0], [1], [], []]):
        store.apply(_nonfinite_step(rank, grads=len(at), grad_at=at, group=rank // 2, index=rank % 2), 1.0)
    assert [store.jobs["j"].ranks[r].steps[0].nonfinite.grads for r in range(4)] == [2, 2, 0, 0]


def test_client_and_wire_bound_the_non_finite_positions_alike() -> None:
    from healthd.wire import schema
    from healthd_client.quantities import sharding
    assert sharding.MAX_NONFINITE_TENSORS == schema.MAX_NONFINITE_TENSORS
