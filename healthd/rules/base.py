"""The shape of a rule: a pure function of a window of one job's data.

A rule reads a window (``RankWindow`` for rules about one rank's series,
``JobWindow`` for rules that compare ranks or watch time) and returns a
``Finding`` or ``None``. It does no I/O, raises nothing as a signal and mutates
nothing. Alert state (pending -> firing -> resolved) lives in the engine only.

To add a rule, subclass ``Rule[W, C]`` with the window it reads and its config, e.g.
``class ExplodingGradients(Rule[RankWindow, ExplodingGradientsConfig])``:

- ``W`` is ``RankWindow`` or ``JobWindow``; it sets the rule's ``scope`` (when the
  engine runs it), so ``evaluate(self, window: RankWindow)`` is typed as what it reads.
- ``C`` is a ``RuleConfig`` subclass with typed, unit-named thresholds, named in
  ``Config``. Fields every rule shares (``for_steps``, ``resolve_after_steps``; the
  ``window_steps`` of ``WindowedConfig``; the ``lookback_steps`` of ``SampledConfig``)
  are declared once here with their validation; a subclass changes only their default
  (``for_steps: ForSteps = 3``) or tightens the bound (``window_steps: int = Field(default=50,
  ge=5)``). A re-declaration with a looser bound is refused when the class is made.
- The docstring says what it detects, why it matters, its public source (title and
  author) and its thresholds; ``advice`` is shown in the alert. List it in
  ``healthd.rules.ALL_RULES``, and in ``healthd.engine.incidents.CONSEQUENCES`` (what it likely
  causes, under what likely causes it).

Performance hints live apart from the detection logic, in ``hints`` (``Hints``): they tell
the engine when it may skip or split work, never what the rule finds. A rule with no hints
is evaluated every time, whole.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeGuard, TypeVar, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from healthd.state.windows import JobWindow, RankStatus, RankWindow
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity

EvidenceValue = float | int | str | bool | None


class Scope(str, enum.Enum):
    """What a rule looks at, and so when the engine evaluates it."""

    RANK = "rank"  # one rank's series; evaluated when that rank reports a step
    JOB = "job"  # all ranks and the clock; evaluated on the engine's tick


_SCOPE_OF_WINDOW: dict[type, Scope] = {RankWindow: Scope.RANK, JobWindow: Scope.JOB}


@dataclass(frozen=True)
class Finding:
    """What a rule saw. The engine turns findings into alerts."""

    summary: str
    evidence: Mapping[str, EvidenceValue]
    step: int | None = None
    rank: int | None = None
    layer: str | None = None
    severity: Severity | None = None  # None: the rule's default severity


# ----------------------------------------------------------------- configs

# The shared fields' types carry their validation, so a subclass that changes a default
# (``for_steps: ForSteps = 3``) keeps it; a plain ``for_steps: int = 3`` would drop the bound
# (pydantic replaces the whole field), which ``RuleConfig`` refuses when the subclass is made. A
# tighter bound is declared on a plain type (``int = Field(default=50, ge=5)``): on the alias,
# pydantic would keep the alias' ge=1 and drop the field's.
ForSteps = Annotated[int, Field(ge=1, description="steps in a row with a finding before firing (job rules: ticks)")]
ResolveAfterSteps = Annotated[int, Field(
    ge=1, description="steps in a row without a finding before resolving (cool-down; job rules: ticks)")]
WindowSteps = Annotated[int, Field(ge=1, description="last steps the rule judges")]
LookbackSteps = Annotated[int, Field(
    ge=1, description="steps searched for sampled values (the client measures them every heavy_every_steps)")]


def _lower_bound(field: FieldInfo) -> float | None:
    """The lower bound pydantic enforces on a field: its last ``ge``/``gt`` (a later one of the same
    kind replaces an earlier one, so ``Annotated[int, Field(ge=1)] = Field(ge=5)`` validates ge=1)."""
    bound: float | None = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            value: Any = m.ge if isinstance(m, annotated_types.Ge) else m.gt  # SupportsGe/SupportsGt: a number here
            bound = float(value)
    return bound


class RuleConfig(BaseModel):
    """Settings every rule has. Subclasses add thresholds with units in their names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="false: the rule is not run at all")
    for_steps: ForSteps = 1
    resolve_after_steps: ResolveAfterSteps = 20
    severity: Severity | None = Field(default=None, description="override the rule's default severity")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a subclass that re-declares an inherited field with a looser lower bound."""
        super().__pydantic_init_subclass__(**kwargs)
        for base in cls.__mro__[1:]:
            if not (isinstance(base, type) and issubclass(base, RuleConfig)):
                continue
            for name, inherited in base.model_fields.items():
                mine, floor = cls.model_fields.get(name), _lower_bound(inherited)
                if mine is None or floor is None:
                    continue
                bound = _lower_bound(mine)
                if bound is None or bound < floor:
                    raise TypeError(f"{cls.__name__}.{name} drops {base.__name__}'s validation "
                                    f"{inherited.metadata}: declare it with the same type (e.g. ForSteps)")


class WindowedConfig(RuleConfig):
    """A rule that judges the last ``window_steps`` steps of a rank (or of each rank)."""

    window_steps: WindowSteps = 50


class SampledConfig(RuleConfig):
    """A rule over sampled fields: it searches the last ``lookback_steps`` steps for samples."""

    lookback_steps: LookbackSteps = 100


# ----------------------------------------------------------------- rules


@dataclass(frozen=True)
class Hints:
    """How the engine may save work on a rule; never part of what the rule finds.

    ``reads``: for a rank rule over sampled fields only, the StepReport fields whose arrival can
    change its answer. The engine skips the rule for an evaluation whose new steps carry none of
    them (no hit, no miss), unless the rule has an alert open on that rank. Empty: evaluated
    every time.

    ``summarized``: a job rule whose work is mostly per rank puts that part in ``rank_summary``
    (a pure function of one rank) and reads the results with ``window.summaries(self)``: the
    server then computes them in slices of ranks, serving requests in between, instead of in
    one long evaluation.
    """

    reads: tuple[str, ...] = ()
    summarized: bool = False


W = TypeVar("W", bound=RankWindow | JobWindow)
C = TypeVar("C", bound=RuleConfig)


class Rule(Generic[W, C]):
    """Base of all rules: ``Rule[window type, config type]``. Subclasses set the class variables,
    ``Config`` and ``evaluate``."""

    name: ClassVar[str]  # the Alertmanager alertname; fixed, users route on it
    severity: ClassVar[Severity] = Severity.WARNING
    scope: ClassVar[Scope] = Scope.RANK  # derived from W when the subclass is made
    advice: ClassVar[str] = ""
    hints: ClassVar[Hints] = Hints()
    # True for a rule whose condition is the job's silence (a stall): its alerts are still sent for a job
    # that stopped reporting to this healthd, whose other alerts lapse (alertmanager.silent_job_seconds).
    fires_on_silence: ClassVar[bool] = False
    # The config class (a class attribute in every subclass; not a ClassVar only because a ClassVar
    # cannot name the type variable C).
    Config: type[C]

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.Config()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive ``scope`` from the window type the subclass declares, and check its hints."""
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is Rule:
                window = get_args(base)[0]
                scope = _SCOPE_OF_WINDOW.get(window)
                if scope is None:
                    raise TypeError(f"{cls.__name__}: Rule's window is RankWindow or JobWindow, not {window!r}")
                if "scope" in cls.__dict__ and cls.__dict__["scope"] is not scope:
                    raise TypeError(f"{cls.__name__}: scope {cls.__dict__['scope']} contradicts its window {window}")
                cls.scope = scope
        if cls.hints.summarized and (cls.scope is not Scope.JOB or cls.rank_summary is Rule.rank_summary):
            raise TypeError(f"{cls.__name__}: Hints(summarized=True) needs a job rule with a rank_summary")
        if cls.hints.reads and cls.scope is not Scope.RANK:
            raise TypeError(f"{cls.__name__}: Hints(reads=...) applies to rank rules only")

    @property
    def judging_steps(self) -> int:
        """How many of a rank's steps this rule reads at most (its config's ``window_steps`` or
        ``lookback_steps``, the larger; 1 for a rule of single steps). Before a rank has that many, a
        ``None`` may mean "cannot judge yet" rather than "nothing wrong": the engine does not let such
        a ``None`` resolve an alert it restored from before a restart or a failover."""
        cfg = self.config
        return max(1, getattr(cfg, "window_steps", 1), getattr(cfg, "lookback_steps", 1))

    def evaluate(self, window: W) -> Finding | Sequence[Finding] | None:  # pragma: no cover - abstract
        """What the rule sees in ``window``: a finding, none, or (job rules) one per rank."""
        raise NotImplementedError

    def rank_summary(self, st: RankStatus) -> Any:  # pragma: no cover - abstract
        """One rank's part of a summarized job rule (``Hints.summarized``)."""
        raise NotImplementedError


