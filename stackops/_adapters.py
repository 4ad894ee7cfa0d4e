"""Layer adapters: how stackops reads and rebuilds other libraries' layer containers.

An adapter turns a container into a layout stackops grows directly (a list of layers, or a
[`stackops.Stack`][]) and builds the container back from the grown layout. Adapters for
haliax `Stacked`, penzai `Sequential`/`LayerStack` and Flax NNX `List`/`State` ship with
stackops; each imports its library only once a container of that library is seen.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from typing import Any

import equinox as eqx
import jax

from ._stack import Stack, raw_stack
from ._tree import static_equal

__all__ = ["AbstractLayerAdapter", "register_adapter", "find_adapter"]


class AbstractLayerAdapter(abc.ABC):
    """Teaches stackops one kind of layer container.

    `where` in [`stackops.grow`][] (and [`stackops.grow_opt_state`][]) may point at any
    container an adapter `handles`. stackops calls `unpack` to get the layers in a layout
    it grows itself, grows them, and calls `pack` with the grown layout to build the new
    container. The optimizer state's parameter-shaped subtrees go through the same adapter,
    so `unpack`/`pack` must also accept containers whose leaves are moments (or `None`).

    Methods to implement:

    - `handles(container) -> bool`: whether this adapter is for `container`.
    - `unpack(container)`: a `list` of layers, or a [`stackops.Stack`][] (array leaves with a
      leading layer axis). Layers must be plain pytrees of arrays: freeze any mutable
      parameter objects here.
    - `pack(container, layers)`: the container rebuilt around `layers` (the grown `list` or
      `Stack`, of a new depth). It must update every depth-dependent field (axis sizes,
      counts) and create fresh mutable objects, never reuse `container`'s.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import stackops as so

        class Blocks:  # a container that keeps its layers in a dict {"0": ..., "1": ...}
            def __init__(self, layers):
                self.layers = layers

        jax.tree_util.register_pytree_node(
            Blocks, lambda b: ((b.layers,), None), lambda _, c: Blocks(*c))

        class BlocksAdapter(so.AbstractLayerAdapter):
            def handles(self, container):
                return isinstance(container, Blocks)

            def unpack(self, container):
                return [container.layers[str(i)] for i in range(len(container.layers))]

            def pack(self, container, layers):
                return Blocks({str(i): layer for i, layer in enumerate(layers)})

        so.register_adapter(BlocksAdapter())
        blocks = Blocks({str(i): jnp.full((2,), float(i)) for i in range(2)})
        grown = so.grow(blocks, so.last_stack(block=1), where=lambda b: b)
        assert float(grown.layers["2"][0]) == 1.0
        ```
    """

    @abc.abstractmethod
    def handles(self, container: Any) -> bool:
        """Whether this adapter reads and rebuilds `container`."""

    @abc.abstractmethod
    def unpack(self, container: Any) -> list[Any] | Stack:
        """The layers of `container` as a list of layers or a [`stackops.Stack`][]."""

    @abc.abstractmethod
    def pack(self, container: Any, layers: list[Any] | Stack) -> Any:
        """`container` rebuilt around `layers` (grown by stackops)."""


_REGISTRY: list[AbstractLayerAdapter] = []


def register_adapter(adapter: AbstractLayerAdapter) -> AbstractLayerAdapter:
    """Register a layer adapter, consulted before the built-in ones (latest first).

    **Arguments:**

    - `adapter`: an instance of a subclass of [`stackops.AbstractLayerAdapter`][].

    **Returns:** the adapter (so the call can decorate an instantiation).

    !!! Example

        ```python
        import stackops as so

        class NoAdapter(so.AbstractLayerAdapter):
            def handles(self, container):
                return False

            def unpack(self, container):
                raise NotImplementedError

            def pack(self, container, layers):
                raise NotImplementedError

        assert isinstance(so.register_adapter(NoAdapter()), NoAdapter)
        ```
    """
    if not isinstance(adapter, AbstractLayerAdapter):
        raise TypeError(
            "register_adapter(adapter): expected an instance of a subclass of "
            f"stackops.AbstractLayerAdapter, got {adapter!r}."
        )
    _REGISTRY.insert(0, adapter)
    return adapter


def _module_of(x: Any) -> str:
    return type(x).__module__ or ""


class _HaliaxStacked(AbstractLayerAdapter):
    """haliax/levanter `Stacked`: a vmapped block whose `NamedArray`s carry the `Block` axis."""

    def handles(self, container: Any) -> bool:
        if "haliax" not in sys.modules or not _module_of(container).startswith("haliax"):
            return False
        from haliax.nn import Stacked

        return isinstance(container, Stacked)

    def _split(self, tree: Any):
        import haliax as hax

        is_named = lambda x: isinstance(x, hax.NamedArray)
        return jax.tree.flatten(tree, is_leaf=is_named), is_named

    def unpack(self, container: Any) -> Stack:
        (leaves, treedef), is_named = self._split(container.stacked)
        name = container.Block.name
        raw = []
        for leaf in leaves:
            if is_named(leaf):
                names = [ax.name for ax in leaf.axes]
                if name not in names:
                    raise ValueError(
                        f"haliax Stacked: a NamedArray with axes {leaf.axes} lacks the layer axis "
                        f"{name!r}; every leaf of a Stacked must carry it."
                    )
                if names.index(name) != 0:
                    leaf = leaf.rearrange((name, *[n for n in names if n != name]))
                raw.append(leaf.array)
            else:
                raw.append(leaf)
        layers = jax.tree.unflatten(treedef, raw)
        if not any(eqx.is_array(x) for x in raw):  # an optimizer state's masked-out subtree
            return raw_stack(layers, depth=container.Block.size)
        return Stack(layers)

    def pack(self, container: Any, layers: list[Any] | Stack) -> Any:
        import haliax as hax

        if not isinstance(layers, Stack) or (
            layers.order is not None and layers.order != tuple(range(len(layers.order)))
        ):
            raise ValueError(
                "haliax Stacked cannot express tied layers (a routing order): use a copying "
                "operator, or stackops.Stack."
            )
        (old_leaves, treedef), is_named = self._split(container.stacked)
        new_leaves = treedef.flatten_up_to(layers.layers)
        depth = len(layers)
        name = container.Block.name
        out = []
        for old, new in zip(old_leaves, new_leaves):
            if is_named(old) and new is not None:
                axes = [ax for ax in old.axes if ax.name != name]
                out.append(hax.NamedArray(new, (old.resolve_axis(name).resize(depth), *axes)))
            else:
                out.append(new)
        return dataclasses.replace(
            container,
            stacked=jax.tree.unflatten(treedef, out),
            Block=container.Block.resize(depth),
        )


class _PenzaiSequential(AbstractLayerAdapter):
    """penzai `Sequential` and `LayerStack`: mutable `Parameter`s, frozen for growth."""

    def handles(self, container: Any) -> bool:
        if "penzai" not in sys.modules or not _module_of(container).startswith("penzai"):
            return False
        from penzai import pz

        return isinstance(container, (pz.nn.Sequential, pz.nn.LayerStack))

    def unpack(self, container: Any) -> list[Any]:
        from penzai import pz

        frozen = pz.freeze_variables(container)
        if isinstance(container, pz.nn.Sequential):
            return [_plain(layer) for layer in frozen.sublayers]
        axis = container.stack_axis
        is_named = lambda x: isinstance(x, pz.nx.NamedArrayBase)
        return [
            _plain(
                jax.tree.map(
                    lambda a, i=i: _named_op(lambda x: x[{axis: i}], a)
                    if is_named(a) and axis in a.named_shape
                    else a,
                    frozen.stacked_sublayers,
                    is_leaf=is_named,
                )
            )
            for i in range(container.stack_axis_size)
        ]

    def pack(self, container: Any, layers: list[Any] | Stack) -> Any:
        from penzai import pz

        if not isinstance(layers, list):
            raise TypeError("penzai adapter: expected a list of layers.")  # pragma: no cover
        layers = [_unplain(layer) for layer in layers]
        # Mutable in, mutable out; a frozen tree (`pz.freeze_variables(model)`, or an optax
        # state built on one) stays frozen, so a grown state keeps the optimizer's types.
        finish = _unfreeze if _has_mutable_variables(container) else (lambda t: t)
        if isinstance(container, pz.nn.Sequential):
            used: set[Any] = set()
            relabelled = [_relabel(layer, used) for layer in layers]
            return finish(pz.nn.Sequential(relabelled))
        axis = container.stack_axis
        is_named = lambda x: isinstance(x, pz.nx.NamedArrayBase)
        frozen = pz.freeze_variables(container)
        has_axis = jax.tree.leaves(
            jax.tree.map(
                lambda a: is_named(a) and axis in a.named_shape,
                frozen.stacked_sublayers,
                is_leaf=is_named,
            )
        )
        per_layer = [jax.tree.leaves(layer, is_leaf=is_named) for layer in layers]
        treedef = jax.tree.structure(layers[0], is_leaf=is_named)
        stacked = [
            _named_op(lambda *xs: pz.nx.stack(list(xs), axis), *(lay[k] for lay in per_layer))
            if has
            else column[0]
            for k, (has, column) in enumerate(zip(has_axis, zip(*per_layer)))
        ]
        new = dataclasses.replace(
            frozen,
            stacked_sublayers=jax.tree.unflatten(treedef, stacked),
            stack_axis_size=len(layers),
        )
        return finish(new)


def _named_op(fn: Any, *arrays: Any) -> Any:
    """`fn(*arrays)` on penzai NamedArrays, also when they hold `jax.ShapeDtypeStruct`s
    (the abstract parameters `grow_opt_state` works with): then through `jax.eval_shape`."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(arrays)):
        return jax.eval_shape(fn, *arrays)
    return fn(*arrays)


class _Labelled:
    """A frozen penzai variable whose label is a leaf, not static data.

    Each layer's variables have their own labels; as leaves they do not make the layers'
    structures differ, and a copy carries its source's label until `pack` relabels it.
    """

    def __init__(self, value: Any, label: Any, rebuild: Any):
        self.value, self.label, self.rebuild = value, label, rebuild


jax.tree_util.register_pytree_node(
    _Labelled,
    lambda v: ((v.value, v.label), v.rebuild),
    lambda rebuild, children: _Labelled(children[0], children[1], rebuild),
)


class _Rebuild:
    """How to turn a `_Labelled` back into its variable value (type and metadata)."""

    def __init__(self, cls: type, metadata: Any):
        self.cls, self.metadata = cls, metadata

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Rebuild)
            and self.cls is other.cls
            and static_equal(self.metadata, other.metadata)
        )

    def __hash__(self) -> int:
        return hash(self.cls)


def _plain(layer: Any) -> Any:
    from penzai import pz

    return (
        pz.select(layer)
        .at_instances_of(pz.AbstractVariableValue)
        .apply(lambda v: _Labelled(v.value, v.label, _Rebuild(type(v), v.metadata)))
    )


def _unplain(layer: Any) -> Any:
    return jax.tree.map(
        lambda v: v.rebuild.cls(value=v.value, label=v.label, metadata=v.rebuild.metadata)
        if isinstance(v, _Labelled)
        else v,
        layer,
        is_leaf=lambda v: isinstance(v, _Labelled),
    )


def _relabel(layer: Any, used: set[Any]) -> Any:
    """Give the variables of `layer` labels not yet in `used` (copies get fresh labels)."""
    from penzai import pz

    def fresh(v):
        label, k = v.label, 1
        while label in used:
            label, k = f"{v.label}.copy{k}", k + 1
        used.add(label)
        return dataclasses.replace(v, label=label)

    return (
        pz.select(layer).at_instances_of(pz.AbstractVariableValue).apply(fresh)
    )


def _has_mutable_variables(tree: Any) -> bool:
    from penzai import pz

    return bool(pz.select(tree).at_instances_of(pz.AbstractVariable).count())


def _unfreeze(tree: Any) -> Any:
    """Every frozen variable value as a new mutable variable (never one of the input's)."""
    from penzai import pz

    return pz.select(tree).at_instances_of(pz.AbstractVariableValue).apply(
        lambda v: v.unfreeze_as_copy()
    )


class _NNXContainers(AbstractLayerAdapter):
    """Flax NNX `nnx.List` of modules and `nnx.State` with integer keys (from `nnx.split`)."""

    def handles(self, container: Any) -> bool:
        if "flax" not in sys.modules or not _module_of(container).startswith("flax"):
            return False
        from flax import nnx

        if isinstance(container, nnx.List):
            return True
        return isinstance(container, nnx.State) and _int_keys(container)

    def unpack(self, container: Any) -> list[Any]:
        from flax import nnx

        if isinstance(container, nnx.List):
            return list(container)
        return [container[k] for k in sorted(container.keys())]

    def pack(self, container: Any, layers: list[Any] | Stack) -> Any:
        from flax import nnx

        if not isinstance(layers, list):
            raise TypeError("nnx adapter: expected a list of layers.")  # pragma: no cover
        # NNX modules and variables are mutable: rebuild every layer (kept ones too) so the
        # grown model shares no module or variable object with the input.
        fresh = [jax.tree.map(lambda x: x, layer) for layer in layers]
        if isinstance(container, nnx.List):
            return nnx.List(fresh)
        return nnx.State({i: layer for i, layer in enumerate(fresh)})


def _int_keys(state: Any) -> bool:
    keys = list(state.keys())
    return bool(keys) and all(isinstance(k, int) for k in keys)


_BUILTIN: list[AbstractLayerAdapter] = [_HaliaxStacked(), _PenzaiSequential(), _NNXContainers()]


def find_adapter(container: Any) -> AbstractLayerAdapter | None:
    """The first adapter (registered, then built-in) that handles `container`."""
    for adapter in (*_REGISTRY, *_BUILTIN):
        if adapter.handles(container):
            return adapter
    return None
