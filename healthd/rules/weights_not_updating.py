"""WeightsNotUpdating: gradients arrive but the parameters do not change."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    LookbackSteps,
    Rule,
    WindowedConfig,
    fmt,
)
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class WeightsNotUpdatingConfig(WindowedConfig):
    window_steps: int = Field(default=3, ge=2,
                                      description="consecutive measured steps with no update before it counts")
    lookback_steps: LookbackSteps = Field(default=100, description="steps searched for measured update ratios "
                                "(the client samples them every heavy_every_steps)")
    no_grad_steps: int = Field(default=3, ge=1, description="consecutive steps in which no layer of the "
                               "optimizer got a gradient before it counts")
    zero_update_ratio: float = Field(default=1e-12, ge=0, description="update ratio treated as no update")
    for_steps: ForSteps = 1


class WeightsNotUpdating(Rule[RankWindow, WeightsNotUpdatingConfig]):
    """Layers with a non-zero gradient whose weights stay exactly the same, step after step.

    Why: the optimizer was built over other parameters (a re-created model, a
    copy), the learning rate is 0, or the update is computed but never applied.
    The loss may still move (other layers learn), so nothing looks broken.

    Source: "Weight updates not being applied" and "incorrect expression for
    gradient updates", C. Shao, "Checklist for debugging neural networks"
    (Towards Data Science, 2019). Fires when, for ``window_steps``
    consecutive steps, a layer's gradient norm is > 0 and its update ratio is at
    most ``zero_update_ratio``. Steps skipped by mixed precision do not count.
    """

    name: ClassVar[str] = "WeightsNotUpdating"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = WeightsNotUpdatingConfig
    advice: ClassVar[str] = (
        "Check that the optimizer was built over model.parameters() of the model you train (not a copy or an "
        "earlier instance), that the learning rate is not 0, and that optimizer.step() runs after backward()."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        orphan = self._no_layer_gets_gradients(window)
        if orphan is not None:
            return orphan
        steps = window.latest_where(lambda s: not s.step_skipped and (
            s.update_ratio is not None or any(ls.update_ratio is not None for ls in s.layers.values())),
            cfg.window_steps, cfg.lookback_steps)
        if len(steps) < cfg.window_steps:
            return None
        stuck: set[str] | None = None
        for s in steps:
            here = {
                name for name, ls in s.layers.items()
                if ls.grad_norm is not None and ls.grad_norm > 0 and ls.update_ratio is not None
                and 0 <= ls.update_ratio <= cfg.zero_update_ratio
            }
            if not s.layers and s.grad_norm and s.update_ratio is not None and s.update_ratio <= cfg.zero_update_ratio:
                here = {"all"}
            stuck = here if stuck is None else stuck & here
            if not stuck:
                return None
        assert stuck is not None
        layers = sorted(stuck)
        s = steps[-1]
        total = len(s.layers) or 1
        example_norm = s.layers[layers[0]].grad_norm if layers[0] in s.layers else s.grad_norm
        return Finding(
            summary=(f"{len(layers)} of {total} layers get gradients but their weights have not changed for "
                     f"{len(steps)} steps (e.g. {layers[0]}, grad norm {fmt(example_norm)}; rank {window.rank})"),
            evidence={"step": s.step, "stuck_layers": len(layers), "layers": total,
                      "example_layer": layers[0], "steps": len(steps)},
            step=s.step,
            rank=window.rank,
            layer=layers[0],
            severity=Severity.CRITICAL if len(layers) == total else None,
        )

    def _no_layer_gets_gradients(self, window: RankWindow) -> Finding | None:
        """Every layer the optimizer holds had grad None for ``no_grad_steps`` steps while losses came in."""
        n = self.config.no_grad_steps
        steps = window.last(n)
        if len(steps) < n or not all(s.layers and s.loss is not None and s.grad_norm is None
                                     and all(ls.grad_missing for ls in s.layers.values()) for s in steps):
            return None
        s = steps[-1]
        return Finding(
            summary=(f"None of the {len(s.layers)} layers the optimizer holds got a gradient for {n} steps while the "
                     f"loss was computed (step {s.step}, rank {window.rank}): the optimizer was built over other "
                     f"parameters (a copy or an earlier model instance), so nothing is trained"),
            evidence={"step": s.step, "layers": len(s.layers), "steps": n, "loss": s.loss},
            step=s.step,
            rank=window.rank,
            severity=Severity.CRITICAL,
        )
