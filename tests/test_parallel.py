"""The mesh, its axis and its shardings (atdiff_jax.parallel)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from atdiff_jax import parallel


def test_mesh_and_shardings_split_the_batch_and_replicate_the_rest():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.AXIS,) and parallel.num_shards(mesh) == 8
  batch = jax.device_put(np.arange(32.0).reshape(16, 2), parallel.batch_sharding(mesh))
  assert [s.data.shape for s in batch.addressable_shards] == [(2, 2)] * 8
  np.testing.assert_array_equal(batch.addressable_shards[3].data, [[12, 13], [14, 15]])
  params = jax.device_put(np.arange(3.0), parallel.replicated(mesh))
  assert all(np.array_equal(s.data, [0, 1, 2]) for s in params.addressable_shards)
  assert parallel.num_shards(parallel.make_mesh(jax.devices()[:2])) == 2


def test_a_mesh_without_the_data_axis_is_named():
  other = Mesh(np.asarray(jax.devices()), ('batch',))
  with pytest.raises(ValueError, match=r"mesh has axes \('batch',\); expected a 'data' axis"):
    parallel.num_shards(other)
