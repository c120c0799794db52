"""Collators: lists of samples (dicts) in, model inputs out, for `Trainer(data_collator=...)`.

A sample holds an image (a path, bytes, a `datasets` Image value, a PIL image or an array) and its text. Images are
opened and decoded here, one sample at a time, so that an unreadable sample (missing file, truncated or corrupt data,
zero size) is dropped from its batch, counted in a `SkippedSamples` and named in a warning, while the rest of the
batch trains. Grayscale, transparent, CMYK and 16-bit images are not errors: the image processor converts them.

Stage 1 (`ImageCaptionCollator`) returns the Q-Former's inputs from the stage-1 processor. Stage 2 returns the LLM's
inputs with `num_query_tokens` image placeholders first, as transformers' `Blip2Processor` lays them out, and `labels`
that are -100 everywhere but on the target text (caption, answer or response) and the end-of-text token:

- decoder-only LLMs (`CaptionLMCollator`, `VQACollator`, `InstructionCollator`, `InstructionTuningCollator` with
  `is_encoder_decoder=False`):
  `[image placeholders] [BOS] prompt target [EOS] [padding]`, labels on `target [EOS]` only;
- encoder-decoder LLMs (`is_encoder_decoder=True`), as LAVIS's `Blip2T5.forward`: the placeholders and the prompt go to
  the encoder (`input_ids`), the target to the decoder (`labels`, padding -100, with `decoder_attention_mask`). For
  caption pre-training `CaptionLMCollator(split_captions=True)` cuts each caption at a random word, prefix to the
  encoder and suffix to the decoder, as the paper's prefix language modelling.

Instruction tuning (InstructBLIP): `InstructionTuningCollator` wraps each sample in an instruction template of its task
(`training.instructions`), and with a `qformer_tokenizer` the instruction collators also return the instruction as the
Q-Former of an instruction-aware model reads it (`qformer_input_ids`, `qformer_attention_mask`).

The end-of-text token is the tokenizer's EOS unless `end_of_text` names another text. `default_end_of_text(text_config)`
gives the original's choice per LLM family: "\n" for OPT (LAVIS's `Blip2OPT` trains on `caption + "\n"` and generates
until "\n"), the EOS for the others; `blip2-bridge evaluate` stops generation with the same rule.
"""

import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from ..processing.end_of_text import end_of_text_ids
from ..processing.processing_blip2_bridge import add_image_token
from .data import (
    DEFAULT_MAX_WORDS,
    SkippedSamples,
    UnreadableSampleError,
    open_sample_image,
    pre_caption,
    pre_question,
    sample_name,
    text_or_most_frequent,
)
from .feature_cache import image_key
from .instructions import INSTRUCTION_TEMPLATES, render_instruction


logger = logging.getLogger(__name__)

# LAVIS's `max_txt_len` for stage 2: text tokens (placeholders excluded) per sample.
DEFAULT_MAX_TEXT_TOKENS = 32
VQA_PROMPT = "Question: {} Answer:"  # OPT; BLIP-2's FlanT5 models use "Question: {} Short answer:"
# LAVIS's InstructBLIP (`blip2_vicuna_instruct.py`, `blip2_t5_instruct.py`): `max_txt_len` 128 cuts the Q-Former's
# instruction tokens and the LLM's input text.
DEFAULT_QFORMER_INSTRUCTION_TOKENS = 128
DEFAULT_INSTRUCTION_TEXT_TOKENS = 128

