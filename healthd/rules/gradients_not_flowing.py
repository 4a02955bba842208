"""GradientsNotFlowing: some layers the optimizer holds get no gradient (or an exactly zero one), step after step."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, WindowedConfig, WindowSteps
from healthd.state.windows import RankWindow
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity


class GradientsNotFlowingConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=3, description="consecutive reported steps a layer must be gradless")


def _gradless(s: StepRecord) -> set[str]:
    return {n for n, ls in s.layers.items() if ls.grad_missing or ls.grad_norm == 0.0}


class GradientsNotFlowing(Rule[RankWindow, GradientsNotFlowingConfig]):
    """Layers whose gradient is None or exactly zero for ``window_steps`` consecutive steps while others learn.

    Why: a ``.detach()`` (or ``.data``/``.numpy()`` round trip) cuts the graph, a
    layer frozen by mistake (``requires_grad=False``) or an unused branch means
    those weights never train, yet the loss still falls through the other layers,
    so nothing looks broken.
    Source: "check that gradients flow to every layer" / "frozen layers, .detach()"
    (C. Shao, "Checklist for debugging neural networks", Towards Data Science,
    2019: "check intermediate outputs and connections"). Thresholds: ``grad_missing`` or a gradient norm of exactly 0
    for ``window_steps`` (3) consecutive steps; at least one other layer must have
    a non-zero gradient (when none has, the optimizer holds parameters the loss
    never reaches: WeightsNotUpdating's finding).
    """

    name: ClassVar[str] = "GradientsNotFlowing"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GradientsNotFlowingConfig
    advice: ClassVar[str] = (
        "Look for .detach(), .data, .item()/.numpy() round trips or torch.no_grad() in forward between the "
        "loss and the layer shown; check requires_grad of its parameters (frozen by mistake?) and that the "
        "branch is actually used in the forward pass. If it is frozen on purpose, leave it out of the optimizer."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        steps = [s for s in window.last(cfg.window_steps) if s.layers]
        if len(steps) < cfg.window_steps:
            return None
        stuck: set[str] | None = None
        for s in steps:
            flowing = [n for n, ls in s.layers.items() if ls.grad_norm is not None and ls.grad_norm > 0]
            if not flowing:
                return None
            stuck = _gradless(s) if stuck is None else stuck & _gradless(s)
            if not stuck:
                return None
        assert stuck is not None
        layers = sorted(stuck)
        s = steps[-1]
        missing = s.layers[layers[0]].grad_missing
        what = "no gradient (None)" if missing else "a zero gradient"
        return Finding(
            summary=(f"{len(layers)} of {len(s.layers)} layers got {what} "
                     f"for {len(steps)} steps in a row, e.g. {layers[0]} (step {s.step}, rank {window.rank}); "
                     f"they do not train"),
            evidence={"step": s.step, "layers_without_gradient": len(layers), "layers": len(s.layers),
                      "example_layer": layers[0], "grad_missing": missing, "steps": len(steps),
                      "all_layers": ",".join(layers)[:200]},
            step=s.step,
            rank=window.rank,
            layer=layers[0],
        )
