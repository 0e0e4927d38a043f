"""Two processes x 4 CPU devices, started as launch/multi_host.sh starts them on two hosts,
train the same run as one process x 8 devices, and resume it across both processes."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from atdiff_jax import checkpoint, parallel, train
from atdiff_jax.models import create_model
from atdiff_jax.train_state import make_optimizer
from atdiff_jax.train_step import make_init_fn

ARGS = ['--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()',
        '--config.diffusion.num_timesteps=100', '--config.training.batch_size=16',
        '--config.training.log_every=1', '--config.training.checkpoint_every=2',
        '--config.training.sample_every=0', '--config.adv.method=free',
        '--config.adv.steps=2']


def _env(tmp_path, devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', PYTHONPATH=os.getcwd())
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / f'xla_cache_{devices}')
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, tmp_path, num_steps):
  """Both ranks of launch/multi_host.sh; returns their outputs."""
  env = _env(tmp_path, 4) | {'COORDINATOR': f'127.0.0.1:{_free_port()}', 'NUM_HOSTS': '2'}
  procs = [subprocess.Popen(['bash', 'launch/multi_host.sh', 'configs/quickstart.py',
                             str(workdir), *ARGS, f'--config.training.num_steps={num_steps}'],
                            env=env | {'HOST_RANK': str(rank)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    outs.append(out)
  return outs


def _final_state(workdir):
  config = checkpoint.load_config(str(workdir))
  abstract = jax.eval_shape(make_init_fn(config, create_model(config),
                                         make_optimizer(config.training)), jax.random.key(0))
  # On this process's first device: the checkpoint was written by another topology.
  here = parallel.replicated(parallel.make_mesh(jax.devices()[:1]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                          abstract)
  ckpt = checkpoint.Checkpointer(str(workdir), keep=10, async_save=False)
  try:
    return jax.device_get(ckpt.restore(abstract))
  finally:
    ckpt.close()


@pytest.mark.faults
def test_two_processes_train_and_resume_as_one(tmp_path):
  workdir = tmp_path / 'two_processes'
  first = _two_processes(workdir, tmp_path, num_steps=2)
  assert 'Model: ' in first[0] and '8 devices, 2 processes' in first[0], first[0][-2000:]
  # Only process 0 reports and writes; process 1 trains silently.
  assert 'step 2/2' in first[0] and 'step 2/2' not in first[1]
  resumed = _two_processes(workdir, tmp_path, num_steps=4)  # from the checkpoint at 2
  assert 'starting at minibatch 2' in resumed[0], resumed[0][-2000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']

  # The same run in this process, on 8 devices.
  config = checkpoint.load_config(str(workdir))
  config.training.multi_host = False
  theirs = jax.device_get(train.train(config, str(tmp_path / 'one_process')))
  mine = _final_state(workdir)
  assert int(mine.step) == 4 and int(mine.opt_step) == 8  # free AT, K=2
  # Gloo's cross-process sums round differently from one process's, and Adam turns that into
  # differences of ~1e-6 in params; another data split or key would differ by the whole
  # update. So: the two runs' updates agree to within 1% of their size.
  start = jax.device_get(jax.jit(make_init_fn(config, create_model(config), make_optimizer(
      config.training)))(jax.random.key(config.seed)))
  for tree in ('params', 'ema_params'):
    flat = lambda state: np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(getattr(state, tree))])
    moved = np.linalg.norm(flat(theirs) - flat(start))
    assert moved > 0 and np.linalg.norm(flat(mine) - flat(theirs)) < 1e-2 * moved, tree
