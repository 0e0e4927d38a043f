"""Data parallelism in one place: the mesh axis, the mesh and its shardings.

Batches are split over one mesh axis, 'data'; params and optimizer state are replicated.
Every module that shards a batch, reduces over devices or builds a mesh takes these names
from here.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all global devices) with the axis 'data'."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dimension split over the 'data' axis."""
  return NamedSharding(mesh, P(AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Several minibatches stacked on a leading axis (one compiled call runs them all): each
  minibatch split over 'data' as batch_sharding splits one."""
  return NamedSharding(mesh, P(None, AXIS))


def num_shards(mesh: Mesh) -> int:
  """How many pieces a batch is split into on `mesh`."""
  if AXIS not in mesh.axis_names:
    raise ValueError(f'mesh has axes {mesh.axis_names}; expected a {AXIS!r} axis')
  return mesh.shape[AXIS]
