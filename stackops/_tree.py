"""Tree comparisons that never call a user's `__eq__`, and the copy-safety of non-array leaves.

Layers come from many libraries. Their static data is compared here structurally: Flax NNX
modules compare by identity, penzai's `NamedArray.__eq__` is an array operation, and a
NumPy array's `==` is elementwise, so `a == b` on user objects can be wrong or raise.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

__all__ = [
    "static_equal",
    "structure_difference",
    "unsafe_leaves",
    "is_layer_array",
]

_VALUE_TYPES = (type(None), bool, int, float, complex, str, bytes, range, slice, type(...))


def is_layer_array(x: Any) -> bool:
    """An array leaf (JAX or NumPy, typed PRNG keys included) or an abstract one."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def static_equal(a: Any, b: Any, _depth: int = 0) -> bool:
    """Structural equality of static data, without trusting user-defined `__eq__`."""
    if a is b:
        return True
    if _depth > 64 or type(a) is not type(b):
        return False
    if isinstance(a, _VALUE_TYPES) or isinstance(a, (np.dtype, np.generic, enum.Enum)):
        return bool(a == b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(static_equal(x, y, _depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(static_equal(a[k], b[k], _depth + 1) for k in a)
    if isinstance(a, (set, frozenset)):
        return bool(a == b)
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if eqx.is_array(a):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, functools.partial):
        return (
            static_equal(a.func, b.func, _depth + 1)
            and static_equal(a.args, b.args, _depth + 1)
            and static_equal(a.keywords, b.keywords, _depth + 1)
        )
    if isinstance(a, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return False  # distinct function objects: not provably the same
    if dataclasses.is_dataclass(a):
        fields = [f.name for f in dataclasses.fields(a)]
        return all(
            static_equal(getattr(a, f, None), getattr(b, f, None), _depth + 1) for f in fields
        )
    if hasattr(a, "__dict__") and not callable(a):
        return static_equal(vars(a), vars(b), _depth + 1)
    if hasattr(type(a), "__slots__"):
        slots = [s for c in type(a).__mro__ for s in getattr(c, "__slots__", ())]
        return all(
            static_equal(getattr(a, s, None), getattr(b, s, None), _depth + 1) for s in slots
        )
    try:  # hashable library values (e.g. jax's dtypes, named axes): trust only a real bool
        eq = a == b
    except Exception:  # noqa: BLE001
        return False
    return eq is True


def _describe(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _node_difference(a: Any, b: Any, path: str) -> str | None:
    """The first difference between treedefs `a` and `b` (node types and static data)."""
    ta, tb = a.node_data(), b.node_data()
    if (ta is None) != (tb is None):
        return f"{path or '<root>'}: a leaf in one layer is a subtree in the other"
    if ta is None:
        return None  # two leaves
    if ta[0] is not tb[0]:
        return f"{path or '<root>'}: node types differ ({ta[0].__name__} vs {tb[0].__name__})"
    if not static_equal(ta[1], tb[1]):
        return (
            f"{path or '<root>'} ({ta[0].__name__}): static fields differ "
            f"({_describe(ta[1])} vs {_describe(tb[1])})"
        )
    ca, cb = a.children(), b.children()
    if len(ca) != len(cb):
        return f"{path or '<root>'}: different numbers of children ({len(ca)} vs {len(cb)})"
    for i, (x, y) in enumerate(zip(ca, cb)):
        diff = _node_difference(x, y, f"{path}[{i}]")
        if diff is not None:
            return diff
    return None


def structure_difference(a: Any, b: Any, *, compare_values: bool = True) -> str | None:
    """Describe how pytrees `a` and `b` differ in structure, or return None if they do not.

    Compared: node types and static data (structurally, see `static_equal`), then each
    leaf: arrays by shape and dtype, other leaves (`compare_values=True`) by value.
    """
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    diff = _node_difference(ta, tb, "")
    if diff is not None:
        return diff
    if len(la) != len(lb):
        return f"tree structures differ ({len(la)} vs {len(lb)} leaves)"
    for (p, x), (_, y) in zip(la, lb):
        name = jax.tree_util.keystr(p) or "<root>"
        if is_layer_array(x) or is_layer_array(y):
            if not (is_layer_array(x) and is_layer_array(y)):
                return f"leaf {name} is an array in one layer and not in the other"
            sx, sy = (tuple(x.shape), x.dtype), (tuple(y.shape), y.dtype)
            if sx != sy:
                return f"leaf {name} has shape/dtype {sx} vs {sy}"
        elif compare_values and not static_equal(x, y):
            return f"non-array leaf {name} differs ({_describe(x)} vs {_describe(y)})"
    return None


def _copy_safe(x: Any) -> bool:
    if is_layer_array(x) or isinstance(x, _VALUE_TYPES):
        return True
    if isinstance(x, (np.dtype, np.generic, enum.Enum, type, frozenset)):
        return True
    if callable(x):
        return True  # functions and other callables: behaviour, not state
    if isinstance(x, tuple):
        return all(_copy_safe(y) for y in x)
    if dataclasses.is_dataclass(x) and type(x).__dataclass_params__.frozen:  # type: ignore[attr-defined,union-attr]
        return True
    try:
        hash(x)
    except TypeError:
        return False
    # Hashable objects with a writable `__dict__` (penzai's `Parameter`, Flax's mutable
    # variables) are mutable state in disguise.
    return not hasattr(x, "__dict__")


def unsafe_leaves(tree: Any) -> list[tuple[str, Any]]:
    """Non-array leaves that are mutable objects: a copy would share them with its source."""
    return [
        (jax.tree_util.keystr(p) or "<root>", x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if not _copy_safe(x)
    ]


def check_copyable(layers: Sequence[Any], what: str) -> None:
    """Refuse layers whose copies would share state with their sources."""
    for i, layer in enumerate(layers):
        if not any(is_layer_array(x) for x in jax.tree.leaves(layer)):
            raise ValueError(
                f"{what}: layer {i} ({type(layer).__name__}) has no array leaves, so a copy of it "
                "would share its weights with the source. Its parameters are probably mutable "
                "objects that JAX does not see into (penzai `Parameter`s, Flax variables): "
                "`import` the library before growing so stackops's adapter for it is used, "
                "register an adapter (stackops.register_adapter), or freeze the parameters "
                "first (penzai: `pz.freeze_params`)."
            )
        bad = unsafe_leaves(layer)
        if bad:
            path, leaf = bad[0]
            raise ValueError(
                f"{what}: layer {i} has a mutable non-array leaf at {path} "
                f"({type(leaf).__name__}); a copy would share it with its source. Make it an "
                "array or an immutable value, or register an adapter for its container "
                "(stackops.register_adapter)."
            )


def stack_leaves(trees: Sequence[Any], axis: int = 0) -> Any:
    """Stack same-structured trees leafwise (structure checked beforehand: no `==` on aux)."""
    import jax.numpy as jnp

    treedef = jax.tree.structure(trees[0])
    columns = zip(*(jax.tree.leaves(t) for t in trees))
    return jax.tree.unflatten(treedef, [jnp.stack(col, axis=axis) for col in columns])
