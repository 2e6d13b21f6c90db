"""Metrics of a run, one module per concern; everything here imports torch and the standard library only.

``counts``      exact validation counts (top-k correct, loss sum) that add up over batches and ranks
``throughput``  per-update time, data wait, images/s and ETA
``lines``       the fixed-format progress lines of the main process
``jsonl``       the append-only JSONL writer and reader under ``metrics.jsonl``

What each record of ``metrics.jsonl`` holds, and the reader that resolves a resumed run's repeated
records, are in :mod:`goyal_recipe.records`.
"""

from .counts import EvalCounter, topk_correct
from .jsonl import JsonlWriter, iter_jsonl, read_jsonl
from .lines import format_duration, format_epoch_line, format_step_line
from .throughput import ThroughputMeter

__all__ = [
    "topk_correct",
    "EvalCounter",
    "JsonlWriter",
    "iter_jsonl",
    "read_jsonl",
    "ThroughputMeter",
    "format_duration",
    "format_step_line",
    "format_epoch_line",
]