class ImageCollator:
    """
    Opens and processes the image of every sample, dropping and counting the unreadable ones; the subclasses add the
    text. `image_transform` (e.g. `RandomResizedCropAndFlip`) replaces the image processor's plain resize for training.

    feature_cache: a `training.feature_cache.FeatureCache`: each sample's image is replaced by its cached features,
    looked up by the image's key (its path, or webdataset `__key__`), one of the cached views drawn at random (torch's
    global generator); the batch then holds `vision_features` instead of `pixel_values`, and no image is opened. A
    sample whose image is not in the cache is skipped and counted as a "missing file", as an unreadable image is (the
    cache leaves out the images it could not read).
    """

    def __init__(
        self,
        image_processor: Blip2BridgeImageProcessor,
        image_transform=None,
        image_column: str = "image",
        skipped: SkippedSamples | None = None,
        feature_cache=None,
    ):
        self.image_processor = image_processor
        self.image_transform = image_transform
        self.image_column = image_column
        self.feature_cache = feature_cache
        # Created here, before any DataLoader worker starts, so that the workers' skips reach this process.
        self.skipped = skipped if skipped is not None else SkippedSamples()
        self._last_good_batch = None

    def prepare_text(self, sample: Mapping):
        """The sample's text in the form `encode` takes; raises `UnreadableSampleError` if it has none."""
        raise NotImplementedError

    def encode(self, texts: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        kept_samples, texts, pixel_values = [], [], []
        for index, sample in enumerate(samples):
            name = sample_name(sample, index, self.image_column)
            try:
                text = self.prepare_text(sample)
                if self.feature_cache is None:
                    pixel_values.append(self.process_image(sample.get(self.image_column), name))
                else:
                    pixel_values.append(self.cached_features(sample, name))
            except UnreadableSampleError as error:
                self.skipped.skip(name, error)
                continue
            kept_samples.append(sample)
            texts.append(text)

        if not kept_samples:
            # A batch cannot be empty; the step trains on the last readable batch instead of ending the run. A whole
            # batch, not one sample: stage 1 needs at least two distinct images for its in-batch negatives.
            if self._last_good_batch is None:
                raise ValueError(
                    f"every sample of the first batch ({len(samples)}) was unreadable: {self.skipped.summary()}"
                )
            logger.warning(
                "every sample of a batch of %d was unreadable; repeating the last readable batch", len(samples)
            )
            kept_samples, texts, pixel_values = self._last_good_batch
        self._last_good_batch = (kept_samples, texts, pixel_values)
        self.skipped.add_used(len(kept_samples))

        batch = {"pixel_values" if self.feature_cache is None else "vision_features": torch.cat(pixel_values)}
        batch.update(self.encode(texts))
        batch.update(self.extra_columns(kept_samples))
        return batch

    def process_image(self, image, name: str) -> torch.Tensor:
        image = open_sample_image(image, name)
        try:
            if self.image_transform is not None:
                return self.image_transform([image])
            return self.image_processor(image, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError, OSError) as error:  # e.g. an array of NaNs, a PIL mode with no RGB conversion
            raise UnreadableSampleError(f"{name} could not be processed: {error}", "corrupt image") from error

    def cached_features(self, sample: Mapping, name: str) -> torch.Tensor:
        """(1, image_length, vision_width): one cached view of the sample's image (`feature_cache`)."""
        try:
            key = image_key(sample, self.image_column)
        except ValueError as error:
            raise UnreadableSampleError(f"{name}: {error}", "missing file") from error
        views = self.feature_cache.features(key)
        view = torch.randint(0, views.shape[0], (1,)).item() if views.shape[0] > 1 else 0
        return views[view : view + 1]

    def extra_columns(self, samples: list[Mapping]) -> dict[str, torch.Tensor]:
        return {}


def sample_text(sample: Mapping, column: str, name: str = "text") -> str:
    text = sample.get(column)
    if not isinstance(text, str) or not text.strip():
        raise UnreadableSampleError(
            f"{name} column {column!r} holds {text!r}; expected a non-empty string", "bad text"
        )
    return text


def clean_caption(sample: Mapping, column: str, max_words: int) -> str:
    caption = pre_caption(sample_text(sample, column, "caption"), max_words)
    if not caption:
        raise UnreadableSampleError(f"caption {sample[column]!r} is empty after cleaning", "bad text")
    return caption


# ---- stage 1 ----------------------------------------------------------------------------------------------------


class ImageCaptionCollator(ImageCollator):
    """
    Stage 1: `pixel_values`, the Q-Former's `input_ids` and `attention_mask` from a `Blip2BridgeProcessor`, captions
    cleaned by `pre_caption`. With `image_id_column` (COCO retrieval fine-tuning), also `image_ids`, so that ITC counts
    every caption of the same image as a positive.
    """

    def __init__(
        self,
        processor: Blip2BridgeProcessor,
        image_transform=None,
        max_words: int = DEFAULT_MAX_WORDS,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str | None = None,
        skipped: SkippedSamples | None = None,
        feature_cache=None,
    ):
        super().__init__(processor.image_processor, image_transform, image_column, skipped, feature_cache)
        self.processor = processor
        self.max_words = max_words
        self.caption_column = caption_column
        self.image_id_column = image_id_column

    def prepare_text(self, sample):
        if self.image_id_column is not None and not isinstance(sample.get(self.image_id_column), int):
            raise ValueError(
                f"sample column {self.image_id_column!r} holds {sample.get(self.image_id_column)!r}; expected an "
                "integer image id"
            )
        return clean_caption(sample, self.caption_column, self.max_words)

    def encode(self, texts):
        return dict(self.processor(text=texts, return_tensors="pt"))

    def extra_columns(self, samples):
        if self.image_id_column is None:
            return {}
        return {"image_ids": torch.tensor([sample[self.image_id_column] for sample in samples])}


# ---- stage 2 ----------------------------------------------------------------------------------------------------


def image_text_ids(
    tokenizer: PreTrainedTokenizerBase, image_token_id: int, num_query_tokens: int, texts: list[str]
) -> list[list[int]]:
    """
    The LLM's token ids of `texts` laid out as transformers' `Blip2Processor(images=..., text=texts)` lays them out:
    `num_query_tokens` image placeholders (id `image_token_id`, from `add_image_token(tokenizer)`), then the
    tokenizer's own encoding of the text with its special tokens (BOS for OPT or LLaMA, a final EOS for T5). Every
    stage-2 collator builds its inputs through this one function.
    """
    placeholders = [image_token_id] * num_query_tokens
    return [placeholders + ids for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def join_prompt(prompt: str, target: str) -> str:
    """`prompt` and `target` as one text: a space between them unless the prompt is empty or ends with one."""
    if not prompt or prompt[-1].isspace():
        return prompt + target
    return f"{prompt} {target}"


def common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


class LanguageModelingCollator(ImageCollator):
    r"""
    Stage 2: images with a prompt and a target text for the LLM. `prepare_text` of a subclass returns
    `(prompt, target)`; the labels cover the target and the end of the text only.

    Args:
        image_processor: a [`Blip2BridgeImageProcessor`].
        tokenizer: the LLM's tokenizer; gets "<image>" added when it has no image token.
        num_query_tokens: the model's `config.num_query_tokens`.
        is_encoder_decoder: the LLM's `config.is_encoder_decoder` (T5: True, OPT/LLaMA: False).
        max_length: the most text tokens per sample, placeholders not counted (LAVIS's `max_txt_len`, 32). A longer
            text loses tokens at its end but keeps its end-of-text token, so that the LLM still learns to stop.
        end_of_text: the text that ends a target; default the tokenizer's EOS token. The original ends OPT targets
            with "\n" (and generates until "\n"): pass `default_end_of_text(model.config.text_config)` for its choice.
        image_transform, image_column, skipped, feature_cache: as [`ImageCollator`].
    """

    def __init__(
        self,
        image_processor: Blip2BridgeImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        num_query_tokens: int,
        is_encoder_decoder: bool = False,
        max_length: int = DEFAULT_MAX_TEXT_TOKENS,
        end_of_text: str | None = None,
        image_transform=None,
        image_column: str = "image",
        skipped: SkippedSamples | None = None,
        feature_cache=None,
    ):
        super().__init__(image_processor, image_transform, image_column, skipped, feature_cache)
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token) so that batches can be padded"
            )
        if max_length < 2:
            raise ValueError(f"max_length is {max_length}; expected at least 2 text tokens")
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.is_encoder_decoder = is_encoder_decoder
        self.max_length = max_length
        self.end_of_text_ids = end_of_text_ids(tokenizer, end_of_text)
        self.image_token_id = add_image_token(tokenizer)  # now, not in a DataLoader worker

    def encode(self, texts: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        prompts = [prompt for prompt, _ in texts]
        if self.is_encoder_decoder:
            return self.encode_encoder_decoder(prompts, [target for _, target in texts])
        full_texts = [join_prompt(prompt, target) for prompt, target in texts]
        return self.encode_decoder_only(prompts, full_texts)

    def encode_decoder_only(self, prompts, full_texts):
        input_ids, labels = [], []
        prompt_ids = image_text_ids(self.tokenizer, self.image_token_id, self.num_query_tokens, prompts)
        full_ids = image_text_ids(self.tokenizer, self.image_token_id, self.num_query_tokens, full_texts)
        for prompt, ids in zip(prompt_ids, full_ids):
            ids = self.end_text(ids, self.num_query_tokens)
            # The prompt's tokens are those the full text shares with the prompt alone (a tokenizer may merge across
            # the boundary; the merged token then counts as target).
            prompt_length = common_prefix_length(prompt, ids)
            input_ids.append(ids)
            labels.append([-100] * prompt_length + ids[prompt_length:])
        return self.pad({"input_ids": input_ids, "labels": labels})

    def encode_encoder_decoder(self, prompts, targets):
        prompt_ids = image_text_ids(self.tokenizer, self.image_token_id, self.num_query_tokens, prompts)
        encoder_ids = [self.truncate(ids, self.num_query_tokens) for ids in prompt_ids]
        target_ids = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        labels = [self.end_text(ids, 0) for ids in target_ids]
        batch = self.pad({"input_ids": encoder_ids})
        decoder = self.pad({"labels": labels})
        batch["labels"] = decoder["labels"]
        batch["decoder_attention_mask"] = decoder["attention_mask"]
        return batch

    def end_text(self, ids: list[int], num_placeholders: int) -> list[int]:
        """Appends the end-of-text tokens unless the tokenizer already did, keeping at most `max_length` text tokens."""
        end = self.end_of_text_ids
        if ids[len(ids) - len(end) :] == end and len(ids) > num_placeholders:
            ids = ids[: len(ids) - len(end)]
        return ids[: num_placeholders + self.max_length - len(end)] + end

    def truncate(self, ids: list[int], num_placeholders: int) -> list[int]:
        return ids[: num_placeholders + self.max_length]

    def pad(self, columns: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
        """Right padding: pad id in `input_ids`, -100 in `labels`; `attention_mask` 1 on the real tokens."""
        first = next(iter(columns.values()))
        length = max(len(ids) for ids in first)
        padding_values = {"input_ids": self.tokenizer.pad_token_id, "labels": -100}
        batch = {
            name: torch.tensor([ids + [padding_values[name]] * (length - len(ids)) for ids in rows])
            for name, rows in columns.items()
        }
        batch["attention_mask"] = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in first])
        return batch


