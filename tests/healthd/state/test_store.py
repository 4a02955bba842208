"""The store's per-rank windows: columns stay aligned with the steps they come from."""

from __future__ import annotations

import math

from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.state.windows import COLUMNS, column_value
from healthd.wire.schema import StepReport
from tests.healthd.factories import window


def _step(i: int) -> StepReport:
    # Fields come and go (measured every N steps), and some are not finite: the columns keep every position.
    return StepReport(job="j", rank=0, time=float(i), step=i, loss=math.nan if i == 30 else 1.0 / (1 + i),
                      grad_norm=float(i) if i % 3 == 0 else None, lr=[1e-3 * i] if i % 2 else [],
                      batch_size=32, update_ratio=1e-3 if i % 10 == 0 else None)


def test_columns_match_the_steps_past_the_window_length() -> None:
    store = Store(StoreSettings(window_steps=32, detail_steps=16))
    for i in range(40):
        store.apply(_step(i), float(i))
    w = store.rank_window("j", 0, new_steps=3)
    assert [s.step for s in w.steps] == list(range(24, 40))
    assert w.column("step", 32) == list(range(8, 40))  # the window keeps scalars past the whole reports
    assert w.column("step")[-32:] == list(range(8, 40)) and len(w.column("step")) <= 40  # trimmed in chunks
    for attr in COLUMNS:
        expected = [column_value(s, attr) for s in w.steps]
        got = w.column(attr, len(w.steps))
        assert len(got) == len(expected) and all(
            a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
            for a, b in zip(got, expected, strict=True)), attr
        assert w.column(attr, 5) == got[-5:] or attr == "loss"
        assert w.column(attr, 100)[-16:] == got or attr == "loss"
        assert w.column(attr, 0) == []
    assert w.values("loss") == [v for v in w.column("loss") if v is not None and math.isfinite(v)]
    assert len(w.values("loss", 32)) == 31  # step 30's NaN is not a value
    assert [s.step for s in w.new] == [37, 38, 39]


def test_hand_built_window_has_the_same_columns() -> None:
    steps = [_step(i) for i in range(10)]
    assert window(steps).column("grad_norm", 4) == [6.0, None, None, 9.0]
    assert window(steps).column("lr", 2) == [None, 1e-3 * 9]
    assert window(steps).values("grad_norm") == [0.0, 3.0, 6.0, 9.0]
    job = Store(StoreSettings())
    for s in steps:
        job.apply(s, 0.0)
    assert job.job_window("j", 1.0).ranks[0].values("grad_norm", 4) == [6.0, 9.0]


def test_window_extremes_match_brute_force_within_one_bucket() -> None:
    import random

    from healthd.state.store import WindowExtremes

    rng = random.Random(1)
    w = WindowExtremes(60.0)
    pushed: list[tuple[float, float]] = []
    t = now = 1000.0
    for _ in range(3000):
        t += rng.expovariate(20.0)
        v = rng.gauss(0, 1) * (50 if rng.random() < 0.01 else 1)
        w.push_range(t, v, v)
        pushed.append((t, v))
        if rng.random() < 0.05:
            now = max(now, t + rng.random() * 5)  # reads come in time order (scrapes)
            hi, lo = w.max(now), w.min(now)
            exact = [v for ts, v in pushed if ts >= now - 60.0]
            loose = [v for ts, v in pushed if ts >= now - 60.0 - 60.0 / 32]  # the far edge is bucket-aligned
            assert hi is not None and lo is not None
            assert max(exact) <= hi <= max(loose) and min(loose) <= lo <= min(exact)
    assert w.max(t + 61.0 + 60.0 / 32) is None  # everything aged out
    store = Store(StoreSettings())
    store.apply(StepReport(job="j", time=1.0, step=1, loss=math.inf, grad_norm=None, update_ratio=math.nan), t)
    extremes = store.jobs["j"].ranks[0].extremes
    assert [extremes[k].max(t) for k in ("loss", "grad_norm", "update_ratio")] == [None] * 3  # never counted


def test_reading_window_extremes_changes_nothing() -> None:
    import pickle

    from healthd.state.store import WindowExtremes

    w = WindowExtremes(60.0)
    for t in range(1000, 1100, 5):
        w.push_range(float(t), float(t), -float(t))
    before = pickle.dumps(w)
    assert (w.max(1095.0), w.min(1095.0)) == (1095.0, -1095.0)
    assert w.max(1200.0) is None and w.min(1200.0) is None  # aged out of the window at a later read...
    assert pickle.dumps(w) == before  # ...yet a read drops nothing (a scrape never mutates)
    assert w.max(1095.0) == 1095.0


def test_columns_of_is_column_value_of_every_step_for_every_column() -> None:
    from healthd.state.windows import COLUMNS, column_value, columns_of
    from healthd.wire.schema import StepReport

    steps = [StepReport(job="j", time=1.0, step=3),
             StepReport(job="j", time=1.0, step=4, loss=2.0, lr=[0.1, 0.2], grad_norm=1.5, batch_size=8,
                        step_seconds=0.2, comm_seconds=0.1, loss_scale=1024.0, param_fingerprint=7.0,
                        grad_norm_local=1.4, update_ratio=1e-3),
             StepReport(job="j", time=2.0, step=5, lr=[0.3], loss=1.0)]
    for run in (steps, steps[:1], []):
        assert [list(c) for c in columns_of(run)] == [[column_value(s, c) for s in run] for c in COLUMNS]


