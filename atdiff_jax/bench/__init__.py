"""Speed and memory benchmarks: the train step under each AT variant, samplers, Inception,
the FID pipeline end to end, an evaluation sweep, the dispatch floor of the train state,
training side by side in one-core workers.

`python -m atdiff_jax.bench` is the command line; each part is also a plain function
returning JSON-ready dicts, and `report` turns them into markdown tables.
"""
from atdiff_jax.bench.common import environment
from atdiff_jax.bench.dispatch import bench_dispatch
from atdiff_jax.bench.fid_pipeline import bench_fid_pipeline
from atdiff_jax.bench.inception import bench_inception
from atdiff_jax.bench.report import (format_dispatch_table, format_fid_table, format_header,
                                          format_inception_table, format_sample_table,
                                          format_side_by_side_table, format_sweep_table,
                                          format_train_table)
from atdiff_jax.bench.sample import bench_sample
from atdiff_jax.bench.side_by_side import bench_side_by_side
from atdiff_jax.bench.sweep import bench_sweep
from atdiff_jax.samplers import SAMPLERS
from atdiff_jax.bench.train import (DEFAULT_VARIANTS, Variant, bench_train, parse_variants,
                                         variant_config)

__all__ = [
    'DEFAULT_VARIANTS',
    'SAMPLERS',
    'Variant',
    'bench_dispatch',
    'bench_fid_pipeline',
    'bench_inception',
    'bench_sample',
    'bench_side_by_side',
    'bench_sweep',
    'bench_train',
    'environment',
    'format_dispatch_table',
    'format_fid_table',
    'format_header',
    'format_inception_table',
    'format_sample_table',
    'format_side_by_side_table',
    'format_sweep_table',
    'format_train_table',
    'parse_variants',
    'variant_config',
]
