"""The dispatch floor: host time per minibatch that the train state alone costs.

Every call of the train step takes the whole donated state in and hands a new one out:
some 600 arrays for the quickstart, 2,000 for an ADM. On a fast accelerator that host work
is a visible part of a step. This part runs the real step wrapper (`map_minibatches`: the
shard_map, the scan over stacked minibatches, the donation) around a body that does no
device work, over the config's real initial state, and reports the host time per
minibatch with one minibatch per call (the plain program training runs by default; also
through the scan, to separate the two) and with several (training.minibatches_per_call).
Nothing is computed, so the numbers are the floor that any step of that state pays.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from atdiff_jax import parallel
from atdiff_jax.bench import common
from atdiff_jax.bench import train as bench_train
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import TrainParts, create_train_state, map_minibatches


def _pass_through(state, images, labels, frozen):
  """A step body that does no device work: the state passes through, the counter moves."""
  del labels, frozen
  return state.replace(step=state.step + 1), {'loss': jnp.mean(images[:1, :1, :1, :1])}


def bench_dispatch(config: ml_collections.ConfigDict, per_call: Sequence[int] = (1, 4, 16),
                   calls: int = 20, repeats: int = 3, mesh: Mesh | None = None,
                   log=None) -> dict[str, Any]:
  """Host milliseconds per minibatch for each count of minibatches per call.

  Result: {'state_arrays', 'calls', 'repeats', 'rows': [per program: minibatches_per_call,
  scan (False for the plain one-minibatch program, the first row), ms_per_call (best
  round), ms_per_minibatch, floor_ratio (the plain program's ms per minibatch over this
  one's)]}.
  """
  mesh = make_mesh() if mesh is None else mesh
  per_call = sorted({int(m) for m in per_call})
  if not per_call or per_call[0] < 1:
    raise ValueError(f'minibatches per call must be >= 1, got {per_call}')
  parts = TrainParts.build(config)
  state = create_train_state(config, mesh, parts)
  host_state = jax.device_get(state)
  del state
  replicated = parallel.replicated(mesh)
  step = map_minibatches(_pass_through, mesh)
  programs = [(1, False)] + [(count, True) for count in per_call]
  starts = []
  for count, scan in programs:
    if log:
      log(f'dispatch: {count} minibatch(es) per call{", scan" if scan else ""}')
    batch = bench_train.synthetic_batch(config, mesh, stack=count if scan else None)

    def start(batch=batch):
      holder = [jax.device_put(host_state, replicated)]

      def call():
        holder[0], metrics = step(holder[0], batch)
        return metrics

      common.warm_up(call, 2)  # the first call compiles
      return call

    starts.append(start)
  rows = []
  for (count, scan), times in zip(programs, common.round_robin(starts, calls, repeats)):
    ms_per_call = 1e3 * min(times)
    rows.append({'minibatches_per_call': count, 'scan': scan, 'ms_per_call': ms_per_call,
                 'ms_per_minibatch': ms_per_call / count})
  for row in rows:
    row['floor_ratio'] = rows[0]['ms_per_minibatch'] / row['ms_per_minibatch']
  return {'state_arrays': len(jax.tree.leaves(host_state)), 'calls': calls,
          'repeats': repeats, 'rows': rows}
