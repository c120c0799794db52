"""Benchmark metrics as `evaluate.Metric`s. Each module here is also a self-contained metric script that
`evaluate.load(<path to the .py file>)` can load offline."""

from .caption_metrics import CaptionMetrics
from .retrieval_recall import RetrievalRecall
from .vqa_accuracy import VQAAccuracy


__all__ = ["CaptionMetrics", "RetrievalRecall", "VQAAccuracy"]
