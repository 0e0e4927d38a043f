"""Data: image sources (embedded digits, .npz, image folder, TFDS) -> sharded batches."""
from atdiff_jax.data.batching import (epoch_order, flip_mask, global_batch_indices,
                                      load_host_batch, process_batch_slice,
                                      steps_per_epoch, to_uint8)
from atdiff_jax.data.sources import (ArraySource, FolderSource, ImageSource, TfdsSource,
                                     create_source, fit_image, load_digits_source)
from atdiff_jax.data.stream import BatchStream

__all__ = [
    'ArraySource', 'BatchStream', 'FolderSource', 'ImageSource',
    'TfdsSource', 'create_source', 'epoch_order', 'fit_image', 'flip_mask',
    'global_batch_indices', 'load_digits_source', 'load_host_batch',
    'process_batch_slice', 'steps_per_epoch', 'to_uint8',
]
