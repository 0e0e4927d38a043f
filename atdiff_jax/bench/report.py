"""Benchmark results as markdown (a header and one table per part), ready for the README."""
from __future__ import annotations

from typing import Any

from atdiff_jax.writing import markdown_table

_PEAK_LABELS = {'device_peak': 'device peak', 'host_peak_rss': 'process peak RSS'}


def _sig(x: float, digits: int = 3) -> str:
  """`x` with about `digits` significant digits, no exponent for everyday magnitudes."""
  if x == 0:
    return '0'
  if abs(x) >= 10 ** (digits - 1):
    return f'{x:,.0f}'
  return f'{x:.{digits}g}'


def _ratio(row: dict, metric: str) -> str:
  return f'{row["ratio_to_none"][metric]:.2f}×'


def _mib(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / 2**20:,.1f}'


def _peak_label(rows: list[dict]) -> str:
  kinds = {r['peak_memory']['kind'] for r in rows}
  return ' / '.join(_PEAK_LABELS.get(k, k) for k in sorted(kinds))


def format_header(env: dict[str, Any], num_params: int | None = None,
                  steps: int | None = None, warmup: int = 0, repeats: int = 1) -> str:
  """Where the numbers come from: backend, devices, versions, config, batch, timing."""
  shape = 'x'.join(str(d) for d in env['image_shape'])
  lines = [
      f'### atdiff_jax benchmark: {env["config"] or "config"}',
      '',
      f'- backend: {env["backend"]}, {env["device_count"]} x {env["device_kind"]} '
      f'({env["process_count"]} process{"es" if env["process_count"] > 1 else ""})',
      f'- JAX {env["jax_version"]}, Flax {env["flax_version"]}, Python {env["python_version"]}',
      f'- images {shape}, batch {env["batch_size"]} ({env["per_device_batch"]:g} per device), '
      f'model dtype {env["model_dtype"]}'
      + (f', {num_params / 1e6:.2f}M params' if num_params is not None else ''),
  ]
  if steps is not None:
    best = f'best of {repeats} rounds of ' if repeats > 1 else ''
    lines.append(f'- time per call: {best}{steps} back-to-back calls, rounds visiting every '
                 f'variant in turn, after {warmup} warm-up call(s); synthetic data')
  return '\n'.join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """The first column left-aligned, the numbers right-aligned."""
  return markdown_table(header, rows, numbers_right=True)


def _memory_cells(row: dict) -> list[str]:
  """XLA's per-device footprint of the compiled program, and the peak memory."""
  xla = row['xla_memory']
  return [_mib(xla and xla['footprint_bytes']), _mib(row['peak_memory']['bytes'])]


