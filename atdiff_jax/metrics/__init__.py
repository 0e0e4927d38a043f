"""Sample-quality metrics: FID, sFID, precision / recall and Inception Score.

All use the FID Inception network. The Inception Score lives in
`atdiff_jax.metrics.inception_score` (function `inception_score`) and precision /
recall in `atdiff_jax.metrics.precision_recall` (function `precision_recall`);
neither is re-exported here, so that the functions do not shadow their modules.
"""
from atdiff_jax.metrics.features import (inception_outputs, load_feature_fn, make_feature_fn,
                                         preprocess, tf_bilinear_resize)
from atdiff_jax.metrics.fid import (ReferenceStats, RunningFeatureStats, feature_stats,
                                    fid_from_features, frechet_distance, load_stats, save_stats)

__all__ = [
    'ReferenceStats', 'RunningFeatureStats', 'feature_stats', 'fid_from_features',
    'frechet_distance', 'inception_outputs', 'load_feature_fn', 'load_stats', 'make_feature_fn',
    'preprocess', 'save_stats', 'tf_bilinear_resize',
]
