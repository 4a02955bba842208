"""ForwardTap: sampled forward hooks that live outside the user's model.

What lives here: the hooks through which ``Activations`` and ``Inputs`` see a
sampled step's forward, and the hand-off around ``torch.compile``d forwards that
``LossInputs`` uses. What does not: the measurements (the quantities).

Why not ``module.register_forward_hook``: a module's hooks are entries of the
module's own dicts, so ``torch.save(model)`` pickles them (a closure fails the
save; a bound method makes a ``weights_only`` load reject the checkpoint) and
``copy.deepcopy(model)`` copies them (the copy would report into this monitor).
Global module hooks (``torch.nn.modules.module.register_module_forward_pre_hook``
and ``register_module_forward_hook``, public API) belong to no module: they are
registered only while a sampled step is armed (``arm``/``disarm``), filtered to
the watched modules through a weak mapping module -> name, and cost nothing on
unsampled steps.

``torch.compile``: a compiled frame reads the global hook dicts and the
``TorchFunctionMode`` stack, and dynamo guards on both: a hook or mode present on
one step and absent on the next recompiles the model. When ``torch.compile(model)``'s
wrapper (a module whose ``_orig_mod`` leads to the watched root) is called, the
tap removes its global hooks before the compiled frame starts, calls
``compiled_enter`` (``LossInputs`` pops its mode there) and, from a one-shot
forward hook on the wrapper, ``compiled_exit`` after it returns; from then on it
arms through hooks on that wrapper only (they live on the wrapper, not on the
model, and the compiled frame never reads them). Modules inside a compiled
forward run as one graph and are not seen (no activation statistics); the inputs
are read from the wrapper's call. torch warns once ("global hooks ... torch.compile")
at the first sampled call of a wrapper the tap has not seen yet; attaching the
compiled module (``attach(torch.compile(model), ...)``) tells the tap at attach.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from healthd_client.layers import unwrap_model

# (layer name, positional args, keyword args) before the watched module runs.
PreHook = Callable[[str, tuple[Any, ...], dict[str, Any]], None]
# (layer name, output) after the watched module ran.
PostHook = Callable[[str, Any], None]

_MAX_WRAPPER_DEPTH = 8


def _compiled_inner(module: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(module, "_orig_mod", None)  # what torch.compile(module) wraps
    return inner if isinstance(inner, torch.nn.Module) else None


class ForwardTap:
    """Global forward hooks for sampled steps, filtered to watched modules; compile-aware."""

    def __init__(
        self,
        *,
        pre: PreHook | None = None,
        post: PostHook | None = None,
        compiled_enter: Callable[[], None] | None = None,
        compiled_exit: Callable[[], None] | None = None,
    ) -> None:
        self._pre = pre
        self._post = post
        self._compiled_enter = compiled_enter
        self._compiled_exit = compiled_exit
        self._names: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
        self._root: weakref.ref[torch.nn.Module] | None = None
        self._root_name = "root"
        self._wrappers: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._handles: list[Any] = []
        self.armed = False

    def watch(self, module: torch.nn.Module, name: str) -> None:
        """Report ``module``'s forwards under ``name`` while armed."""
        self._names[module] = name

    def watch_root(self, model: torch.nn.Module, name: str = "root") -> None:
        """The model as given to attach: its compile wrappers (if any) are known from the start."""
        root = unwrap_model(model)
        self._root = weakref.ref(root)
        self._root_name = name
        module: torch.nn.Module | None = model
        for _ in range(_MAX_WRAPPER_DEPTH):
            if module is None or module is root:
                break
            if _compiled_inner(module) is not None:
                self._wrappers.add(module)
            module = _compiled_inner(module) or getattr(module, "module", None)

    @property
    def compiled(self) -> bool:
        """Whether the watched model was seen (or given) behind torch.compile."""
        return len(self._wrappers) > 0

    def arm(self) -> None:
        """Register the hooks for one sampled step. Idempotent."""
        if self.armed:
            return
        self.armed = True
        if self._wrappers:
            if self._pre is None and self._compiled_enter is None:
                return  # nothing of a compiled forward is visible to a post-hook of a module inside it
            for wrapper in list(self._wrappers):
                self._handles.append(wrapper.register_forward_pre_hook(self._wrapper_pre, with_kwargs=True))
        else:
            self._handles.append(register_module_forward_pre_hook(self._global_pre))
            if self._post is not None:
                self._handles.append(register_module_forward_hook(self._global_post))

    def disarm(self) -> None:
        """Remove every hook this tap registered. Idempotent."""
        self.armed = False
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # ------------------------------------------------------------------ hooks

    def _leads_to_root(self, module: torch.nn.Module) -> bool:
        root = self._root() if self._root is not None else None
        inner = _compiled_inner(module)
        return root is not None and inner is not None and unwrap_model(inner) is root

    def _global_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return
        name = self._names.get(module)
        if name is not None:
            if self._pre is not None:
                self._pre(name, args, {})
        elif self._leads_to_root(module):
            # torch.compile(model) is about to enter its compiled frame: switch to hooks on the
            # wrapper before it starts, so that the frame sees neither our hooks nor our mode.
            self.disarm()
            self._wrappers.add(module)
            self.arm()
            self._wrapper_pre(module, args, {})

    def _global_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        name = self._names.get(module)
        if name is not None and self._post is not None:
            self._post(name, output)

    def _wrapper_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._pre is not None:
            self._pre(self._root_name, args, kwargs)
        if self._compiled_enter is not None:
            self._compiled_enter()
            handle: Any = None

            def after(module: torch.nn.Module, args: Any, output: Any) -> None:
                handle.remove()
                if self._compiled_exit is not None:
                    self._compiled_exit()

            handle = module.register_forward_hook(after, always_call=True)