RankRule = Rule[RankWindow, Any]
JobRule = Rule[JobWindow, Any]


def is_rank_rule(rule: Rule[Any, Any]) -> TypeGuard[RankRule]:
    """Whether the engine runs ``rule`` on a rank's window (its ``scope``, derived from its window type)."""
    return rule.scope is Scope.RANK


def is_job_rule(rule: Rule[Any, Any]) -> TypeGuard[JobRule]:
    """Whether the engine runs ``rule`` on a job's window on its tick."""
    return rule.scope is Scope.JOB


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


# A step-0 loss below this fraction of chance, ln(C), comes from trained weights (``trained_start``): the
# level at which InitialLossUnexpected's default info_factor (1.5x) notes a below-chance start. A tiny LM
# pretrained for a few hundred steps (bench/faultzoo/finetune.py) starts at 0.43-0.50x; GPT-2 at ~0.3x.
TRAINED_START_RATIO = 2 / 3


def loss_classes(window: RankWindow) -> int | None:
    """C of a cross-entropy-style loss: the ``num_classes`` hint, else the second dim of an inspected
    ``cross_entropy``/``nll_loss`` input (a language model's vocabulary); None when unknown."""
    if window.meta.num_classes:
        return window.meta.num_classes
    for s in (*window.initial_steps, *window.last(20)):
        for c in s.loss_inputs:
            if c.fn in ("cross_entropy", "nll_loss") and len(c.input_shape) >= 2 and c.input_shape[1] >= 2:
                return c.input_shape[1]
    return None