class CaptionLMCollator(LanguageModelingCollator):
    """
    Stage-2 image captioning: `prompt` (default none, as pre-training; "a photo of" for COCO fine-tuning) followed by
    the caption cleaned by `pre_caption`.

    split_captions: encoder-decoder pre-training (prefix language modelling). Each caption is cut before a random word
        (uniform over its words, so the prefix may be empty and the suffix is never): the prefix goes to the encoder
        after the prompt, the suffix is the target. `generator` (a `torch.Generator`) makes the cuts reproducible;
        without one, torch's global generator is used, which DataLoader seeds differently in every worker.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens,
        is_encoder_decoder=False,
        prompt: str = "",
        split_captions: bool = False,
        generator: torch.Generator | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        caption_column: str = "caption",
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, num_query_tokens, is_encoder_decoder, **kwargs)
        if split_captions and not is_encoder_decoder:
            raise ValueError(
                "split_captions is for encoder-decoder LLMs (prefix LM); a decoder-only LLM reads the whole caption"
            )
        self.prompt = prompt
        self.split_captions = split_captions
        self.generator = generator
        self.max_words = max_words
        self.caption_column = caption_column

    def prepare_text(self, sample):
        caption = clean_caption(sample, self.caption_column, self.max_words)
        if not self.split_captions:
            return self.prompt, caption
        words = caption.split(" ")
        cut = torch.randint(0, len(words), (1,), generator=self.generator).item()
        return join_prompt(self.prompt, " ".join(words[:cut])).rstrip(" "), " ".join(words[cut:])


class VQACollator(LanguageModelingCollator):
    """
    Visual question answering: the question, cleaned by `pre_question`, in `prompt` ("Question: {} Answer:"; BLIP-2's
    FlanT5 models use "Question: {} Short answer:"), the answer as target. A list of answers (VQAv2's ten annotators)
    trains on the most frequent one, the first of equals.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens,
        is_encoder_decoder=False,
        prompt: str = VQA_PROMPT,
        max_words: int = DEFAULT_MAX_WORDS,
        question_column: str = "question",
        answer_column: str = "answer",
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, num_query_tokens, is_encoder_decoder, **kwargs)
        if "{}" not in prompt:
            raise ValueError(f"prompt is {prompt!r}; expected a template with {{}} where the question goes")
        self.prompt = prompt
        self.max_words = max_words
        self.question_column = question_column
        self.answer_column = answer_column

    def prepare_text(self, sample):
        question = pre_question(sample_text(sample, self.question_column, "question"), self.max_words)
        return self.prompt.format(question), text_or_most_frequent(sample, self.answer_column)