def format_train_table(result: dict[str, Any]) -> str:
  """One row per AT variant; (×) is the ratio to `none`."""
  rows = result['variants']
  peak = _peak_label(rows)
  header = ['AT variant', 'updates / call', 'compile (s)', 'ms / call', 'ms / update',
            'images / s', 'updates / s', 'MFU', 'XLA MiB / device', f'{peak} MiB']
  body = [[r['name'], str(r['updates_per_call']), f'{r["compile_s"]:.1f}',
           f'{_sig(r["s_per_call"] * 1e3)} ({_ratio(r, "s_per_call")})',
           f'{_sig(r["s_per_update"] * 1e3)} ({_ratio(r, "s_per_update")})',
           f'{_sig(r["images_per_s"])} ({_ratio(r, "images_per_s")})',
           f'{_sig(r["updates_per_s"])} ({_ratio(r, "updates_per_s")})',
           _percent(r.get('mfu'))] + _memory_cells(r)
          for r in rows]
  ref = result.get('reference')
  if ref:
    body.append([ref['name'], '1', '–',
                 f'{_sig(ref["s_per_call"] * 1e3)} ({_ratio(ref, "s_per_call")})',
                 f'{_sig(ref["s_per_update"] * 1e3)} ({_ratio(ref, "s_per_update")})',
                 f'{_sig(ref["images_per_s"])} ({_ratio(ref, "images_per_s")})',
                 f'{_sig(ref["updates_per_s"])} ({_ratio(ref, "updates_per_s")})',
                 'n/a', 'n/a', 'n/a'])
  flops = result.get('model_flops_per_image')
  peak_flops = result.get('peak_flops_per_device')
  mfu_note = (f'MFU: the model\'s {_sig(flops / 1e9)} GFLOP per image and pass (forward, '
              'backward, update: XLA\'s count of the `none` step) times the passes per call '
              '(free K, pgd K+1, fgsm 2), over the time per call and '
              + (f'the device\'s peak {_sig(peak_flops / 1e12)} TFLOP/s.' if peak_flops
                 else 'the device\'s peak, unknown here (--peak_tflops).')) if flops else (
                     'MFU: this backend has no FLOP count.')
  lines = _table(header, body) + [
      '',
      f'Train step, {result["num_params"] / 1e6:.2f}M params, global batch '
      f'{result["batch_size"]}; (×) = ratio to `none`. '
      'XLA MiB / device: arguments + outputs − donated + temporaries of the compiled step. '
      f'{peak[0].upper() + peak[1:]}: running maximum of the process, in the order above. '
      + mfu_note,
  ]
  if ref:
    lines += ['', reference_note(result)]
  return '\n'.join(lines)


def reference_note(result: dict[str, Any]) -> str:
  """The reference row's sentence: which step is faster, and by how much."""
  ref, none = result['reference'], result['variants'][0]
  ratio = ref['none_over_reference']
  faster = ('the reference is' if ratio > 1 else 'this project is') + (
      f' {max(ratio, 1 / ratio):.2f}× faster')
  return (f'Reference: {ref["name"]}, float32 on {ref["device"]}, same synthetic batch size, '
          f'{ref["num_params"]:,} params (this project\'s count: {result["num_params"]:,}, '
          'checked equal); its loss, AdamW update and EMA per call, rounds interleaved with '
          f'the variants\'. `none` / reference, time per update: '
          f'{_sig(none["s_per_update"] * 1e3)} / {_sig(ref["s_per_update"] * 1e3)} ms = '
          f'{ratio:.2f}: {faster}.')


def _percent(x: float | None) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def format_sample_table(result: dict[str, Any]) -> str:
  rows = result['samplers']
  header = ['sampler', 'NFE', 'compile (s)', 's / batch', 'images / s', 'ms / NFE',
            'XLA MiB / device', f'{_peak_label(rows)} MiB']
  body = [[r['name'], str(result['nfe']), f'{r["compile_s"]:.1f}', _sig(r['s_per_batch']),
           _sig(r['images_per_s']), _sig(r['s_per_nfe'] * 1e3)] + _memory_cells(r)
          for r in rows]
  note = f'Sampling, batch {result["batch_size"]}, random-init params.'
  return '\n'.join(_table(header, body) + ['', note])


def format_inception_table(result: dict[str, Any]) -> str:
  label = _PEAK_LABELS.get(result['peak_memory']['kind'], result['peak_memory']['kind'])
  size = result['input_size']
  header = ['Inception features', 'batch', 'first call (s)', 's / batch', 'images / s',
            f'{label} MiB']
  row = [f'{size}x{size} uint8 -> {result["resized_to"]}, {result["weights"]} weights',
         str(result['batch_size']), f'{result["first_call_s"]:.1f}',
         _sig(result['s_per_batch']), _sig(result['images_per_s']),
         _mib(result['peak_memory']['bytes'])]
  return '\n'.join(_table(header, [row]) + [
      '', 'Host uint8 images in, host features out; first call includes compiling.'])


