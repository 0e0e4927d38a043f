"""Inception Score from the FID network's logits.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y|x) the softmax over the 1008
logits of the `inception-2015-12-05` graph and p(y) the mean prediction within
a split. As in the reference implementations (improved-gan, TTUR, the ADM
evaluator): the logits are `pool3 @ W` without the classifier bias (the
network's default, see `InceptionV3.logits_bias`), the softmax runs over all
1008 outputs, the samples are cut into 10 consecutive splits (ADM: splits of
5000 out of 50000), and the score is the mean over splits (the std is
returned too).
"""
from __future__ import annotations

import numpy as np

NUM_SPLITS = 10


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, num_splits: int = NUM_SPLITS) -> tuple[float, float]:
  """(mean, std) over `num_splits` consecutive splits of (N, classes) logits, in float64."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f'expected (N, classes) logits, got shape {logits.shape}')
  if not 1 <= num_splits <= logits.shape[0]:
    raise ValueError(f'num_splits must be in [1, N={logits.shape[0]}], got {num_splits}')
  scores = []
  for part in np.array_split(_log_softmax(logits), num_splits):
    probs = np.exp(part)
    log_marginal = np.log(probs.mean(axis=0))
    # Classes with zero probability contribute 0 (p log p -> 0), never 0 * inf.
    kl = np.where(probs > 0, probs * (part - log_marginal), 0.0).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