def qformer_instruction_inputs(
    qformer_tokenizer: PreTrainedTokenizerBase, instructions: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """
    The instructions as the Q-Former of an instruction-aware (InstructBLIP) model reads them: its BERT tokenizer's
    `[CLS] instruction [SEP]`, cut to `max_length` tokens ([CLS] and [SEP] included; LAVIS's InstructBLIP cuts at its
    `max_txt_len`, 128), padded to the longest; returned as `qformer_input_ids` and `qformer_attention_mask`, the
    names stage 2's forward and generate take. The one function every instruction collator builds them with.
    """
    encoded = qformer_tokenizer(
        instructions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}


class InstructionCollator(LanguageModelingCollator):
    """Instruction data: each sample's `prompt_column` text is the prompt, its `response_column` text the target.

    qformer_tokenizer: the Q-Former's (BERT) tokenizer of an instruction-aware model (InstructBLIP, a Q-Former built
        with `use_text_input=True`): the batch then also holds the prompt as Q-Former tokens, `qformer_input_ids` and
        `qformer_attention_mask` (`qformer_instruction_inputs`), cut to `qformer_max_length` tokens. Keep that at most
        the Q-Former's `max_position_embeddings`.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens,
        is_encoder_decoder=False,
        prompt_column: str = "prompt",
        response_column: str = "response",
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        qformer_max_length: int = DEFAULT_QFORMER_INSTRUCTION_TOKENS,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, num_query_tokens, is_encoder_decoder, **kwargs)
        if qformer_max_length < 2:
            raise ValueError(f"qformer_max_length is {qformer_max_length}; expected at least 2 ([CLS] and [SEP])")
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.qformer_tokenizer = qformer_tokenizer
        self.qformer_max_length = qformer_max_length

    def prepare_text(self, sample):
        prompt = sample.get(self.prompt_column)
        if not isinstance(prompt, str):
            raise UnreadableSampleError(
                f"prompt column {self.prompt_column!r} holds {prompt!r}; expected a string", "bad text"
            )
        return prompt, sample_text(sample, self.response_column, "response").strip()

    def encode(self, texts):
        batch = super().encode(texts)
        if self.qformer_tokenizer is not None:
            prompts = [prompt for prompt, _ in texts]
            batch.update(qformer_instruction_inputs(self.qformer_tokenizer, prompts, self.qformer_max_length))
        return batch


class InstructionTuningCollator(InstructionCollator):
    """
    InstructBLIP's instruction data from task datasets: each sample is wrapped in one instruction template of its task
    (`training.instructions.INSTRUCTION_TEMPLATES`), drawn uniformly at random per sample. The rendered instruction is
    the LLM's prompt after the image placeholders and, with `qformer_tokenizer`, the Q-Former's text
    (`qformer_input_ids`); the target (caption, answer, question for "vqg", label) is the only text with labels.

    The task is the sample's `task_column` ("task", as `mix_datasets(..., tasks=...)` writes it), else `task`. What
    each task reads (`training.instructions.TASK_COLUMNS`): "caption": `caption` (cleaned by `pre_caption`); "vqa":
    `question` (cleaned by `pre_question`) and `answer` (a string, or a list whose most frequent entry is used);
    "vqg": the same, the question as target; "classification": `label`; "ocr_vqa": as "vqa", plus `ocr_tokens`.

    generator: a `torch.Generator` for reproducible template draws (the same seed and the same samples in the same
        order give the same instructions); without one, torch's global generator, which the Trainer's seed sets and
        DataLoader seeds differently in every worker.
    templates: task -> templates, replacing `INSTRUCTION_TEMPLATES`' lists for the tasks it names (`{question}` and
        `{answer}` are filled in; e.g. one fixed template per task for evaluation).
    max_length: text tokens per sample for the LLM (prompt and target, placeholders not counted); default 128, LAVIS's
        InstructBLIP `max_txt_len`.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens,
        is_encoder_decoder=False,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        task: str | None = None,
        task_column: str = "task",
        generator: torch.Generator | None = None,
        templates: Mapping[str, Sequence[str]] | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        max_length: int = DEFAULT_INSTRUCTION_TEXT_TOKENS,
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            num_query_tokens,
            is_encoder_decoder,
            qformer_tokenizer=qformer_tokenizer,
            max_length=max_length,
            **kwargs,
        )
        self.templates = {**INSTRUCTION_TEMPLATES, **{name: tuple(t) for name, t in (templates or {}).items()}}
        unknown = sorted(set(self.templates) - set(INSTRUCTION_TEMPLATES))
        if unknown or not all(self.templates.values()):
            raise ValueError(
                f"templates for {unknown or 'no template'}; expected non-empty lists for tasks among "
                f"{sorted(INSTRUCTION_TEMPLATES)}"
            )
        if task is not None and task not in INSTRUCTION_TEMPLATES:
            raise ValueError(f"task {task!r}; expected one of {sorted(INSTRUCTION_TEMPLATES)}")
        self.task = task
        self.task_column = task_column
        self.generator = generator
        self.max_words = max_words

    def prepare_text(self, sample):
        task = sample.get(self.task_column) or self.task
        if task is None:
            raise ValueError(
                f"sample has no {self.task_column!r} column and the collator no default task; pass task=... or mix "
                "the datasets with mix_datasets(..., tasks=...)"
            )
        if task not in INSTRUCTION_TEMPLATES:
            raise ValueError(f"sample's task {task!r}; expected one of {sorted(INSTRUCTION_TEMPLATES)}")
        index = torch.randint(0, len(self.templates[task]), (1,), generator=self.generator).item()
        return render_instruction(task, index, sample, self.max_words, self.templates)


__all__ = [
    "CaptionLMCollator",
    "ImageCaptionCollator",
    "ImageCollator",
    "InstructionCollator",
    "InstructionTuningCollator",
    "LanguageModelingCollator",
    "VQACollator",
    "image_text_ids",
    "qformer_instruction_inputs",
]
