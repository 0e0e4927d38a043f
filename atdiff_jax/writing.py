"""Results on disk and on the page: files replaced whole, markdown tables, figures.

Every file this project writes outside a checkpoint (configs, reports, sample shards,
reference statistics, plots) goes through `replacing`: it is written beside its final path
and renamed over it, so a reader, or a run killed half-way, never sees half a file.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """A temporary path beside `path`, with its extension (numpy and matplotlib pick the
  format by it), renamed over `path` when the block ends; removed if the block fails."""
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path: str, text: str) -> None:
  """`text` to `path`, replaced whole."""
  with replacing(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def save_figure(figure, path: str) -> None:
  """A matplotlib Figure as PNG, replaced whole."""
  figure.tight_layout()
  with replacing(path) as tmp:
    figure.savefig(tmp)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   fmt: Callable[[Any], str] = str, numbers_right: bool = False) -> list[str]:
  """Markdown table lines; `fmt` turns each value into its cell; with `numbers_right`, every
  column but the first is right-aligned."""
  rule = ['---'] + [('---:' if numbers_right else '---')] * (len(header) - 1)
  lines = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join(rule) + ' |']
  return lines + ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
