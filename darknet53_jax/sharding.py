"""The device mesh and the placement of batches on it.

Every step runs over a one-axis mesh named ``data``: the state is replicated
and each batch is split along its first dimension over the devices of all
processes.
"""

import collections
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A one-axis ``data`` mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the state: a full copy on every device."""
  return NamedSharding(mesh, P())


def split_batch(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its first dimension split over the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, local_batch) -> Any:
  """Makes one global array per field from each process's local slice."""
  sharding = split_batch(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def device_prefetch(batches: Iterator, mesh: Mesh,
                    size: int = 2) -> Iterator:
  """Keeps ``size`` global batches in flight to the devices."""
  queue = collections.deque()
  for batch in batches:
    queue.append(global_batch(mesh, batch))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
