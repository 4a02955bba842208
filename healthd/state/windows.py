"""The windows rules read: read-only views of one rank's or one job's recent data.

The store builds them (``healthd.state.store``); rules read them (``healthd.rules``). They live in
the state layer so that the store never imports a rule: data flows store -> window -> rule.

A window's columns (``COLUMNS``) are the store's per-field series; ``column(attr, n)`` is the one way
to read "the last n steps of a field": ``present`` drops missing values, ``values`` missing and
non-finite ones, ``initial_values`` reads the run's first steps the same way. Rules use these
instead of slicing ``steps`` and picking fields themselves.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, cast

from healthd.wire.records import StepRecord
from healthd.wire.schema import AttachReport, EvalReport, GpuReport, HeartbeatReport


class RankSummarizer(Protocol):
    """What a window needs of a job rule that summarizes each rank (``healthd.rules.base.Rule``)."""

    @property
    def name(self) -> str: ...

    def rank_summary(self, st: RankStatus) -> Any: ...


@dataclass(frozen=True)
class JobMeta:
    """What the job told healthd at attach (rank 0's AttachReport when present)."""

    attach: AttachReport | None = None

    @property
    def world_size(self) -> int:
        return self.attach.world_size if self.attach else 1

    @property
    def num_classes(self) -> int | None:
        return self.attach.hints.num_classes if self.attach else None

    @property
    def dataset_size(self) -> int | None:
        return self.attach.hints.dataset_size if self.attach else None

    @property
    def grad_accumulation_steps(self) -> int:
        return self.attach.hints.grad_accumulation_steps if self.attach else 1

    @property
    def fine_tune(self) -> bool:
        return self.attach.hints.fine_tune if self.attach else False

    @property
    def loss_minimized(self) -> bool:
        """Whether the stream's loss is one training drives down (``Hints.loss_kind``): a GAN player's
        adversarial loss is not, and the loss-shape rules leave it alone."""
        return self.attach.hints.loss_kind == "minimized" if self.attach else True


# Scalar step fields the store also keeps as one series each (``RankWindow.column``): rules read
# these tails many times per evaluation, and a deque of floats slices far faster than getattr
# over hundreds of reports. "lr" is parameter group 0's learning rate.
COLUMNS: tuple[str, ...] = ("step", "loss", "grad_norm", "grad_norm_local", "update_ratio", "step_seconds",
                            "comm_seconds", "batch_size", "loss_scale", "lr", "param_fingerprint")


def column_value(step: StepRecord, attr: str) -> float | None:
    """One step's value of a column (``COLUMNS``)."""
    if attr == "lr":
        return step.lr[0] if step.lr else None
    value: float | None = getattr(step, attr)
    return value


_LR_AT = COLUMNS.index("lr")
_OTHER_COLUMNS = operator.attrgetter(*(c for c in COLUMNS if c != "lr"))


def columns_of(steps: Sequence[StepRecord]) -> list[Sequence[float | None]]:
    """The steps' values of each column, in ``COLUMNS`` order: ``column_value`` of every step for
    each column. The store calls it for every request: all but ``lr`` are read at C speed, with no
    Python call per step."""
    if not steps:
        return [() for _ in COLUMNS]
    by_column: list[Sequence[float | None]] = list(zip(*map(_OTHER_COLUMNS, steps), strict=True))
    by_column.insert(_LR_AT, [s.lr[0] if s.lr else None for s in steps])
    return by_column


def _tail(steps: Sequence[StepRecord], columns: Mapping[str, Sequence[float | None]], attr: str,
          n: int | None) -> list[float | None]:
    col = columns.get(attr)
    if col is None:  # a window built by hand (tests), or a field the store does not keep as a column
        tail = list(steps) if n is None else list(steps)[max(0, len(steps) - n):]
        return [column_value(s, attr) for s in tail]
    if n is None or n >= len(col):
        return list(col)
    if isinstance(col, list):
        return col[-n:] if n > 0 else []
    return list(itertools.islice(col, len(col) - n, None))


class _ColumnReader:
    """``column``/``values`` over a rank's ``steps`` and the store's ``columns`` (RankWindow, RankStatus)."""

    steps: Sequence[StepRecord]
    columns: Mapping[str, Sequence[float | None]]

    def column(self, attr: str, n: int | None = None) -> list[float | None]:
        """One scalar field over the last ``n`` steps (all kept steps when None), oldest first."""
        return _tail(self.steps, self.columns, attr, n)

    def present(self, attr: str, n: int | None = None) -> list[float]:
        """The values of ``column(attr, n)`` that are not None (non-finite ones kept)."""
        return [v for v in self.column(attr, n) if v is not None]

    def values(self, attr: str, n: int | None = None) -> list[float]:
        """The finite values of ``column(attr, n)``."""
        return finite(self.column(attr, n))


@dataclass(frozen=True)
class RankWindow(_ColumnReader):
    """A read-only view of one rank's recent data, oldest first."""

    job: str
    rank: int
    meta: JobMeta
    steps: Sequence[StepRecord]
    stream: str | None = None  # the named stream (attach(stream=...)); None: the job's unnamed stream
    evals: Sequence[EvalReport] = ()
    initial_steps: Sequence[StepRecord] = ()  # the first steps the rank ever reported
    gpu: Sequence[GpuReport] = ()
    lr_peak: float | None = None  # highest learning rate (group 0) seen so far in the run
    global_batch_size: int | None = None  # per-rank batch x world size x grad accumulation (examples)
    noise_scale: float | None = None  # job's gradient noise scale B_simple (examples), DDP only
    # Steps that arrived since this rank was last evaluated (the newest ``new_steps`` of ``steps``).
    # healthd evaluates a rank once per request, so a rule that looks for an event at one step
    # (a NaN, a spike) looks at each of ``new`` rather than at ``latest`` only.
    new_steps: int = 1
    # The store's per-field series, aligned with ``steps`` (see ``COLUMNS``); empty for hand-built windows.
    columns: Mapping[str, Sequence[float | None]] = field(default_factory=dict)

    def initial_values(self, attr: str, n: int | None = None) -> list[float]:
        """The finite values of a field over the first ``n`` steps the rank ever reported (all kept
        initial steps when None), oldest first: the run's starting level, e.g. the initial loss."""
        first = self.initial_steps if n is None else self.initial_steps[:n]
        return finite([column_value(s, attr) for s in first])

    def values_from_step(self, attr: str, n: int, first_step: int) -> list[float]:
        """The finite values of ``column(attr, n)`` at steps numbered ``first_step`` or later."""
        col = self.column(attr, n)
        steps = self.column("step", n)
        if not steps or (steps[0] is not None and steps[0] >= first_step):
            return finite(col)  # the common case: the whole tail is past warm-up
        return finite([v for st, v in zip(steps, col, strict=True) if st is not None and st >= first_step])

    @property
    def latest(self) -> StepRecord | None:
        return self.steps[-1] if self.steps else None

    @property
    def new(self) -> list[StepRecord]:
        """The steps this evaluation is about, oldest first (at least the latest, when there is one)."""
        return self.last(max(1, self.new_steps))

    @cached_property
    def _step_list(self) -> list[StepRecord]:
        # Rules ask for several tails of the same window: copy the deque once per evaluation.
        return list(self.steps)

    def latest_where(self, keep: Callable[[StepRecord], object], count: int, lookback: int) -> list[StepRecord]:
        """The newest ``count`` steps for which ``keep`` is true among the last ``lookback`` steps,
        oldest first: ``[s for s in last(lookback) if keep(s)][-count:]``, scanning from the newest
        (sampled fields arrive every N steps: no need to walk the whole lookback every evaluation)."""
        out: list[StepRecord] = []
        for s in itertools.islice(reversed(self._step_list), lookback):
            if keep(s):
                out.append(s)
                if len(out) == count:
                    break
        out.reverse()
        return out

    def last(self, n: int) -> list[StepRecord]:
        """The last ``n`` steps, oldest first (fewer if the window is shorter)."""
        steps = self._step_list
        return steps[max(0, len(steps) - n):]


@dataclass(frozen=True)
class RankStatus(_ColumnReader):
    """One rank as a job-scoped rule sees it."""

    rank: int
    steps: Sequence[StepRecord]
    last_step: int | None
    last_step_time: float | None  # server receive time of the last step report
    last_heartbeat: HeartbeatReport | None
    last_heartbeat_time: float | None
    gpu: Sequence[GpuReport] = ()
    closed: bool = False
    columns: Mapping[str, Sequence[float | None]] = field(default_factory=dict)  # as RankWindow.columns
    # Sharded models (FSDP2, HSDP): which shard the rank holds (StepRecord.shard.index); ranks holding
    # different shards hold different parameters. None for replicated models.
    shard_index: int | None = None


@dataclass(frozen=True)
class JobWindow:
    """A read-only view of a whole job for cross-rank and time-based rules."""

    job: str
    meta: JobMeta
    now: float
    stream: str | None = None  # the ranks are this stream's (attach(stream=...)); None: the unnamed stream
    ranks: Mapping[int, RankStatus] = field(default_factory=dict)
    global_batch_size: int | None = None  # per-rank batch x world size x grad accumulation (examples)
    noise_scale: float | None = None  # gradient noise scale B_simple (examples), DDP only
    # The job's last word: every rank sent its closing heartbeat, or the job is about to expire. Rules
    # that skip closed ranks while a job runs (their series stop mid-run and would be compared with live
    # ones) judge every rank in a final window, so a job that ends is still judged (``judges``).
    final: bool = False
    # Rule name -> rank -> Rule.rank_summary, computed once per window (summaries, summarize_slices).
    _summaries: dict[str, dict[int, Any]] = field(default_factory=dict, compare=False, repr=False)

    def judges(self, st: RankStatus) -> bool:
        """Whether a rule comparing ranks' series judges this rank: a live one, or any in a final window."""
        return self.final or not st.closed

    def summaries(self, rule: RankSummarizer) -> dict[int, Any]:
        """``rule.rank_summary`` of every rank of the job (computed here unless the caller already
        computed them a slice at a time with ``summarize_slices``)."""
        got = self._summaries.get(rule.name)
        if got is None:
            for _ in self.summarize_slices(rule, max(1, len(self.ranks))):
                pass
            got = self._summaries[rule.name]
        return got

    def summarize_slices(self, rule: RankSummarizer, ranks_per_slice: int) -> Iterator[None]:
        """Compute ``summaries(rule)``, pausing every ``ranks_per_slice`` ranks: at thousands of ranks a
        job rule's per-rank work is the longest thing the server's ticker does at once."""
        out: dict[int, Any] = {}
        summary = rule.rank_summary
        for i, (rank, st) in enumerate(self.ranks.items()):
            if i and i % ranks_per_slice == 0:
                yield
            out[rank] = summary(st)
        self._summaries[rule.name] = out



def finite(values: Sequence[float | None]) -> list[float]:
    """The finite, present values of a series."""
    try:
        # The common case, at C speed: nothing to drop. A None makes sum() raise TypeError, so when it
        # returns, every value is a number (the cast says what the check proved).
        numbers = cast(Sequence[float], values)
        if math.isfinite(sum(numbers)):
            return list(numbers)
    except TypeError:
        pass  # a None in the series
    return [v for v in values if v is not None and math.isfinite(v)]


