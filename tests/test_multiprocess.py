"""Two processes x 4 CPU devices, started as launch/tpu_pod.sh and launch/multi_host.sh start
them on two hosts, train the same run as one process x 8 devices, resume it across both
processes, and sample and evaluate it as one process does."""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from atdiff_jax import checkpoint, evaluation, parallel, train
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.train_step import TrainParts, make_init_fn

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


def _cluster_env(tmp_path):
  return _env(tmp_path, 4) | {'COORDINATOR': f'127.0.0.1:{_free_port()}', 'NUM_HOSTS': '2'}


def _two_processes(workdir, tmp_path, num_steps=None, mode='train', extra=()):
  """Both ranks of launch/multi_host.sh; returns their outputs."""
  env = _cluster_env(tmp_path) | {'MODE': mode}
  steps = [] if num_steps is None else [f'--config.training.num_steps={num_steps}']
  procs = [subprocess.Popen(['bash', 'launch/multi_host.sh', 'configs/quickstart.py',
                             str(workdir), *ARGS, *steps, *extra],
                            env=env | {'HOST_RANK': str(rank)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    outs.append(out)
  return outs


# gcloud as the test's stand-in: runs the pod command on 2 local "workers", each with the
# rank a TPU VM's metadata would give it, and keeps each worker's output apart.
_FAKE_GCLOUD = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
assert args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in args, args
command = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
logs = os.environ['FAKE_POD_LOGS']
procs = []
for rank in range(2):
  with open(os.path.join(logs, f'worker{{rank}}.log'), 'w') as out:
    procs.append(subprocess.Popen(['bash', '-c', command], stdout=out,
                                  stderr=subprocess.STDOUT,
                                  env=dict(os.environ, HOST_RANK=str(rank))))
sys.exit(max(p.wait(timeout=240) for p in procs))
"""


def _tpu_pod(workdir, tmp_path, num_steps):
  """launch/tpu_pod.sh through the stand-in gcloud; returns both workers' outputs."""
  gcloud = tmp_path / 'gcloud'
  gcloud.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  env = _cluster_env(tmp_path) | {
      'GCLOUD': str(gcloud), 'TPU_NAME': 'test-pod', 'ZONE': 'nowhere',
      'REMOTE_DIR': os.getcwd(), 'REMOTE_PYTHON': sys.executable,
      'FAKE_POD_LOGS': str(tmp_path)}
  # An override with parentheses and a comma: the pod command must quote it for ssh.
  proc = subprocess.run(['bash', 'launch/tpu_pod.sh', 'configs/quickstart.py', str(workdir),
                         *ARGS, f'--config.training.num_steps={num_steps}'], env=env,
                        capture_output=True, text=True, timeout=300)
  outs = [(tmp_path / f'worker{rank}.log').read_text() for rank in (0, 1)]
  assert proc.returncode == 0, proc.stderr[-2000:] + outs[0][-3000:]
  return outs


def _final_state(workdir):
  config = checkpoint.load_config(str(workdir))
  abstract = jax.eval_shape(make_init_fn(config, TrainParts.build(config)), jax.random.key(0))
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
  first = _tpu_pod(workdir, tmp_path, num_steps=2)
  assert 'Model: ' in first[0] and '8 devices, 2 processes' in first[0], first[0][-2000:]
  # Only process 0 reports and writes; process 1 trains silently.
  assert 'step 2/2' in first[0] and 'step 2/2' not in first[1]
  # Each process loaded its own 8 rows of every global batch of 16, and only those.
  for rank, out in enumerate(first):
    match = re.search(rf'Process {rank}/2 loaded (\d+) images: rows {8 * rank}:{8 * rank + 8} '
                      'of each global batch of 16', out)
    assert match and int(match.group(1)) % 8 == 0 and int(match.group(1)) >= 16, out[-2000:]
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
  start = jax.device_get(jax.jit(make_init_fn(config, TrainParts.build(config)))(
      jax.random.key(config.seed)))
  for tree in ('params', 'ema_params'):
    flat = lambda state: np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(getattr(state, tree))])
    moved = np.linalg.norm(flat(theirs) - flat(start))
    assert moved > 0 and np.linalg.norm(flat(mine) - flat(theirs)) < 1e-2 * moved, tree

  # Sampling and the eval sweep in 2 processes give what 1 process x 8 devices gives.
  settings = {'sampler': 'ddim', 'nfe': 3, 'samplers': ('ddim',), 'nfes': (3,),
              'num_samples': 24, 'batch_size': 16, 'seed': 5}
  overrides = [f'--config.eval.{k}={v!r}' if isinstance(v, tuple) else f'--config.eval.{k}={v}'
               for k, v in settings.items()]
  sampled = _two_processes(workdir, tmp_path, mode='sample', extra=overrides)
  evaluated = _two_processes(workdir, tmp_path, mode='eval', extra=overrides)
  assert 'sample: step 4' in sampled[0] and 'sample:' not in sampled[1], sampled[0][-2000:]
  assert 'eval: done' in evaluated[0] and 'eval:' not in evaluated[1], evaluated[0][-2000:]
  config.eval.update(settings)
  run = evaluation.open_run(str(workdir), config, 'sample')
  images, _ = evaluation.load_samples(evaluation.default_out_dir(str(workdir), 'ddim', 3, 1.0))
  np.testing.assert_array_equal(images, evaluation.generate(
      run, 24, sampler='ddim', nfe=3, batch_size=16, seed=5,
      **eval_settings.options_of(config.eval, 'ddim')))
  mine = evaluation.evaluate(run, out_dir=str(tmp_path / 'eval_one_process'), verbose=False)
  with open(workdir / 'eval' / 'results.json') as f:
    theirs = json.load(f)['rows']
  assert len(theirs) == len(mine) == 1
  assert theirs[0]['fd_digits'] == pytest.approx(mine[0]['fd_digits'], rel=1e-5)
