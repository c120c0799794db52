"""Processor of blip2-bridge: images and text, prepared in one call for a stage-1 or a stage-2 model.

Stage 1 tokenises captions with the Q-Former's BERT-style tokenizer. Stage 2 tokenises prompts with the language
model's tokenizer and puts `num_query_tokens` image placeholder tokens in front of them, as transformers'
`Blip2Processor` does, whose saved files this processor also loads. An instruction-aware stage 2 (InstructBLIP) also
tokenises the prompt with the Q-Former's tokenizer, as transformers' `InstructBlipProcessor` does, whose saved files
(the Q-Former's tokenizer in `qformer_tokenizer/`) this processor loads too.
"""

import os

from transformers import AddedToken, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import cached_file


# LAVIS's `max_txt_len` for BLIP-2 pre-training (Blip2Qformer): stage-1 texts are cut to 32 tokens, [CLS] and [SEP]
# included, whatever the tokenizer's model_max_length (512 for bert-base-uncased).
BLIP2_MAX_TEXT_LENGTH = 32
# The placeholder transformers' Blip2Processor adds to the language model's tokenizer; the model replaces the
# embeddings of these tokens by its projected query outputs. Defined here only: builders and collators import it.
IMAGE_TOKEN = "<image>"
# The sub-folder of a saved processor that holds the Q-Former's tokenizer, where transformers' InstructBlipProcessor
# saves it.
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
# Hub arguments of `from_pretrained` that also locate the Q-Former's tokenizer.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Adds the image placeholder to the language model's `tokenizer` and returns its id.

    The placeholder is the tokenizer's own `image_token` when it names one (a tokenizer saved by transformers'
    Blip2Processor), else "<image>". It is added as transformers' Blip2Processor adds it, as a special token (never
    split, never lower-cased); a tokenizer that holds it already keeps its id. The model's `config.image_token_id`
    must be this id (the LLM's embeddings grow when the token is new).
    """
    image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    tokenizer.add_tokens([AddedToken(image_token, normalized=False, special=True)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


class Blip2BridgeProcessor(ProcessorMixin):
    r"""
    Prepares the inputs of a BLIP-2 model.

    - Stage 1 (`num_query_tokens=None`): `pixel_values` from a [`Blip2BridgeImageProcessor`], and `input_ids` and
      `attention_mask` from the Q-Former's BERT-style tokenizer, which starts every text with [CLS] (the model swaps it
      for [DEC] for image-grounded generation). The Q-Former has no token-type embeddings, so no `token_type_ids` are
      returned. Texts longer than [`~Blip2BridgeProcessor.max_text_length`] (32 tokens by default, as the original)
      are truncated.
    - Stage 2 (`num_query_tokens` set, as for a [`Blip2BridgeForConditionalGeneration`]): the language model's
      tokenizer, with an `<image>` special token added when it has none. With images, every prompt is preceded by
      `num_query_tokens` `<image>` tokens (the model's `config.image_token_id` must be this token's id, see
      [`~Blip2BridgeProcessor.image_token_id`]); the padding side is the tokenizer's (left padding for batched
      generation with a decoder-only LLM). Token ids equal transformers' `Blip2Processor` for the same arguments.
      Prompts may be empty (captioning). A prompt longer than the tokenizer's `model_max_length` (placeholders
      included) is an error unless `truncation=True`.

    Args:
        image_processor: a [`Blip2BridgeImageProcessor`] (or any image processor, e.g. transformers'
            `BlipImageProcessor` when loading a `Blip2Processor`).
        tokenizer: stage 1: the Q-Former's tokenizer, e.g. bert-base-uncased's; stage 2: the language model's.
        num_query_tokens: the model's `config.num_query_tokens` for a stage-2 model; None for stage 1.
        max_text_length: stage 1: the tokens a text is cut to, [CLS] and [SEP] included (default 32, the original's
            `max_txt_len`; never more than the tokenizer's `model_max_length`). Saved and loaded with the processor.
            Stage 2 takes none: its limit is the language model tokenizer's `model_max_length`.
        chat_template: optional Jinja chat template. BLIP-2 models answer plain prompts ("Question: {} Answer:"), so
            none is set by default.
        qformer_tokenizer: stage 2 of an instruction-aware model (InstructBLIP, a Q-Former built with
            `use_text_input=True`): the Q-Former's BERT-style tokenizer. Every prompt is then also returned in its
            tokens, as `qformer_input_ids` and `qformer_attention_mask` (the same padding, truncation and `max_length`
            as the prompt, as transformers' `InstructBlipProcessor`, but padded on the Q-Former tokenizer's own side,
            as the original InstructBLIP), which the model's queries read. Saved in `qformer_tokenizer/` and loaded
            from there, as transformers' InstructBlipProcessor saves it.
    """

    # A saved processor carries this file and its `auto_map` (the file imports nothing from blip2-bridge), so that
    # AutoProcessor loads it with trust_remote_code=True where blip2-bridge is not installed.
    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens: int | None = None,
        max_text_length: int | None = None,
        chat_template=None,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        if qformer_tokenizer is not None:
            if num_query_tokens is None:
                raise ValueError(
                    "qformer_tokenizer given without num_query_tokens: the Q-Former's tokenizer reads the instruction of "
                    "a stage-2 model; a stage-1 processor's tokenizer is the Q-Former's already"
                )
            if not isinstance(qformer_tokenizer, PreTrainedTokenizerBase):
                raise TypeError(f"qformer_tokenizer is a {type(qformer_tokenizer).__name__}; expected a tokenizer")
        # Not one of ProcessorMixin's attributes: it is optional, and saved and loaded here (save_pretrained,
        # from_pretrained) in the sub-folder where transformers' InstructBlipProcessor keeps it.
        self.qformer_tokenizer = qformer_tokenizer
        if num_query_tokens is None:
            if tokenizer.cls_token is None:
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} has no [CLS] token; expected the Q-Former's BERT-style "
                    "tokenizer, which starts every text with [CLS] (stage 1), or pass num_query_tokens to use a "
                    "language model's tokenizer (stage 2)"
                )
        elif not isinstance(num_query_tokens, int) or num_query_tokens < 1:
            raise ValueError(f"num_query_tokens is {num_query_tokens!r}; expected a positive integer or None")
        else:
            tokenizer.return_token_type_ids = False
            self.image_token = tokenizer.convert_ids_to_tokens(add_image_token(tokenizer))
            if max_text_length is not None:
                raise ValueError(
                    f"max_text_length={max_text_length} with num_query_tokens set (stage 2); a stage-2 prompt's limit "
                    "is the language model tokenizer's model_max_length (or max_length per call)"
                )
        self.num_query_tokens = num_query_tokens
        if num_query_tokens is None:
            self.max_text_length = BLIP2_MAX_TEXT_LENGTH if max_text_length is None else max_text_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def is_stage2(self) -> bool:
        return self.num_query_tokens is not None

    @property
    def is_instruction_aware(self) -> bool:
        """Prompts also go to the Q-Former (`qformer_input_ids`), for an instruction-aware (InstructBLIP) model."""
        return self.qformer_tokenizer is not None

    @classmethod
    def get_attributes(cls) -> list[str]:
        # ProcessorMixin takes every `*_tokenizer` argument for a required sub-processor; the Q-Former's is optional.
        return [name for name in super().get_attributes() if name != "qformer_tokenizer"]

    @property
    def model_input_names(self) -> list[str]:
        names = super().model_input_names
        return [*names, "qformer_input_ids", "qformer_attention_mask"] if self.is_instruction_aware else names

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also reads the Q-Former's tokenizer from the folder's `qformer_tokenizer/` when it has one (a processor of
        an instruction-aware model, ours or transformers' InstructBlipProcessor), or takes `qformer_tokenizer=`."""
        qformer_tokenizer = kwargs.pop("qformer_tokenizer", None)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if qformer_tokenizer is None and processor.is_stage2:
            qformer_tokenizer = load_qformer_tokenizer(
                pretrained_model_name_or_path, **{name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
            )
        if qformer_tokenizer is not None:
            if not processor.is_stage2:
                raise ValueError("qformer_tokenizer given for a stage-1 processor (no num_query_tokens)")
            processor.qformer_tokenizer = qformer_tokenizer
        return processor

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saves as ProcessorMixin does, and the Q-Former's tokenizer (if any) in `qformer_tokenizer/`."""
        if self.qformer_tokenizer is None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        saved = super().save_pretrained(save_directory)
        self.qformer_tokenizer.save_pretrained(os.path.join(save_directory, QFORMER_TOKENIZER_FOLDER))
        if push_to_hub:
            # ProcessorMixin uploads the files its own save wrote; push_to_hub saves everything to a fresh folder.
            repo_id = kwargs.pop("repo_id", str(save_directory).split(os.path.sep)[-1])
            self.push_to_hub(repo_id, **kwargs)
        return saved

    def to_dict(self) -> dict:
        # The Q-Former's tokenizer is saved in its own folder, not in processor_config.json.
        qformer_tokenizer = self.__dict__.pop("qformer_tokenizer", None)
        try:
            return super().to_dict()
        finally:
            self.__dict__["qformer_tokenizer"] = qformer_tokenizer

    @property
    def image_token_id(self) -> int | None:
        """Id of the image placeholder in the language model's vocabulary; the model's `config.image_token_id`."""
        if not self.is_stage2:
            return None
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def max_text_length(self) -> int | None:
        """
        Stage 1: texts are truncated to this many tokens, [CLS] and [SEP] included, unless `max_length` says
        otherwise: 32 by default (the original's `max_txt_len`), at most the tokenizer's `model_max_length`; settable.
        Stage 2: the longest input the language model takes, image placeholders included (None: no limit).
        """
        model_max_length = self.tokenizer.model_max_length
        if model_max_length is None or model_max_length >= VERY_LARGE_INTEGER:  # transformers' "no limit set"
            model_max_length = None
        if self.is_stage2:
            return model_max_length
        stage1_length = self.__dict__["max_text_length"]
        return stage1_length if model_max_length is None else min(stage1_length, model_max_length)

    @max_text_length.setter
    def max_text_length(self, value: int):
        if self.is_stage2:
            raise ValueError(
                "max_text_length is set for stage 1; a stage-2 processor reads its tokenizer's model_max_length"
            )
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"max_text_length is {value!r}; expected an integer of at least 2 ([CLS] and [SEP])")
        # Kept in the instance's __dict__, where ProcessorMixin.to_dict finds what save_pretrained writes.
        self.__dict__["max_text_length"] = value

    @property
    def unused_input_names(self) -> list[str]:
        return ["token_type_ids"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        padding: bool | str = "longest",
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image or a batch (see [`Blip2BridgeImageProcessor`] for what is accepted).
            text: one string or a list with one string per image. A single string goes with every image.
            padding: as for the tokenizer; the default pads to the longest text.
            truncation: stage 1 defaults to True (texts are cut to `max_length`, keeping [SEP] last); stage 2 to
                False (a prompt too long for the language model is an error).
            max_length: stage 1: defaults to [`~Blip2BridgeProcessor.max_text_length`]. Stage 2: the length of the
                whole input, image placeholders included, as transformers' Blip2Processor.
            return_tensors: "pt", "np", or None for lists.
            kwargs: further image-processor or tokenizer arguments (e.g. `size`, `add_special_tokens`).

        Returns:
            A `BatchFeature` with `pixel_values` when images are given, `input_ids` and `attention_mask` when text is,
            and with a `qformer_tokenizer` the text in its tokens, `qformer_input_ids` and `qformer_attention_mask`.
        """
        if images is None and text is None:
            raise ValueError(f"{type(self).__name__} needs images, text or both; got neither")
        texts = None if text is None else check_texts(text, allow_empty=self.is_stage2)
        # transformers before 5.23 needs the kwargs class named.
        output_kwargs = self._merge_kwargs(ProcessingKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)

        encoding = {}
        if images is not None:
            images_kwargs = {**output_kwargs["images_kwargs"], "return_tensors": return_tensors}
            encoding.update(self.image_processor(images, **images_kwargs))
            num_images = len(encoding["pixel_values"])
            if isinstance(text, str):
                texts = texts * num_images
            elif texts is not None and len(texts) != num_images:
                raise ValueError(
                    f"got {num_images} images and {len(texts)} texts; expected one text per image, or a single "
                    "string for all of them"
                )
        if texts is not None:
            text_kwargs = {
                **output_kwargs["text_kwargs"],
                "padding": padding,
                "return_token_type_ids": False,
            }
            if self.is_stage2:
                if self.is_instruction_aware:
                    encoding.update(self._encode_instructions(texts, truncation, max_length, dict(text_kwargs)))
                encoding.update(self._encode_prompts(texts, images is not None, truncation, max_length, text_kwargs))
            else:
                text_kwargs["truncation"] = True if truncation is None else truncation
                text_kwargs["max_length"] = self.max_text_length if max_length is None else max_length
                encoding.update(self.tokenizer(texts, **text_kwargs))

        encoding = {name: value for name, value in encoding.items() if name not in self.unused_input_names}
        return BatchFeature(encoding, tensor_type=return_tensors)

    def _encode_instructions(self, texts, truncation, max_length, text_kwargs) -> dict:
        """The prompts in the Q-Former's tokens ([CLS] ... [SEP]), as transformers' InstructBlipProcessor makes them:
        the prompt's padding, truncation and `max_length` (which counts no placeholder here). Padding goes on the
        Q-Former tokenizer's own side (BERT's: right), as the original InstructBLIP (LAVIS) and our collators pad
        the instruction, whose positions then start at 0 in every row; transformers' InstructBlipProcessor takes the
        LLM tokenizer's side instead (left for batched generation)."""
        text_kwargs.pop("padding_side", None)  # the LLM tokenizer's, merged into the text kwargs
        truncation = False if truncation is None else truncation
        if max_length is not None:
            text_kwargs["max_length"] = max_length
        encoded = self.qformer_tokenizer(texts, truncation=truncation, **text_kwargs)
        limit = self.qformer_tokenizer.model_max_length if max_length is None else max_length
        longest = max(len(ids) for ids in encoded["input_ids"])
        if limit is not None and limit < VERY_LARGE_INTEGER and longest > limit and not truncation:
            raise ValueError(
                f"the longest prompt is {longest} Q-Former tokens; the Q-Former's tokenizer takes at most {limit} "
                "(max_length or its model_max_length); shorten it or pass truncation=True"
            )
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}

    def _encode_prompts(self, texts, with_images: bool, truncation, max_length, text_kwargs) -> dict:
        """Language-model tokens of `texts`, after `num_query_tokens` image placeholders when there are images."""
        num_placeholders = self.num_query_tokens if with_images else 0
        truncation = False if truncation is None else truncation
        if max_length is not None:
            if max_length < num_placeholders + 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for text after the {num_placeholders} image placeholders; "
                    f"expected at least {num_placeholders + 1} (max_length counts the placeholders)"
                )
            # As transformers' Blip2Processor, max_length counts the placeholders, which are never truncated.
            text_kwargs["max_length"] = max_length - num_placeholders
        text_encoding = self.tokenizer(texts, truncation=truncation, **text_kwargs)

        limit = self.max_text_length if max_length is None else max_length
        longest = max(len(ids) for ids in text_encoding["input_ids"]) + num_placeholders
        if limit is not None and longest > limit and not truncation:
            raise ValueError(
                f"the longest prompt is {longest} tokens ({num_placeholders} image placeholders + "
                f"{longest - num_placeholders} text tokens); the language model takes at most {limit} "
                "(max_length or the tokenizer's model_max_length); shorten it or pass truncation=True"
            )
        if not num_placeholders:
            return dict(text_encoding)
        # Placeholders go before everything, BOS and left padding included, as transformers' Blip2Processor.
        placeholders = {"input_ids": [self.image_token_id] * num_placeholders, "attention_mask": [1] * num_placeholders}
        return {
            name: [placeholders[name] + list(row) for row in rows] for name, rows in text_encoding.items()
        }

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated token ids (a batch or one sequence) into text; what the image-text-to-text pipeline calls."""
        return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        if chat_template is None and self.chat_template is None:
            raise ValueError(
                f"{type(self).__name__} has no chat template: BLIP-2 models answer a plain prompt next to the image, "
                "e.g. pipeline(images=image, text='Question: what is shown? Answer:'); pass chat_template=... or "
                "set processor.chat_template to use chat messages"
            )
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)


def check_texts(text, allow_empty: bool = False) -> list[str]:
    """
    Returns `text` as a list of strings. Empty captions are refused (nothing to learn from); empty prompts are
    allowed with `allow_empty` (a stage-2 model captions the image).
    """
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)):
        if not text:
            raise ValueError("text is an empty list; expected at least one string")
        texts = list(text)
    else:
        raise TypeError(f"text is a {type(text).__name__}; expected a string or a list of strings")

    for index, sample in enumerate(texts):
        name = "text" if isinstance(text, str) else f"text[{index}]"
        if not isinstance(sample, str):
            raise TypeError(f"{name} is a {type(sample).__name__}; expected a string")
        if not allow_empty and not sample.strip():
            raise ValueError(f"{name} is {sample!r}; expected a non-empty string")
    return texts


def load_qformer_tokenizer(pretrained_model_name_or_path, subfolder: str = "", **hub_kwargs):
    """The Q-Former's tokenizer saved in `qformer_tokenizer/` of a processor folder (local or on the Hub), or None
    when the folder has none."""
    folder = os.path.join(subfolder, QFORMER_TOKENIZER_FOLDER) if subfolder else QFORMER_TOKENIZER_FOLDER
    found = cached_file(
        pretrained_model_name_or_path,
        "tokenizer_config.json",
        subfolder=folder,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if found is None:
        return None
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=folder, **hub_kwargs)


__all__ = ["Blip2BridgeProcessor"]
