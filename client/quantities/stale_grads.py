"""StaleGrads: do the gradients this optimizer's step reads hold contributions from before its previous step?

That is what a missing ``zero_grad`` does, and nothing else does: the question is
asked about THIS optimizer's parameters between two of ITS steps, so gradients
that another loss leaves on them are not stale. In an alternating GAN the
generator's loss flows back through the discriminator after the discriminator's
step, leaving gradients there until the discriminator's next ``zero_grad()``
(right before its own backward); a WGAN critic, an actor-critic with a shared
trunk, a frozen teacher or an EMA copy do the same or less. Only a reset between
the two steps tells a healthy loop from a missing ``zero_grad``.

How a reset is seen: a gradient hook on each of the optimizer's parameters
(``Tensor.register_hook`` runs before the new gradient is accumulated into
``.grad``) looks at the ``.grad`` about to be added to, at every backward since the
optimizer's previous step:

- ``None`` on a parameter that had a gradient before: ``zero_grad()`` (set to
  None, the default since torch 2.0) ran in between. A host test, free.
- all zeros: ``zero_grad(set_to_none=False)`` ran. A parameter whose every
  gradient is exactly zero (the last bias of a WGAN critic, whose loss is a
  difference of means) says nothing either way, so a backward counts as seeing a
  reset when, over the first ``ZERO_CHECKS_PER_BACKWARD`` parameters it reaches,
  each old gradient is zero or its incoming one is, and some incoming one is not.
  On the device (no host sync); a backward begins when a parameter's hook fires a
  second time since the last check.

The step's gradients are stale when no backward since the previous step saw a
reset. Intended gradient accumulation zeroes after the optimizer step, so its
first micro-batch sees the reset. Steps with no backward since the previous step
(and the first step) are not judged. A parameter that holds a gradient when the monitor attaches
counts as having had one. Known blind spot: with
``set_to_none=False``, two backward passes over disjoint parameter sets look like
one, and a reset between them is missed.

Writes: ``grads_stale_at_backward`` for each judged step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext

ZERO_CHECKS_PER_BACKWARD = 3


class StaleGrads(Quantity):
    name = "stale_grads"

    def __init__(self) -> None:
        super().__init__(every_steps=1)  # every step's post-hook opens the interval; the checks are tiny
        self._handles: list[Any] = []
        self._armed = False  # an optimizer step happened: the interval until the next one is watched
        self._seen_backward = False  # some backward reached this optimizer's parameters in the interval
        self._reset = False  # host: a reset (grad set to None) was seen in the interval
        self._zeroed: torch.Tensor | None = None  # device: a reset to zeros was seen in the interval
        self._all_zero: torch.Tensor | None = None  # device, this backward: each checked old grad was zero
        self._any_new: torch.Tensor | None = None  # device, this backward: some checked new grad was not
        self._fired: set[int] = set()  # parameters reached since the last zero check (one backward)
        self._had_grad: set[int] = set()  # parameters that ever received a gradient

    def on_attach(self, ctx: QuantityContext) -> None:
        for p in ctx.plan.params:
            if p.requires_grad:
                self._handles.append(p.register_hook(self._hook_for(p)))
                if p.grad is not None:
                    # Attached after a backward (auto-attach attaches in the first step's pre-hook, an
                    # explicit attach may come mid-training): that gradient is one it had, so a None seen
                    # at the next backward is a reset, not a first gradient.
                    self._had_grad.add(id(p))

    def _hook_for(self, p: torch.Tensor) -> Any:
        key = id(p)

        def hook(grad: torch.Tensor) -> None:
            had = key in self._had_grad
            self._had_grad.add(key)
            if not self._armed or self._reset:
                return
            self._seen_backward = True
            old = p.grad
            if old is None:
                self._reset = had  # a parameter's very first gradient says nothing about a reset
                return
            if key in self._fired:  # a new backward
                self._end_backward()
            if len(self._fired) < ZERO_CHECKS_PER_BACKWARD:
                with torch.no_grad():
                    new = grad.detach().ne(0).any()
                    ok = old.detach().eq(0).all() | ~new
                    self._all_zero = ok if self._all_zero is None else self._all_zero & ok
                    self._any_new = new if self._any_new is None else self._any_new | new
            self._fired.add(key)
        return hook

    def _end_backward(self) -> None:
        self._fired.clear()
        if self._all_zero is not None and self._any_new is not None:
            with torch.no_grad():
                zero = self._all_zero & self._any_new
                self._zeroed = zero if self._zeroed is None else self._zeroed | zero
        self._all_zero = self._any_new = None

    def before_step(self, ctx: QuantityContext) -> None:
        self._end_backward()
        if ctx.record is not None and self._armed and self._seen_backward:
            if self._reset:
                ctx.record.put(self, "stale", False)
            elif self._zeroed is None:
                ctx.record.put(self, "stale", True)
            else:
                ctx.record.put(self, "stale", ~self._zeroed)
        self._armed = False

    def after_step(self, ctx: QuantityContext) -> None:
        self._end_backward()
        self._armed = True
        self._seen_backward = False
        self._reset = False
        self._zeroed = None

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        value = values["stale"]
        report["grads_stale_at_backward"] = bool(value[0] if isinstance(value, list) else value)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