def _state(store: Store) -> str:
    """Everything the store holds, as text (a NaN equals itself in a repr)."""
    out = []
    for job in store:
        out.append(repr((job.name, sorted(job.layer_names), job.layers, job.layers_rank, job.global_batch_size,
                         [getattr(job.noise, k) for k in job.noise.__slots__])))
        for r, st in sorted(job.ranks.items()):
            # Columns are trimmed back to window_steps in chunks: only that much is always there.
            columns = {k: col[-store.settings.window_steps:] for k, col in st.columns.items()}
            out.append(repr((r, list(st.steps), st.initial_steps, columns, st.signal_sums, st.signal_counts,
                             {k: list(e._buckets) for k, e in st.extremes.items()}, st.last_values, st.lr_peak,
                             st.nonfinite_totals, st.steps_total, st.last_step, st.last_step_time)))
    return "\n".join(out)


def test_a_run_of_steps_is_folded_as_its_steps_one_at_a_time() -> None:
    import random

    from healthd.wire.records import to_record
    from healthd.wire.schema import LayerStats, NonFinite

    rng = random.Random(7)
    odd = [None, math.nan, math.inf, -math.inf, 0.0]

    def value() -> float | None:
        return rng.choice(odd) if rng.random() < 0.2 else rng.uniform(-2, 5)

    steps = [to_record(StepReport(
        job="j", rank=rng.choice([0, 0, 1]), time=float(i), step=i, loss=value(), grad_norm=value(),
        grad_norm_local=value(), grad_norm_allreduced=rng.uniform(0, 2), update_ratio=value(),
        step_seconds=rng.choice([None, 0.1, 0.2]), batch_size=rng.choice([None, 8, 16]),
        lr=rng.choice([[], [rng.uniform(0, 1e-2)], [math.nan]]),
        nonfinite=NonFinite(loss=rng.choice([0, 0, 1]), grads=rng.choice([0, 2])),
        layers={f"l{k}": LayerStats(grad_norm=value(), update_ratio=rng.choice([None, 1e-3]))
                for k in range(rng.choice([0, 2, 3]))}))
        for i in range(300)]
    settings = StoreSettings(window_steps=32, detail_steps=16, initial_steps=5)
    one, runs = Store(settings), Store(settings)
    for i, s in enumerate(steps):
        one.apply(s, 100.0 + i // 7)  # several steps share a receive time, as a request's do
    i = 0
    while i < len(steps):  # runs of one rank's consecutive steps, 1 to 12 long, as ingest makes them
        n = 1
        while n < rng.randint(1, 12) and i + n < len(steps) and steps[i + n].rank == steps[i].rank \
                and (i + n) // 7 == i // 7:
            n += 1
        runs.apply_steps(steps[i:i + n], 100.0 + i // 7)
        i += n
    assert _state(runs) == _state(one)
    # And the windowed sums, counts and extremes are those of the finite values, computed here on their own.
    for rank, st in runs.jobs["j"].ranks.items():
        for key in ("loss", "grad_norm", "update_ratio", "step_seconds"):
            finite = [v for s in steps if s.rank == rank and (v := getattr(s, key)) is not None and math.isfinite(v)]
            assert st.signal_counts[key] == len(finite) and st.signal_sums[key] == sum(finite, 0.0), key
            assert (st.extremes[key].max(142.0), st.extremes[key].min(142.0)) == (max(finite), min(finite)), key


def test_window_readers_equal_the_comprehensions_they_replace() -> None:
    """column/present/values/initial_values, on a hand-built window and on the store's, against the
    plain reading of the steps (``healthd.state.windows``: the one way to read the last n steps)."""
    steps = [_step(i) for i in range(40)]
    store = Store(StoreSettings(window_steps=64, detail_steps=64))
    for s in steps:
        store.apply(s, float(s.step))
    for w in (window(steps), store.rank_window("j", 0)):
        for attr in ("loss", "grad_norm", "lr", "batch_size", "update_ratio"):
            for n in (None, 0, 1, 5, 39, 40, 100):
                tail = list(w.steps) if n is None else list(w.steps)[max(0, len(w.steps) - n):]
                plain = [column_value(s, attr) for s in tail]
                assert w.column(attr, n) == plain or attr == "loss"  # NaN != NaN: compared below
                assert w.present(attr, n) == [v for v in plain if v is not None] or attr == "loss"
                assert w.values(attr, n) == [v for v in plain if v is not None and math.isfinite(v)]
                first = w.initial_steps if n is None else w.initial_steps[:n]
                assert w.initial_values(attr, n) == [
                    v for v in (column_value(s, attr) for s in first) if v is not None and math.isfinite(v)]
        assert len(w.present("loss")) == len(w.steps) and len(w.values("loss")) == len(w.steps) - 1  # the NaN
