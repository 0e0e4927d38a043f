"""Trains the small CNN behind the offline `fd_digits` metric and writes its weights file.

  python -m atdiff_jax.tools.train_digits_classifier [--out PATH] [--steps 3000]

The embedded digits (1797 images) are split once with a fixed seed into 1497 training and
300 held-out images; the network trains on the first part only (with random 1-pixel
shifts, so that it does not rely on exact stroke positions) and its accuracy on the
held-out part is printed and stored in the file. Deterministic for a given seed; takes
well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atdiff_jax.data import load_digits_source
from atdiff_jax.metrics import digits_fd

_DEFAULT_OUT = (pathlib.Path(__file__).resolve().parent.parent / 'assets' /
                digits_fd.ASSET_NAME)
NUM_HELDOUT = 300


def split_digits(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray],
                                         tuple[np.ndarray, np.ndarray]]:
  """((train images, labels), (held-out images, labels)) of the embedded digits."""
  source = load_digits_source()
  order = np.random.default_rng(seed).permutation(len(source))
  train, heldout = order[NUM_HELDOUT:], order[:NUM_HELDOUT]
  return source.get(np.sort(train)), source.get(np.sort(heldout))


def _random_shift(rng: jax.Array, x: jax.Array) -> jax.Array:
  """Shifts each image by -1..1 pixels in each direction (zero fill = background -1)."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (n, 2), 0, 3)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, x.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0) -> tuple[dict, float]:
  """Returns (params, held-out accuracy)."""
  (train_x, train_y), (test_x, test_y) = split_digits(seed)
  model = digits_fd.DigitsClassifier()
  x_all = digits_fd.to_model_input(train_x)
  y_all = jnp.asarray(train_y)
  params = model.init(jax.random.key(seed), x_all[:1])['params']
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, rng):
    index_key, shift_key = jax.random.split(rng)
    index = jax.random.randint(index_key, (batch_size,), 0, x_all.shape[0])
    x = _random_shift(shift_key, x_all[index])
    grads = jax.grad(loss_fn)(params, x, y_all[index])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  root = jax.random.key(seed + 1)
  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.fold_in(root, i))
  logits = model.apply({'params': params}, digits_fd.to_model_input(test_x))[1]
  accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_y))
  return params, accuracy


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  params, accuracy = train_classifier(args.steps, seed=args.seed)
  # The float16 copy is what ships: report the accuracy of that copy.
  params16 = jax.tree.map(lambda a: np.asarray(np.asarray(a, np.float16), np.float32), params)
  _, test = split_digits(args.seed)
  logits = digits_fd.DigitsClassifier().apply(
      {'params': params16}, digits_fd.to_model_input(test[0]))[1]
  accuracy16 = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test[1]))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  digits_fd.save_weights(str(args.out), params, accuracy16,
                         source=f'train_digits_classifier seed={args.seed} steps={args.steps}')
  print(f'held-out accuracy {accuracy:.4f} (float32), {accuracy16:.4f} (float16, as '
        f'shipped) on {NUM_HELDOUT} images; wrote {args.out} '
        f'({args.out.stat().st_size / 1024:.0f} KB)')


if __name__ == '__main__':
  main()
