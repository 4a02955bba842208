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
are read from the wrapper's call. Attaching the compiled module
(``attach(torch.compile(model), ...)``) tells the tap at attach.

``model.compile()`` (in place) compiles the module's whole call, its hook dispatch
included: no hook of any kind runs outside the compiled frame, so the tap registers
nothing for such a model (``compiled_in_place``) and its quantities say they are blind.

torch's warning "Using `torch.compile(module)` when there are global hooks on modules"
(``OptimizedModule.__call__`` warns whenever any global module hook exists, because such a
hook fires once more, for the wrapper) would reach the user at the first sampled call
of a wrapper the tap has not seen yet: its cause cannot be removed, since the tap learns of
the wrapper from that very call. The extra call is exactly what the tap uses to find the
wrapper and is harmless to it (the hooks filter to watched modules), so that one warning is
filtered by its message, once per process, when the tap first registers global hooks.
"""

from __future__ import annotations

import re
import warnings
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
# torch/_dynamo/eval_frame.py, OptimizedModule.__call__ (see the module docstring).
_TORCH_GLOBAL_HOOK_WARNING = "Using `torch.compile(module)` when there are global hooks on modules"
_IGNORE_PATTERN = re.escape(_TORCH_GLOBAL_HOOK_WARNING)


def _filter_torch_global_hook_warning() -> None:
    """Ignore torch's global-hook warning, unless a filter of ours already decides it first.

    Changed only when needed: every change to the filters resets Python's "shown once" memory,
    which would bring the user's own once-only warnings back at every sampled step.
    """
    for action, message, category, _module, _line in warnings.filters:
        if issubclass(UserWarning, category) and (message is None or message.match(_TORCH_GLOBAL_HOOK_WARNING)):
            if action == "ignore" and message is not None and message.pattern == _IGNORE_PATTERN:
                return
            break
    warnings.filterwarnings("ignore", message=_IGNORE_PATTERN, category=UserWarning)


def compiled_in_place(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` (torch >= 2.2) compiled this module's call in place.

    ``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl`` and ``__call__`` runs it
    when it is set; torch offers no public query, so an absent attribute reads as not compiled.
    """
    return getattr(module, "_compiled_call_impl", None) is not None


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
    def compiled_in_place(self) -> bool:
        """Whether the watched model runs compiled in place (``model.compile()``): the tap sees nothing."""
        root = self._root() if self._root is not None else None
        return root is not None and compiled_in_place(root)

    @property
    def compiled(self) -> bool:
        """Whether the watched model was seen (or given) behind torch.compile, or compiled in place."""
        return len(self._wrappers) > 0 or self.compiled_in_place

    def blind(self, compiled_step: bool, *, layers: bool) -> str | None:
        """Why this tap cannot see what a quantity reads, or None when it can.

        ``compiled_step``: the optimizer step was seen inside a compiled function (``QuantityContext``);
        ``layers``: the quantity reads modules inside the model (activations), not only its call.
        """
        if compiled_step:
            return ("the training step is a torch.compile'd function: its forward and loss run inside "
                    "graphs, where healthd's forward hooks and loss inspection see nothing")
        if self.compiled_in_place:
            return ("the model is compiled in place (model.compile()): no forward hook runs outside "
                    "its compiled call")
        if layers and self._wrappers:
            return "the model runs under torch.compile: its layers run inside one graph, unseen by forward hooks"
        return None

    def arm(self) -> None:
        """Register the hooks for one sampled step. Idempotent."""
        if self.armed:
            return
        self.armed = True
        if self.compiled_in_place:
            return  # a hook would only be read by the compiled frame: guarded, and a recompile when removed
        if self._wrappers:
            if self._pre is None and self._compiled_enter is None:
                return  # nothing of a compiled forward is visible to a post-hook of a module inside it
            for wrapper in list(self._wrappers):
                self._handles.append(wrapper.register_forward_pre_hook(self._wrapper_pre, with_kwargs=True))
        else:
            _filter_torch_global_hook_warning()
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
