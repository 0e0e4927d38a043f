"""Writes guided-diffusion fixtures for tests/test_import_adm.py: small random UNetModels of
guided-diffusion itself, and their outputs, so the importer can be checked against it.

  pip install torch guided-diffusion-sdk   # guided-diffusion's own package (with --no-deps
                                          # if its blobfile requirement gets in the way)
  python -m atdiff_jax.tools.make_gd_fixtures --out=gd_fixtures
  ATDIFF_GD_FIXTURE=gd_fixtures python -m pytest tests/test_import_adm.py -k fixture

For each model X it writes X.pt (the state dict), X.json (its flags under
`create_model_and_diffusion_options`) and X_io.npz (x, t, y if class-conditional, and the
network's output `out`, all NCHW). Every weight is redrawn at random: guided-diffusion
initialises its output convolutions to zero, which would hide a wrong mapping behind zeros.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

_OUT = flags.DEFINE_string('out', None, 'The folder to write the fixtures to.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the weights and inputs.')
flags.mark_flag_as_required('out')

# Each covers a branch of the mapping: the attention orders, resampling by resblocks or by
# conv/avg-pool, class embeddings, learned sigma, heads by count or by width, and a decoder
# with other heads than the encoder (num_heads_upsample).
FIXTURES = {
    'cond_new_updown': dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult='1,2',
        attention_resolutions='8', num_head_channels=16, class_cond=True, learn_sigma=True,
        resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True),
    'uncond_legacy_conv': dict(
        image_size=16, num_channels=32, num_res_blocks=2, channel_mult='1,2,2',
        attention_resolutions='8,4', num_heads=4, num_heads_upsample=2, class_cond=False,
        learn_sigma=False, resblock_updown=False, use_scale_shift_norm=False,
        use_new_attention_order=False),
    'uncond_legacy_sigma': dict(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult='1,2',
        attention_resolutions='4', num_heads=2, class_cond=False, learn_sigma=True,
        resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=False),
}


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  from guided_diffusion import script_util

  os.makedirs(_OUT.value, exist_ok=True)
  torch.manual_seed(_SEED.value)
  for name, given in FIXTURES.items():
    options = script_util.model_and_diffusion_defaults()
    options.update(given)
    model, _ = script_util.create_model_and_diffusion(**options)
    model.eval()
    with torch.no_grad():
      for param in model.parameters():  # also the zero-initialised output convs
        param.copy_(torch.randn_like(param) * 0.2)
      size, batch = options['image_size'], 3
      x = torch.randn(batch, 3, size, size)
      t = torch.tensor([0, 417, 999])
      y = torch.tensor([3, 0, 999]) if options['class_cond'] else None
      out = model(x, t, y)
    torch.save(model.state_dict(), os.path.join(_OUT.value, f'{name}.pt'))
    with open(os.path.join(_OUT.value, f'{name}.json'), 'w') as f:
      json.dump({'create_model_and_diffusion_options': options}, f, indent=1)
    io = dict(x=x.numpy(), t=t.numpy(), out=out.numpy())
    if y is not None:
      io['y'] = y.numpy()
    np.savez(os.path.join(_OUT.value, f'{name}_io.npz'), **io)
    print(f'{name}: {sum(p.numel() for p in model.parameters()):,} params, '
          f'output {tuple(out.shape)}, |out| mean {out.abs().mean():.3f}')


if __name__ == '__main__':
  app.run(main)
