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
    named_layers: int = Field(default=6, ge=1, description="layers missing from the optimizer named in the "
                              "summary (all of them, up to the attach report's cap, are in the evidence)")


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

    Also critical, from the first step: the optimizer holds parameters whose
    ``requires_grad`` is False while trainable layers are missing from it (the
    client's attach-time ``frozen_in_optimizer`` / ``trainable_not_in_optimizer``
    checks). That is an optimizer built before ``peft.get_peft_model`` froze the
    base model and added the adapters: it updates nothing, and the adapters it
    does not hold will never train. The alert names them (up to
    ``named_layers``). Before either of these, it fires when no layer the
    optimizer holds got a gradient for ``no_grad_steps`` steps.
    """

    name: ClassVar[str] = "WeightsNotUpdating"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = WeightsNotUpdatingConfig
    advice: ClassVar[str] = (
        "Check that the optimizer was built over model.parameters() of the model you train (not a copy or an "
        "earlier instance), that the learning rate is not 0, and that optimizer.step() runs after backward(). Under "
        "peft, build the optimizer after get_peft_model(), over the parameters with requires_grad=True."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        missing = self._trainable_not_in_optimizer(window)
        if missing is not None:
            return missing
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

    def _trainable_not_in_optimizer(self, window: RankWindow) -> Finding | None:
        """The attach report says the optimizer holds frozen tensors and lacks trainable layers."""
        attach, s = window.meta.attach, window.latest
        if attach is None or s is None:
            return None
        frozen = [f for f in attach.static_findings if f.check == "frozen_in_optimizer"]
        layers = [f.layer for f in attach.static_findings if f.check == "trainable_not_in_optimizer" and f.layer]
        if not frozen or not layers:
            return None
        n = self.config.named_layers
        named = ", ".join(layers[:n]) + (f" and {len(layers) - n} more" if len(layers) > n else "")
        return Finding(
            summary=(f"{len(layers)} trainable layers will never train: the optimizer does not hold them ({named}), "
                     f"while it holds parameters with requires_grad=False; was it built before get_peft_model() "
                     f"(rank {window.rank})?"),
            evidence={"step": s.step, "layers_not_in_optimizer": len(layers), "layer_names": ", ".join(layers)[:1024],
                      "optimizer": frozen[0].detail},
            step=s.step,
            rank=window.rank,
            layer=layers[0],
            severity=Severity.CRITICAL,
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
