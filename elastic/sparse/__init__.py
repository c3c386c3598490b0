"""Former home of top-k; the names docs/compression.md gives, kept for scripts that use them.

Everything now lives in `elastic.codecs`.
"""

from __future__ import annotations

from elastic.codecs.selection import SelectionConfig, select_topk
from elastic.codecs.topk import TopKCompressor, break_even_density

__all__ = ["SelectionConfig", "TopKCompressor", "break_even_density", "select_topk"]
