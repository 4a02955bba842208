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
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from healthd.state.windows import JobWindow, RankStatus, RankWindow
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity

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


def poisoned(step: StepRecord) -> bool:
    """True when NaN/Inf reached this step's loss, gradients or parameters, except a step that mixed
    precision skipped for non-finite gradients only (the GradScaler doing its job)."""
    nf = step.nonfinite
    loss_bad = nf.loss > 0 or (step.loss is not None and not math.isfinite(step.loss))
    grads_bad = nf.grads > 0 or (step.grad_norm is not None and not math.isfinite(step.grad_norm))
    if nf.params or loss_bad:
        return True
    return grads_bad and not step.step_skipped


def sound_steps(window: RankWindow, n: int) -> int:
    """How many of the last ``n`` steps came after the last poisoned step (``poisoned``): ``n`` in a
    healthy run. Rules that judge the shape of the loss or gradient series read only these steps, so
    that no window straddles a NaN: its onset is NonFiniteValues' one finding, and a shape rule stays
    silent until the series has been finite again for as long as the rule needs to judge it."""
    for attr in ("loss", "grad_norm"):
        if not math.isfinite(sum(v for v in window.column(attr, n) if v is not None)):
            break
    else:
        return min(n, len(window.steps))  # the common case, one sum per series: nothing non-finite
    tail = window.last(n)
    for i in range(len(tail) - 1, -1, -1):
        if poisoned(tail[i]):
            return len(tail) - 1 - i
    return len(tail)


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
