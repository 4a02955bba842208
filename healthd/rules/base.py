"""The shape of a rule: a pure function of a window of one job's data.

A rule reads a window (``RankWindow`` for rules about one rank's series,
``JobWindow`` for rules that compare ranks or watch time) and returns a
``Finding`` or ``None``. It does no I/O, raises nothing as a signal and mutates
nothing. Alert state (pending -> firing -> resolved) lives in the engine only.

To add a rule: subclass ``Rule``, give it a ``Config`` (a ``RuleConfig``
subclass with typed, unit-named thresholds), a docstring that says what it
detects, why it matters, its source and its thresholds, an ``advice`` string
(shown in the alert), and list it in ``healthd.rules.ALL_RULES``. A rank rule that only
looks at fields the client samples every N steps (activations, inputs) names them in ``reads``.
"""

from __future__ import annotations

import enum
import itertools
import math
import operator
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from healthd.records import StepRecord
from healthd.schema import AttachReport, EvalReport, GpuReport, HeartbeatReport, Severity

EvidenceValue = float | int | str | bool | None


class Scope(str, enum.Enum):
    """What a rule looks at, and so when the engine evaluates it."""

    RANK = "rank"  # one rank's series; evaluated when that rank reports a step
    JOB = "job"  # all ranks and the clock; evaluated on the engine's tick


@dataclass(frozen=True)
class Finding:
    """What a rule saw. The engine turns findings into alerts."""

    summary: str
    evidence: Mapping[str, EvidenceValue]
    step: int | None = None
    rank: int | None = None
    layer: str | None = None
    severity: Severity | None = None  # None: the rule's default severity


class RuleConfig(BaseModel):
    """Settings every rule has. Subclasses add thresholds with units in their names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    for_steps: int = Field(
        default=1, ge=1, description="steps in a row with a finding before firing (job rules: ticks)"
    )
    resolve_after_steps: int = Field(
        default=20, ge=1, description="steps in a row without a finding before resolving (cool-down; job rules: ticks)"
    )
    severity: Severity | None = Field(default=None, description="override the rule's default severity")


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


# Scalar step fields the store also keeps as one series each (``RankWindow.column``): rules read
# these tails many times per evaluation, and a deque of floats slices far faster than getattr
# over hundreds of reports. "lr" is parameter group 0's learning rate.
COLUMNS: tuple[str, ...] = ("step", "loss", "grad_norm", "grad_norm_local", "update_ratio", "step_seconds",
                            "comm_seconds", "batch_size", "loss_scale", "lr", "param_fingerprint")


def column_value(step: StepRecord, attr: str) -> float | None:
    """One step's value of a column (``COLUMNS``)."""
    if attr == "lr":
        return step.lr[0] if step.lr else None
    return getattr(step, attr)  # type: ignore[no-any-return]


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


@dataclass(frozen=True)
class JobWindow:
    """A read-only view of a whole job for cross-rank and time-based rules."""

    job: str
    meta: JobMeta
    now: float
    ranks: Mapping[int, RankStatus] = field(default_factory=dict)
    global_batch_size: int | None = None  # per-rank batch x world size x grad accumulation (examples)
    noise_scale: float | None = None  # gradient noise scale B_simple (examples), DDP only
    # Rule name -> rank -> Rule.rank_summary, computed once per window (summaries, summarize_slices).
    _summaries: dict[str, dict[int, Any]] = field(default_factory=dict, compare=False, repr=False)

    def summaries(self, rule: Rule[Any]) -> dict[int, Any]:
        """``rule.rank_summary`` of every rank of the job (computed here unless the caller already
        computed them a slice at a time with ``summarize_slices``)."""
        got = self._summaries.get(rule.name)
        if got is None:
            for _ in self.summarize_slices(rule, max(1, len(self.ranks))):
                pass
            got = self._summaries[rule.name]
        return got

    def summarize_slices(self, rule: Rule[Any], ranks_per_slice: int) -> Iterator[None]:
        """Compute ``summaries(rule)``, pausing every ``ranks_per_slice`` ranks: at thousands of ranks a
        job rule's per-rank work is the longest thing the server's ticker does at once."""
        out: dict[int, Any] = {}
        summary = rule.rank_summary
        for i, (rank, st) in enumerate(self.ranks.items()):
            if i and i % ranks_per_slice == 0:
                yield
            out[rank] = summary(st)
        self._summaries[rule.name] = out


