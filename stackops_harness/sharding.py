"""One mesh over every device, FSDP shardings for parameters, and sharded batches.

The mesh has a single axis, `data`, over all devices of all processes. Batches are split
over it by rows. Parameters and optimizer moments are sharded FSDP-style: a leaf with at
least `min_size` elements is split along its largest dimension that the axis divides, and
smaller leaves are replicated. Inside a [`stackops.Stack`][] the leading layer axis is never
sharded, because growth changes its length.

The same code runs on one CPU, simulated CPU devices, one GPU, a TPU slice or several
processes: only the number of devices behind the `data` axis changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import stackops as so

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "fsdp_spec",
    "fsdp_shardings",
    "stacked_leaves",
    "batch_sharding",
    "replicated",
    "shard_rows",
    "local_rows",
    "check_divisible",
    "initialize_distributed",
]

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (`"data"`) over `devices` (default: every device of every process).

    The axis type is `Auto`, so `with_sharding_constraint` and `jit`'s shardings work as in
    classic JAX. Devices are ordered so that each process holds a contiguous run of the axis,
    which is what per-process batches (`jax.make_array_from_process_local_data`) need.

    !!! Example

        ```python
        import jax

        mesh = make_mesh()
        assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
        ```
    """
    if devices is None:
        devices = jax.devices()
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if not devices:
        raise ValueError("make_mesh: no devices given.")
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of `mesh`.

    !!! Example

        ```python
        assert replicated(make_mesh()).is_fully_replicated
        ```
    """
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the data axis, everything else whole.

    !!! Example

        ```python
        from jax.sharding import PartitionSpec

        assert batch_sharding(make_mesh()).spec == PartitionSpec("data")
        ```
    """
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fsdp_spec(
    shape: Sequence[int], axis_size: int, *, min_size: int = 2**14, stacked: bool = False
) -> PartitionSpec:
    """The FSDP rule for one leaf: shard its largest dimension divisible by `axis_size`.

    Leaves smaller than `min_size` elements, or with no divisible dimension, are
    replicated (`PartitionSpec()`). With `stacked=True` (a leaf inside a `Stack`) the
    leading layer axis is never chosen.

    !!! Example

        ```python
        from jax.sharding import PartitionSpec

        assert fsdp_spec((4, 128, 384), 8, stacked=True) == PartitionSpec(None, None, "data")
        assert fsdp_spec((32,), 8) == PartitionSpec()
        ```
    """
    shape = tuple(int(d) for d in shape)
    n, skip_axis0 = axis_size, stacked
    size = int(np.prod(shape)) if shape else 1
    if n <= 1 or min_size <= 0 or size < min_size:
        return PartitionSpec()
    start = 1 if skip_axis0 else 0
    candidates = [(shape[i], -i) for i in range(start, len(shape)) if shape[i] % n == 0]
    if not candidates:
        return PartitionSpec()
    _, neg_axis = max(candidates)
    spec: list[str | None] = [None] * len(shape)
    spec[-neg_axis] = DATA_AXIS
    return PartitionSpec(*spec)


def stacked_leaves(tree: Any) -> Any:
    """Which leaves of `tree` carry a leading layer axis: those inside a [`stackops.Stack`][].

    The one walk that the decay mask and the FSDP shardings share. Works for the model, its
    parameters, gradients, `eval_shape` trees and optax states that mirror them (their
    moments hold `Stack`s too).

    **Returns:** a pytree with the structure of `tree` and a `bool` at every leaf.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import stackops as so

        tree = {"embed": jnp.zeros((8, 4)), "blocks": so.stack([jnp.zeros(4)] * 3)}
        mask = stacked_leaves(tree)
        assert jax.tree.leaves(mask) == [True, False]   # "blocks" sorts before "embed"
        ```
    """
    is_stack = lambda x: isinstance(x, so.Stack)
    return jax.tree.map(
        lambda x: jax.tree.map(lambda _: True, x) if is_stack(x) else False, tree, is_leaf=is_stack
    )


