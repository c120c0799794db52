"""blip2-bridge: BLIP-2 for the Hugging Face ecosystem. Importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .builders import build_stage1_model, build_stage2_model
from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .modeling_stage1 import Blip2BridgeModel, Blip2BridgeModelOutput
from .modeling_stage2 import (
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeForConditionalGenerationOutput,
)
from .modeling_qformer import Blip2BridgePreTrainedModel, Blip2BridgeQFormerModel
from .pipeline_image_to_text import Blip2BridgeImageToTextPipeline
from .processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor


AutoConfig.register(Blip2BridgeConfig.model_type, Blip2BridgeConfig, exist_ok=True)
AutoConfig.register(Blip2BridgeQFormerConfig.model_type, Blip2BridgeQFormerConfig, exist_ok=True)
AutoModel.register(Blip2BridgeConfig, Blip2BridgeModel, exist_ok=True)
AutoModel.register(Blip2BridgeQFormerConfig, Blip2BridgeQFormerModel, exist_ok=True)
AutoModelForPreTraining.register(Blip2BridgeConfig, Blip2BridgeModel, exist_ok=True)
AutoModelForImageTextToText.register(Blip2BridgeConfig, Blip2BridgeForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(Blip2BridgeConfig, slow_image_processor_class=Blip2BridgeImageProcessor, exist_ok=True)
AutoProcessor.register(Blip2BridgeConfig, Blip2BridgeProcessor, exist_ok=True)

__version__ = "0.1.0"

# The metrics import evaluate and datasets, and the trainer transformers' Trainer (seconds), which using the model
# never needs: both load on first access.
_METRICS = ("CaptionMetrics", "RetrievalRecall", "VQAAccuracy")


def __getattr__(name):
    if name in _METRICS:
        from . import metrics

        return getattr(metrics, name)
    if name == "Blip2BridgeTrainer":
        from .training import Blip2BridgeTrainer

        return Blip2BridgeTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Blip2BridgeConfig",
    "Blip2BridgeForConditionalGeneration",
    "Blip2BridgeForConditionalGenerationOutput",
    "Blip2BridgeImageProcessor",
    "Blip2BridgeImageToTextPipeline",
    "Blip2BridgeModel",
    "Blip2BridgeModelOutput",
    "Blip2BridgePreTrainedModel",
    "Blip2BridgeProcessor",
    "Blip2BridgeQFormerConfig",
    "Blip2BridgeQFormerModel",
    "Blip2BridgeTrainer",
    "CaptionMetrics",
    "RetrievalRecall",
    "VQAAccuracy",
    "build_stage1_model",
    "build_stage2_model",
]
