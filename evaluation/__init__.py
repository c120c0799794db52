"""Benchmark evaluation (VQAv2, OK-VQA, GQA, COCO and NoCaps captioning, Flickr30K and COCO retrieval).

Separate from the model code: nothing in `modeling_blip2`'s model modules imports it.
"""

from .runner import TASKS, GenerationSettings, evaluate

__all__ = ["TASKS", "GenerationSettings", "evaluate"]