def fsdp_shardings(tree: Any, mesh: Mesh, *, min_size: int = 2**14) -> Any:
    """`NamedSharding`s for every array leaf of `tree` (arrays or `ShapeDtypeStruct`s).

    A leaf with at least `min_size` elements is sharded over the data axis along its largest
    dimension divisible by the axis size (the first such on ties); other leaves are
    replicated. Leaves inside a [`stackops.Stack`][] never shard their leading layer axis.
    Works for the model, its gradients and any optax state that mirrors it.

    **Arguments:**

    - `tree`: a pytree (e.g. the model's parameters, or `eqx.filter_eval_shape` of them).
    - `mesh`: a mesh from [`make_mesh`][].
    - `min_size`: the smallest leaf to shard; `0` replicates everything.

    **Returns:** a pytree like `tree` with a `NamedSharding` in place of each array leaf.

    !!! Example

        ```python
        import jax, jax.numpy as jnp

        mesh = make_mesh()
        sh = fsdp_shardings({"w": jnp.zeros((64, 512)), "b": jnp.zeros(512)}, mesh, min_size=1024)
        # "w" is split along its 512 axis over every device; "b" is replicated.
        ```
    """
    n = mesh.shape[DATA_AXIS]

    def leaf(x: Any, stacked: bool) -> Any:
        if not hasattr(x, "shape"):
            return x
        return NamedSharding(mesh, fsdp_spec(x.shape, n, min_size=min_size, stacked=stacked))

    return jax.tree.map(leaf, tree, stacked_leaves(tree))


def check_divisible(rows: int, mesh: Mesh, name: str) -> None:
    """Raise a clear error unless `rows` splits evenly over the data axis and the processes.

    !!! Example

        ```python
        check_divisible(16, make_mesh(), "global_batch")
        ```
    """
    n = mesh.shape[DATA_AXIS]
    if rows % n:
        raise ValueError(
            f"TrainConfig.{name}={rows} is not divisible by the data axis ({n} devices): every "
            f"device takes the same number of rows, so use a multiple of {n}."
        )
    p = jax.process_count()
    if rows % p:
        raise ValueError(
            f"TrainConfig.{name}={rows} is not divisible by the {p} processes; use a multiple "
            f"of {p}."
        )


def shard_rows(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global array split by rows over the data axis, from this process's rows.

    Process `p` of `P` passes rows `[p * local, (p + 1) * local)` of the global batch
    (what `stackops_harness.data.make_train_iter` yields); with one process, the whole batch.

    !!! Example

        ```python
        import jax
        import numpy as np

        mesh = make_mesh()
        x = shard_rows(np.zeros((8, 33), np.int32), mesh)
        assert x.shape == (8 * jax.process_count(), 33)
        ```
    """
    sharding = batch_sharding(mesh)
    global_shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def local_rows(global_rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a batch that every process holds whole.

    !!! Example

        ```python
        import jax
        import numpy as np

        assert local_rows(np.arange(8)).shape == (8 // jax.process_count(),)
        ```
    """
    p, count = jax.process_index(), jax.process_count()
    n = global_rows.shape[0] // count
    return global_rows[p * n : (p + 1) * n]


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start `jax.distributed` if this is one of several processes; return whether it did.

    Values not given come from the environment: `STACKOPS_COORDINATOR` (`host:port`),
    `STACKOPS_NUM_PROCESSES`, `STACKOPS_PROCESS_ID`. On a cluster that JAX detects by itself
    (SLURM, Cloud TPU, Open MPI) pass `coordinator="auto"` and JAX fills everything in. On CPU
    the collectives run over gloo.

    !!! Example

        ```python
        # In each of two processes on one machine (process i of 2):
        #   initialize_distributed("127.0.0.1:12345", num_processes=2, process_id=i)
        # One process, nothing in the environment: nothing to start.
        assert initialize_distributed() is False
        ```
    """
    coordinator = coordinator or os.environ.get("STACKOPS_COORDINATOR")
    if num_processes is None and "STACKOPS_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["STACKOPS_NUM_PROCESSES"])
    if process_id is None and "STACKOPS_PROCESS_ID" in os.environ:
        process_id = int(os.environ["STACKOPS_PROCESS_ID"])
    if coordinator is None:
        if (num_processes or 1) > 1:
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address (host:port of "
                "process 0), e.g. --coordinator 10.0.0.1:1234."
            )
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError(
                "initialize_distributed: with a coordinator address, give num_processes and "
                "process_id too (or set STACKOPS_NUM_PROCESSES / STACKOPS_PROCESS_ID)."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    return True
