"""Prompts sharded over the local JAX devices: the dual and its bias are sums over prompts, so each
device scans its own share of the prompt blocks and the sums meet in one all-reduce per pass.

Blocked scores are [C, B, ...] on one device and [D, C/D, B, ...] over D devices, the leading axis laid out over a
one-axis mesh ("prompts") with `jax.sharding.NamedSharding`; `dual.scan_blocks` vmaps its scan over that axis and
XLA's SPMD partitioner gives each device its slice. Multi-host runs go through `jax.distributed.initialize()` before
any JAX call (its documented set-up): `jax.local_devices()` is then this host's share, and nothing here is
home-made about it.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from can_jax.errors import InvalidArgumentError

AXIS = "prompts"


def device_count(devices: int | None = 1) -> int:
    """The number of local devices a solve with `devices` uses: None means all of them. The figure to record (the
    certificate's device count)."""
    available = jax.local_device_count()
    if devices is None:
        return available
    devices = int(devices)
    if not 1 <= devices <= available:
        raise InvalidArgumentError(f"devices must be between 1 and the {available} local JAX devices, got {devices}")
    return devices


def mesh(devices: int) -> Mesh:
    """A one-axis mesh over the first `devices` local devices."""
    return Mesh(jax.local_devices()[:devices], (AXIS,))


def place(blocks, devices: int):
    """Lays [D, C/D, B, ...] blocks out with their leading axis over `devices` devices (inside jit: a sharding
    constraint the partitioner follows; outside: a transfer)."""
    if devices <= 1:
        return blocks
    sharding = NamedSharding(mesh(devices), PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), blocks)
