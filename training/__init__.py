"""Training: `Blip2BridgeTrainer` and the paper's recipe (`blip2_training_arguments`)."""

from .arguments import Blip2BridgeTrainingArguments, accelerate_config_path, blip2_training_arguments
from .trainer import Blip2BridgeTrainer, build_trainer

__all__ = [
    "Blip2BridgeTrainer",
    "Blip2BridgeTrainingArguments",
    "accelerate_config_path",
    "blip2_training_arguments",
    "build_trainer",
]
