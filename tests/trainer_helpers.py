"""Tiny training set-ups shared by the trainer, distributed and resume tests: generated images with captions, the
stage-1 processor as collator, tiny stage-1 and stage-2 models and short training arguments."""

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from modeling_blip2 import (
    Blip2BridgeTrainer,
    Blip2BridgeForConditionalGeneration,
    Blip2BridgeImageProcessor,
    Blip2BridgeModel,
    Blip2BridgeProcessor,
)
from modeling_blip2.training import Blip2BridgeTrainingArguments
from transformers import BertTokenizer

from tests.helpers import BERT_SPECIAL_TOKENS, CAPTIONS
from tests.tiny_models import NUM_QUERY_TOKENS, TEXT_CONFIGS, VISION_CONFIG, tiny_config, tiny_stage2_config

IMAGE_SIZE = VISION_CONFIG["image_size"]


def caption_image(index: int) -> Image.Image:
    """An image that only caption `index` describes: its own colour and stripe pattern, plus a little noise."""
    rng = np.random.default_rng(index)
    colour = rng.integers(0, 256, 3)
    pixels = np.tile(colour, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float64)
    pixels[:: 2 + index % 4] = 255 - colour  # stripes every 2 to 5 rows
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class CaptionedImages(Dataset):
    """`size` samples cycling over the 8 test captions, each with its own generated image."""

    def __init__(self, size: int = len(CAPTIONS)):
        self.size = size
        self.images = [caption_image(index) for index in range(len(CAPTIONS))]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"image": self.images[index % len(CAPTIONS)], "text": CAPTIONS[index % len(CAPTIONS)]}


class Stage1Collator:
    """Samples -> the stage-1 processor's pixel_values, input_ids and attention_mask."""

    def __init__(self, processor: Blip2BridgeProcessor):
        self.processor = processor

    def __call__(self, samples):
        return dict(self.processor(images=[s["image"] for s in samples], text=[s["text"] for s in samples]))


def caption_tokenizer() -> BertTokenizer:
    """A BERT tokenizer whose vocabulary is the captions' words in sorted order, [DEC] last.

    Unlike a trained vocabulary (whose tie order varies from call to call), every process builds the same ids, as
    the distributed and resume tests need.
    """
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate([*BERT_SPECIAL_TOKENS, *words])})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def stage1_setup(seed: int = 0, **config_overrides):
    """A tiny stage-1 model whose Q-Former vocabulary is a tokenizer trained on the captions, and its collator."""
    tokenizer = caption_tokenizer()
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                     tokenizer)
    config = tiny_config(**config_overrides)
    qformer_config = config.qformer_config
    qformer_config.vocab_size = len(tokenizer)
    qformer_config.bos_token_id = tokenizer.bos_token_id
    qformer_config.sep_token_id = tokenizer.sep_token_id
    qformer_config.pad_token_id = tokenizer.pad_token_id
    qformer_config.max_position_embeddings = 32
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Blip2BridgeModel(config), Stage1Collator(processor)


def stage1_trainer(tmp_path, model=None, collator=None, dataset_size=8, **overrides):
    """A trainer of `stage1_setup`'s model (or `model` with `collator`) on `dataset_size` captioned images."""
    if model is None:
        model, collator = stage1_setup()
    args = tiny_training_arguments(tmp_path, **overrides)
    return Blip2BridgeTrainer(model=model, args=args, train_dataset=CaptionedImages(dataset_size),
                              data_collator=collator)


STAGE2_VOCAB_SIZE = 64
STAGE2_IMAGE_TOKEN_ID = STAGE2_VOCAB_SIZE - 1
STAGE2_NUM_QUERY_TOKENS = NUM_QUERY_TOKENS
# Dropout 0.1, so that eval mode of the frozen LLM matters, and large random weights, so that the frozen LLM's output
# depends on its soft prompt (at OPT's 0.02 it predicts a near-uniform distribution whatever the queries say).
OPT_OVERRIDES = dict(vocab_size=STAGE2_VOCAB_SIZE, dropout=0.1, init_std=0.5)
OPT_CONFIG = dict(TEXT_CONFIGS["opt"], **OPT_OVERRIDES)


def tiny_stage2_model(seed: int = 0) -> Blip2BridgeForConditionalGeneration:
    """A stage-2 model over a tiny OPT (dropout 0.1, so that eval mode of the frozen LLM matters) and the stage-1 tiny
    Q-Former (`tiny_config`'s)."""
    config = tiny_stage2_config(
        "opt",
        qformer_config={**tiny_config().qformer_config.to_dict(), "use_text_input": False},
        text_overrides=OPT_OVERRIDES,
        image_token_id=STAGE2_IMAGE_TOKEN_ID,
        initializer_range=0.2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Blip2BridgeForConditionalGeneration(config)


class Stage2Captions(Dataset):
    """Generated images whose caption, in OPT token ids, depends on the image: the LLM must read the queries."""

    def __init__(self, size: int = 8, caption_length: int = 6):
        rng = np.random.default_rng(0)
        self.images = [caption_image(index) for index in range(size)]
        self.captions = rng.integers(3, STAGE2_IMAGE_TOKEN_ID, (size, caption_length))
        self.image_processor = Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "caption_ids": self.captions[index]}


def stage2_collator(samples):
    """[image placeholders; BOS; caption] with labels on the caption (and its first token predicted from BOS)."""
    image_processor = Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pixel_values = image_processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
    captions = torch.tensor(np.stack([s["caption_ids"] for s in samples]))
    batch_size = captions.shape[0]
    prefix = torch.full((batch_size, STAGE2_NUM_QUERY_TOKENS), STAGE2_IMAGE_TOKEN_ID)
    bos = torch.full((batch_size, 1), OPT_CONFIG["bos_token_id"])
    input_ids = torch.cat([prefix, bos, captions], dim=1)
    labels = torch.cat([torch.full((batch_size, STAGE2_NUM_QUERY_TOKENS + 1), -100), captions], dim=1)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels}


def tiny_training_arguments(output_dir, **overrides) -> Blip2BridgeTrainingArguments:
    """Short CPU runs: no reports, no saving unless asked, a fixed seed, the batch order kept as the dataset's."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.05,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return Blip2BridgeTrainingArguments(**kwargs)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
