"""Incidents: which alert is the likely cause of which, so one fault pages once.

One cause produces many alerts: a learning rate 300x too high makes the loss
diverge, the gradients explode, ReLUs die and gradients stop flowing, and each
of those has its own rule. ``CONSEQUENCES`` is the one place that says which
rule's condition commonly *causes* which others' (a small directed acyclic
graph over ``healthd.rules.ALL_RULES``, checked when this module is imported;
every rule is listed, most with no consequences). ``healthd docs export``
writes it into docs/rules.md; ``healthd deploy export`` turns it into
Alertmanager ``inhibit_rules`` that mute a consequence while its cause fires.

The engine uses it for alert-state bookkeeping only (rules stay pure): when an
alert fires and a cause of it is firing for the same job (the same rank when
both rules are about one rank, and the same stream, ``equal_labels``), it carries ``caused_by`` (the
cause's rule) and the cause's ``incident`` id; an alert with no firing cause
opens an incident of its own (its id). A cause that fires after its
consequences adopts them. A cause stays firing while a consequence it adopted
fires (``holds_open``): the incident's page stays open until its last symptom
clears, instead of the cause resolving first and the symptoms paging on their
own. The incident's root takes its incident's worst severity, so that muting the consequences never
mutes a page.

Streams (``attach(stream="generator")``: a GAN's generator and discriminator are two streams of one
rank) are separate models with separate optimizers: a learning rate too high on the discriminator
explains the discriminator's diverging loss, not the generator's. A cause explains a consequence on
another stream only when ``CROSS_STREAM`` says its condition belongs to the process, not to one of its
models: the GPU rules (a process samples its GPU once, under its first monitor's stream, and a failing
or throttled GPU slows every stream it runs). What does not live here: when alerts fire (``healthd.engine.alerts``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from healthd.rules import ALL_RULES
from healthd.rules.base import Rule, Scope
from healthd.wire.schema import AlertState

if TYPE_CHECKING:
    from healthd.engine.alerts import Alert

_LOSS_SHAPE = ("LossDiverging", "LossOscillating", "LossPlateau")
_GRADIENT_SHAPE = ("ExplodingGradients", "VanishingGradients", "GradientsNotFlowing")

# Causes whose condition is the process's (its GPU), not one stream's: they explain consequences on every
# stream of their rank (or job). Every other cause explains its own stream's consequences only.
CROSS_STREAM: frozenset[str] = frozenset({
    "GPUHardwareErrors", "GPUThrottling", "GPUMemoryLeak", "GPUMemoryNearLimit", "SmallBatchUnderutilization",
    "LowGPUUtilization", "GPUImbalance",
})

# cause -> the rules whose condition it commonly brings about. Every rule of ALL_RULES is a key.
CONSEQUENCES: Mapping[str, tuple[str, ...]] = {
    # Numerics and optimisation: a NaN or a too-large step wrecks every statistic downstream of it.
    "NonFiniteValues": (*_LOSS_SHAPE, *_GRADIENT_SHAPE),
    "LearningRateTooHigh": (*_LOSS_SHAPE, *_GRADIENT_SHAPE, "DeadActivations", "SaturatedActivations"),
    # Gradients summed over every step since the last zero_grad() grow each update by the steps' count:
    # the update ratio the learning-rate rule judges is the accumulation's, not the learning rate's.
    "MissingZeroGrad": ("LearningRateTooHigh", "ExplodingGradients", "LossDiverging", "LossOscillating"),
    "LearningRateTooLow": ("LossPlateau",),
    "WeightsNotUpdating": ("LossPlateau", "GradientsNotFlowing"),
    "MonitoringDegraded": (),  # a quantity not measured: it causes no training fault
    "LossScaleCollapse": ("VanishingGradients", "GradientsNotFlowing", "LossPlateau"),
    # One exploded step throws the weights far off: the loss diverges or sticks high, ReLUs die, and the
    # layers below stop getting a gradient (the fault zoo's error_explodes: a 400x LR for one phase).
    "ExplodingGradients": ("LossDiverging", "LossOscillating", "LossPlateau", "GradientsNotFlowing",
                           "VanishingGradients", "DeadActivations"),
    # A gradient too small to change a weight in float32 (w + dw == w): the deep sigmoid stack's first layers.
    "VanishingGradients": ("WeightsNotUpdating",),
    "GradientsNotFlowing": (),
    "LossDiverging": (),
    # A loss swinging between two levels makes no net progress: the plateau rule sees the same window.
    "LossOscillating": ("LossPlateau",),
    "LossPlateau": (),
    # Model and data setup: a saturated or dead layer stops the gradient below it.
    "DeadActivations": ("GradientsNotFlowing", "VanishingGradients"),
    "SaturatedActivations": ("VanishingGradients",),
    "InputNotNormalized": ("SaturatedActivations",),
    "SoftmaxBeforeLoss": ("LossPlateau", "VanishingGradients"),
    "LossInputBroadcast": ("LossPlateau", "InitialLossUnexpected"),
    "InitialLossUnexpected": (),
    "EvalModeDuringTraining": (),
    "DropoutBeforeBatchNorm": (),
    "BatchNormSmallBatch": (),
    "Overfitting": (),
    "LargeBatchGeneralization": (),
    "LearningRateNotScaled": (),
    # Distributed: a stalled rank makes the others wait on it.
    "RankStalled": ("StragglerRank",),
    "StragglerRank": (),
    "TrainingStalled": (),
    "RankDesync": (),
    "GradientNormMismatch": (),
    # GPUs: a failing or throttled GPU slows or stops its rank; a leak fills the memory.
    "GPUHardwareErrors": ("RankStalled", "StragglerRank", "GPUThrottling"),
    "GPUThrottling": ("StragglerRank", "GPUImbalance", "LowGPUUtilization"),
    "GPUMemoryLeak": ("GPUMemoryNearLimit",),
    "GPUMemoryNearLimit": (),
    "SmallBatchUnderutilization": ("LowGPUUtilization",),
    "LowGPUUtilization": (),
    "GPUImbalance": (),
}


class IncidentGraph:
    """``CONSEQUENCES`` checked against a rule catalog, with the lookups the engine and generators need."""

    def __init__(self, consequences: Mapping[str, Sequence[str]], rules: Sequence[type[Rule[Any, Any]]],
                 cross_stream: Collection[str] = ()) -> None:
        scopes = {r.name: r.scope for r in rules}
        unknown_cross = sorted(set(cross_stream) - set(scopes))
        if unknown_cross:
            raise ValueError(f"incident graph: cross-stream cause(s) {', '.join(unknown_cross)} "
                             "not in the rule catalog")
        self.cross_stream = frozenset(cross_stream)
        missing = sorted(set(scopes) - set(consequences))
        if missing:
            raise ValueError(f"incident graph: rule(s) {', '.join(missing)} have no entry in CONSEQUENCES "
                             "(list every rule, with () when it causes nothing else)")
        for cause, effects in consequences.items():
            unknown = sorted({cause, *effects} - set(scopes))
            if unknown:
                raise ValueError(f"incident graph: {', '.join(unknown)} (under {cause}) not in the rule catalog")
            if cause in effects:
                raise ValueError(f"incident graph: {cause} lists itself as its consequence")
        self.consequences: dict[str, tuple[str, ...]] = {c: tuple(e) for c, e in consequences.items()}
        self._scopes = scopes
        self._causes: dict[str, tuple[str, ...]] = {
            r: tuple(c for c, e in self.consequences.items() if r in e) for r in self.consequences}
        self._check_acyclic()

    def _check_acyclic(self) -> None:
        done: set[str] = set()

        def visit(rule: str, path: tuple[str, ...]) -> None:
            if rule in path:
                raise ValueError(f"incident graph: cycle {' -> '.join((*path[path.index(rule):], rule))}")
            if rule in done:
                return
            for effect in self.consequences.get(rule, ()):
                visit(effect, (*path, rule))
            done.add(rule)

        for rule in self.consequences:
            visit(rule, ())

    def causes(self, rule: str) -> tuple[str, ...]:
        """The rules whose firing makes ``rule``'s alert a consequence."""
        return self._causes.get(rule, ())

    def edges(self) -> list[tuple[str, str]]:
        """Every (cause, consequence) pair, in declaration order."""
        return [(c, e) for c, effects in self.consequences.items() for e in effects]

    def equal_labels(self, cause: str, consequence: str) -> tuple[str, ...]:
        """Labels a cause's alert and a consequence's alert share when one explains the other: the rank too
        when both rules are about one rank, the job only when either looks at the whole job; the stream
        too unless the cause is the process's (``cross_stream``)."""
        both_rank = self._scopes.get(cause) is Scope.RANK and self._scopes.get(consequence) is Scope.RANK
        labels = ("job", "rank") if both_rank else ("job",)
        return labels if cause in self.cross_stream else (*labels, "stream")

    def _same_place(self, cause: Alert, effect: Alert) -> bool:
        """Whether the two alerts agree on the labels the edge cause -> effect joins on."""
        return all(getattr(cause, label) == getattr(effect, label)
                   for label in self.equal_labels(cause.rule, effect.rule))

    def _explains(self, cause: Alert, alert: Alert) -> bool:
        return (cause.state is AlertState.FIRING and cause.rule in self.causes(alert.rule)
                and self._same_place(cause, alert))

    def on_firing(self, alert: Alert, active: Iterable[Alert]) -> None:
        """Place ``alert`` (just fired) in an incident of its job's ``active`` alerts, and make it the
        cause of firing alerts it explains that had none."""
        others = [a for a in active if a is not alert]
        causes = sorted((c for c in others if self._explains(c, alert)), key=lambda c: c.fired_at or c.started_at)
        if causes:
            alert.caused_by, alert.incident = causes[0].rule, causes[0].incident or causes[0].id
        else:
            alert.caused_by, alert.incident = None, alert.id
        for effect in others:
            if effect.state is AlertState.FIRING and effect.caused_by is None and self._explains(alert, effect):
                old = effect.incident
                effect.caused_by = alert.rule
                for a in others:  # the effect's incident (it was its root) joins this one
                    if a.incident == old:
                        a.incident = alert.incident
        self._escalate_root(alert, others)

    @staticmethod
    def _escalate_root(alert: Alert, others: Sequence[Alert]) -> None:
        """The incident's root (the likely cause) takes its incident's worst severity. Alertmanager's
        inhibit rules mute consequences while their cause fires: a warning cause muting a critical
        consequence would page nobody. Escalate only, as the engine escalates a rule's own alert."""
        members = [a for a in (alert, *others) if a.incident == alert.incident and a.state is AlertState.FIRING]
        root = next((a for a in members if a.id == alert.incident), None)
        if root is None:
            return
        worst = max(members, key=lambda a: a.severity.level).severity
        if worst.level > root.severity.level:
            root.severity = worst

    def holds_open(self, alert: Alert, active: Iterable[Alert]) -> bool:
        """Whether ``alert`` must stay firing: a consequence it caused still fires."""
        return any(a is not alert and a.state is AlertState.FIRING and a.caused_by == alert.rule
                   and a.incident == alert.incident and self._same_place(alert, a)
                   for a in active)


GRAPH = IncidentGraph(CONSEQUENCES, ALL_RULES, CROSS_STREAM)

T = TypeVar("T")


def by_incident(alerts: Iterable[T], *, id_of: Callable[[T], str], incident_of: Callable[[T], str | None],
                started_of: Callable[[T], float]) -> list[list[T]]:
    """Alerts grouped by incident for display (status page, report, demo): each group its root, the likely
    cause, first, then its consequences as they started; groups in the order their first alert came. An
    alert with no incident (pending, or from an older server) is a group of its own. Takes accessors so
    that engine alerts and API dicts group alike."""
    groups: dict[str, list[T]] = {}
    for a in alerts:
        groups.setdefault(incident_of(a) or id_of(a), []).append(a)
    for key, group in groups.items():
        group.sort(key=lambda a: (id_of(a) != key, started_of(a)))
    return list(groups.values())