def format_fid_table(result: dict[str, Any]) -> str:
  label = _PEAK_LABELS.get(result['peak_memory']['kind'], result['peak_memory']['kind'])
  header = ['FID pipeline', 'samples', 'batch', 'first batch (s)', 'seconds', 'images / s',
            '50k extrapolated (s)', f'{label} MiB']
  row = [f'{result["sampler"]} NFE {result["nfe"]} + Inception ({result["weights"]} weights)',
         f'{result["num_samples"]:,}', str(result['batch_size']), f'{result["compile_s"]:.1f}',
         f'{result["seconds"]:.1f}', _sig(result['images_per_s']),
         f'{result["extrapolated_50k_s"]:.0f}', _mib(result['peak_memory']['bytes'])]
  return '\n'.join(_table(header, [row]) + [
      '', 'Sampling (random-init U-Net), uint8 to the host, Inception features and the '
      '2048-d Frechet distance, as one eval cell runs them; the first batch compiles and is '
      'not timed.'])


def format_sweep_table(result: dict[str, Any]) -> str:
  """Seconds per run, programs built per run against once a process."""
  per_run, once = result['per_run_s'], result['once_s']
  header = ['run', 'programs built afresh (before, s)', 'programs reused (now, s)', 'speed-up']
  body = [[str(i + 1) + (' (first: compiles)' if i == 0 else ''), f'{a:.1f}', f'{b:.1f}',
           f'{a / max(b, 1e-9):.2f}x'] for i, (a, b) in enumerate(zip(per_run, once))]
  # An experiment pays the first run's fresh time once, then every run's reused time.
  before = sum(per_run)
  now = per_run[0] + sum(once[1:])
  return '\n'.join(_table(header, body) + [
      '', f'Scoring one network\'s checkpoints, {len(result["cells"])} cells of '
      f'{result["num_samples"]} samples each ({", ".join(result["cells"])}), persistent XLA '
      f'cache on (as the experiment has it). Each run is scored both ways back to back. '
      f'{len(per_run)} runs: {before:.1f} s before, {now:.1f} s now ({before / now:.2f}x).'])


def format_dispatch_table(result: dict[str, Any]) -> str:
  """Host milliseconds per minibatch for the state alone, by minibatches per call."""
  header = ['minibatches per call', 'ms per call', 'ms per minibatch',
            'floor vs 1 per call']
  body = [[f'{r["minibatches_per_call"]}{" (scan)" if r["scan"] else " (plain)"}',
           f'{r["ms_per_call"]:.2f}', f'{r["ms_per_minibatch"]:.3f}',
           f'{r["floor_ratio"]:.1f}x lower' if r['scan'] else 'baseline']
          for r in result['rows']]
  return '\n'.join(_table(header, body) + [
      '', f'The dispatch floor: a step that does no device work over the real train state '
      f'({result["state_arrays"]:,} arrays, donated), best of {result["repeats"]} rounds of '
      f'{result["calls"]} calls. Plain: the one-minibatch program (training.'
      f'minibatches_per_call = 1); scan: that many minibatches per call.'])


def format_side_by_side_table(result: dict[str, Any]) -> str:
  """images/s of the `none` step: one process on all cores, then workers side by side."""
  one, side = result['one_process'], result['side_by_side']
  header = ['processes', 'cores each', 'images/s each', 'images/s in all', 'vs one process']
  body = [['1', str(len(one['cores'])), _sig(one['images_per_s']), _sig(one['images_per_s']),
           '1.00x'],
          [str(len(side)), ', '.join(sorted({str(len(r['cores'])) for r in side})),
           ', '.join(_sig(r['images_per_s']) for r in side),
           _sig(result['total_images_per_s']), f'{result["ratio"]:.2f}x']]
  return '\n'.join(_table(header, body) + [
      '', f'Train step `none`, global batch {result["batch_size"]}, median of '
      f'{result["repeats"]} rounds of {result["steps"]} calls per process; side by side, '
      'each worker is pinned to its share of the cores and all run at once (how '
      '`experiments.at_vs_standard --workers` runs a grid).'])