def trained_start(window: RankWindow) -> str | None:
    """Why this rank's run starts from trained weights (a fine-tune), or None: the attach hint
    ``fine_tune`` (``attach(fine_tune=True)``, a peft wrapper, a Hugging Face model loaded by name), or
    a step-0 loss below ``TRAINED_START_RATIO`` (2/3) of chance ln(C) for a C-class cross-entropy loss.

    Why the second: a plain ``model.load_state_dict(torch.load(ckpt))`` leaves no trace on the model,
    but its first loss does. Random weights give a loss near ln(C) at step 0 (A. Karpathy, "A Recipe
    for Training Neural Networks", 2019: "verify loss @ init"); an update has not happened yet, so no
    leak of labels into the inputs can have been learned, and a loss far below chance before any update
    is what trained weights produce (or a loss that is not over C balanced classes: an output bias set to
    the prior of imbalanced classes starts at the prior's entropy; such a run is judged as a fine-tune)."""
    if window.meta.fine_tune:
        return "the attach hint fine_tune"
    first = window.initial_steps[0] if window.initial_steps else None
    if first is None or first.step != 0 or first.loss is None or not math.isfinite(first.loss) or first.loss < 0:
        return None
    classes = loss_classes(window)
    if classes is None or classes < 2:
        return None
    ratio = first.loss / math.log(classes)
    if ratio >= TRAINED_START_RATIO:
        return None
    return f"its step-0 loss {fmt(first.loss)} is {fmt(ratio)}x the chance level ln({classes})"


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


def oversized_updates(window: RankWindow, threshold: float, samples: int) -> tuple[int, float] | None:
    """The first run of ``samples`` consecutive sampled update ratios (the whole kept window) whose
    median reached ``threshold``: (the step it ended at, that median); None when none did.

    The memory of a learning rate that was too high: once oversized updates have killed layers or
    wrecked the loss, the updates look small (there is nothing left to move) and a rule judging the
    latest ratios would name the damage's look-alike (a learning rate too low) instead of its cause.
    """
    ratios, stepnums = window.column("update_ratio"), window.column("step")
    run: list[float] = []
    for v, st in zip(ratios, stepnums, strict=True):
        if v is None or not math.isfinite(v):
            continue
        run = [*run[-(samples - 1):], v] if samples > 1 else [v]
        if len(run) == samples and statistics.median(run) >= threshold and st is not None:
            return int(st), statistics.median(run)
    return None


@dataclass(frozen=True)
class LossDamage:
    """How a run's loss stands against its start and its best (``loss_damage``)."""

    initial: float  # median of the first losses the rank reported
    best: float  # lowest median of ``block_steps`` consecutive losses so far
    recent: float  # median of the last ``block_steps`` losses
    stalled: bool  # recent >= stall_fraction x initial: the run never got going, or fell back to its start
    gave_back: float  # share of the progress from initial to best given back since (0: none)


def loss_damage(window: RankWindow, block_steps: int = 10, stall_fraction: float = 0.8,
                min_steps: int = 30) -> LossDamage | None:
    """The loss's damage over the kept window, judged on medians of ``block_steps`` steps (minibatch
    noise): None until ``min_steps`` sound steps, or without an initial loss to compare with."""
    initial = window.initial_values("loss")
    n = sound_steps(window, len(window.steps))
    losses = window.values("loss", n)
    if len(initial) < 3 or len(losses) < min_steps:
        return None
    start = statistics.median(initial)
    blocks = [statistics.median(losses[i:i + block_steps])
              for i in range(len(losses) % block_steps, len(losses), block_steps)]
    recent, best = blocks[-1], min(blocks)
    progress = start - best
    gave_back = (recent - best) / progress if progress > 0 else 0.0
    return LossDamage(initial=start, best=best, recent=recent,
                      stalled=start > 0 and recent >= stall_fraction * start, gave_back=gave_back)


def gradless_layers(step: StepRecord) -> list[str]:
    """The layers of a step whose gradient is missing or exactly zero."""
    return sorted(n for n, ls in step.layers.items() if ls.grad_missing or ls.grad_norm == 0.0)


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