W = TypeVar("W", RankWindow, JobWindow)
C = TypeVar("C", bound=RuleConfig)


class Rule(Generic[C]):
    """Base of all rules. Subclasses set the class variables and ``evaluate``."""

    name: ClassVar[str]  # the Alertmanager alertname; fixed, users route on it
    severity: ClassVar[Severity] = Severity.WARNING
    scope: ClassVar[Scope] = Scope.RANK
    advice: ClassVar[str] = ""
    Config: ClassVar[type[RuleConfig]] = RuleConfig
    # Rank rules over sampled fields only: the StepReport fields whose arrival can change the answer.
    # The engine skips the rule for an evaluation whose new steps carry none of them (no hit, no
    # miss), unless the rule has an alert open on that rank. Empty: evaluated every time.
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.Config()  # type: ignore[assignment]

    def evaluate(self, window: RankWindow | JobWindow) -> Finding | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # A job rule whose work is mostly per rank puts that part here (a pure function of one rank) and
    # reads the results with ``window.summaries(self)``: the server then computes them in slices of
    # ranks, serving requests in between, instead of in one long evaluation.
    summarized: ClassVar[bool] = False

    def rank_summary(self, st: RankStatus) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------- small helpers for rules


def finite(values: Sequence[float | None]) -> list[float]:
    """The finite, present values of a series."""
    try:
        if math.isfinite(sum(values)):  # type: ignore[arg-type]
            return list(values)  # type: ignore[arg-type]  # the common case, at C speed: nothing to drop
    except TypeError:
        pass  # a None in the series
    return [v for v in values if v is not None and math.isfinite(v)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def series(steps: Sequence[StepRecord], attr: str) -> list[float | None]:
    """One field of a run of steps, e.g. ``series(w.steps, "grad_norm")``."""
    return [getattr(s, attr) for s in steps]


def numerically_sound(step: StepRecord) -> bool:
    """False when NaN/Inf already reached this step's loss or tensors: its other statistics
    (activations, ratios) describe the poisoning, which NonFiniteValues reports, not a new fault."""
    nf = step.nonfinite
    if nf.loss or nf.grads or nf.params:
        return False
    return step.loss is None or math.isfinite(step.loss)


def worst_activation_layer(window: RankWindow, *, kinds: tuple[str, ...], attr: str, threshold: float,
                           lookback_steps: int, samples: int) -> tuple[str, float, Sequence[StepRecord]] | None:
    """The activation layer of one of ``kinds`` whose ``attr`` (dead/saturated fraction) stayed above
    ``threshold`` in each of the latest ``samples`` sound samples: (layer, its lowest fraction, samples)."""
    sampled = window.latest_where(lambda s: s.activations and numerically_sound(s), samples, lookback_steps)
    if not sampled:
        return None
    worst: tuple[str, float] | None = None
    for name, a in sampled[-1].activations.items():
        if a.kind not in kinds or getattr(a, attr) is None:
            continue
        fractions = [getattr(s.activations[name], attr) for s in sampled if name in s.activations]
        lowest = min(f for f in fractions if f is not None)
        if lowest > threshold and (worst is None or lowest > worst[1]):
            worst = (name, lowest)
    return None if worst is None else (worst[0], worst[1], sampled)


def layer_values(step: StepRecord, attr: str) -> dict[str, float]:
    """A per-layer field of one step, finite values only (e.g. ``layer_values(s, "grad_norm")``)."""
    out = {}
    for name, ls in step.layers.items():
        v = getattr(ls, attr)
        if v is not None and math.isfinite(v):
            out[name] = v
    return out


def fmt(x: float | None) -> str:
    """Compact number for alert summaries."""
    if x is None:
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"
