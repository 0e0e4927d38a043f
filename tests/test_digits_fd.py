"""fd_digits: the shipped digits classifier and the Frechet distance in its features."""
import numpy as np
import pytest

from atdiff_jax import evaluation
from atdiff_jax.data import load_digits_source
from atdiff_jax.metrics import digits_fd
from atdiff_jax.metrics.fid import ReferenceStats, feature_stats
from atdiff_jax.tools import train_digits_classifier


@pytest.fixture(scope='module')
def digits():
  source = load_digits_source()
  return source, source.get(np.arange(len(source)))


@pytest.fixture(scope='module')
def extractor():
  return evaluation.digits_features()


def test_shipped_classifier_is_accurate_on_held_out_digits(extractor):
  _, meta = digits_fd.load_weights()
  _, (images, labels) = train_digits_classifier.split_digits()
  assert len(labels) == train_digits_classifier.NUM_HELDOUT
  features, logits = extractor(images)
  assert features.shape == (len(images), digits_fd.FEATURE_DIM)
  accuracy = np.mean(np.argmax(logits, axis=-1) == labels)
  assert accuracy >= 0.97
  assert accuracy == pytest.approx(meta['heldout_accuracy'], abs=1e-9)


def test_fd_digits_of_real_digits_is_small_and_of_noise_large(digits, extractor):
  source, (images, _) = digits
  reference = evaluation.reference_stats(source, extractor, batch_size=500)
  assert reference.num_images == len(source)
  itself = evaluation.compute_metrics(images, reference, extractor)
  assert set(itself) == {'fd_digits'}
  assert itself['fd_digits'] == pytest.approx(0.0, abs=1e-6)

  # Two disjoint halves of the real digits: only the small-sample bias separates them.
  half = ReferenceStats(*feature_stats(extractor(images[1::2])[0]))
  real = evaluation.compute_metrics(images[::2], half, extractor)['fd_digits']
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, images[::2].shape).astype(np.uint8)
  fake = evaluation.compute_metrics(noise, half, extractor)['fd_digits']
  blank = evaluation.compute_metrics(np.zeros_like(images[::2]), half, extractor)
  assert 0 < real < 20
  assert fake > 20 * real and blank['fd_digits'] > 20 * real


def test_float_images_are_quantised_like_saved_samples(digits, extractor):
  _, (images, _) = digits
  floats = images[:40].astype(np.float32) / 127.5 - 1.0
  floats += np.random.default_rng(1).uniform(-0.003, 0.003, floats.shape)  # < half a level
  np.testing.assert_allclose(extractor(floats)[0], extractor(images[:40])[0], atol=1e-6)
  with pytest.raises(ValueError, match=r'\(N, 8, 8, 1\)'):
    extractor(np.zeros((2, 16, 16, 1), np.uint8))
