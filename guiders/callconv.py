"""Calling conventions that differ between ComfyUI versions, handled in one place (no ComfyUI import).

ComfyUI adds arguments to the methods a custom guider overrides and to the functions it calls
(``CFGGuider.inner_sample`` gained ``latent_shapes`` after v0.3.64; ``ModelPatcher.prepare_state``
now requires ``model_options``). The pack's overrides take ``*args, **kwargs``, read the arguments
they need by name from the parent's own signature and forward everything untouched; its calls into
ComfyUI pass optional keywords only where the callee declares them. ``docs/comfyui_compat.md``
records each convention per version; ``tests/test_comfy_conventions.py`` binds each of them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Iterable


def named_arguments(signature_of: Callable, args: tuple, kwargs: dict, skip_self: bool = True) -> Dict[str, Any]:
    """The arguments of a call ``f(*args, **kwargs)`` by name, bound to ``signature_of``'s signature
    (the overridden parent method; ``skip_self`` drops its first parameter), defaults filled in.

    Raises ``TypeError`` naming the callee when the call does not fit it."""
    sig = inspect.signature(signature_of)
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        name = getattr(signature_of, "__qualname__", repr(signature_of))
        raise TypeError(f"{name}: this ComfyUI called it in a way the pack does not know ({e}); "
                        "see docs/comfyui_compat.md") from e
    bound.apply_defaults()
    return dict(bound.arguments)


@functools.lru_cache(maxsize=256)
def _keywords(fn: Callable):
    """(names ``fn`` takes by keyword, whether it has ``**kwargs``), or None if it has no signature.
    Cached per function: the fused forward asks for every evaluation (bound methods are keyed by
    their underlying function, see ``accepts``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    names = frozenset(n for n, p in params.items()
                      if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        kw = _keywords(getattr(fn, "__func__", fn))   # a bound method: its function's signature
    except TypeError:                                 # unhashable callable
        kw = _keywords.__wrapped__(fn)
    if kw is None:
        return False
    names, varkw = kw
    return name in names or varkw


def supported_kwargs(fn: Callable, kwargs: dict) -> dict:
    """``kwargs`` less the names ``fn`` does not take (for calls into ComfyUI functions that gained
    optional keywords in newer versions)."""
    return {k: v for k, v in kwargs.items() if accepts(fn, k)}


def call_with_supported(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` passing only the keywords ``fn`` declares."""
    return fn(*args, **supported_kwargs(fn, kwargs))


def extra_arguments(named: Dict[str, Any], known: Iterable[str]) -> Dict[str, Any]:
    """The named arguments that are not in ``known`` (what a newer ComfyUI added)."""
    known = set(known)
    return {k: v for k, v in named.items() if k not in known}
