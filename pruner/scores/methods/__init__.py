"""Score methods, one module each: a :class:`ScoreMethod` names the ``scores.methods`` entry, the score columns it
can write, what the per-sample passes must form for it (projected features, exact gradient norms) and how it
combines the per-checkpoint components into its columns (pruner.scores.combine calls every configured method).

The built-in methods are registered in :data:`BUILTIN` order, the order of the columns in every score table. A new
method is one module with a ``ScoreMethod`` subclass (its ``combine``) and ``METHOD = TheMethod(...)``, plus its test: add its module name to
:data:`BUILTIN`, or call :func:`register` from outside the package (a plug-in; tests/test_methods.py shows one).
Its combine reads the components the passes already form (pruner.scores.components: ``loss``, ``clip_score``,
``sq_norm``, ``l1_feat``, ``tracin_*``, ``t1_*``/``t2_*``, ``prop_*``); a new per-sample component is a change to
the passes, not to this package.
"""
from __future__ import annotations

import importlib

from pruner.scores.methods.base import CombineWeights, ScoreMethod

__all__ = ["BUILTIN", "CombineWeights", "METHODS", "ScoreMethod", "register", "unregister"]

#: the built-in methods' modules, in column order
BUILTIN = ("diffin", "tracin", "oga", "baselines")
#: name -> method, built-ins first (in BUILTIN order), then plug-ins in registration order
METHODS: dict[str, ScoreMethod] = {}


def register(method: ScoreMethod) -> ScoreMethod:
    """Add a score method (its name becomes a valid ``scores.methods`` entry, its columns valid ``select.score``
    values). Refuses a name or a column already taken, so no two methods write one column."""
    if method.name in METHODS:
        raise ValueError(f"score method {method.name!r} is already registered")
    if type(method).combine is ScoreMethod.combine:
        raise ValueError(f"score method {method.name!r} defines no combine (fix: a ScoreMethod subclass with its "
                         f"combine, as tests/toy_method.py)")
    taken = {c for m in METHODS.values() for c in m.columns} & set(method.columns)
    if taken:
        raise ValueError(f"score method {method.name!r}: columns {sorted(taken)} already belong to another method")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a plug-in method (built-ins stay)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in score method")
    METHODS.pop(name)


for _module in BUILTIN:
    register(importlib.import_module(f"pruner.scores.methods.{_module}").METHOD)
