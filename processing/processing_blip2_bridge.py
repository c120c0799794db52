"""Processor of blip2-bridge: images and the Q-Former's BERT-style text, prepared in one call."""

from transformers import BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER


# LAVIS's `max_txt_len` for BLIP-2 pre-training: the length texts are cut to when the tokenizer sets no limit.
BLIP2_MAX_TEXT_LENGTH = 32


class Blip2BridgeProcessor(ProcessorMixin):
    r"""
    Prepares the inputs of a stage-1 BLIP-2 model: `pixel_values` from a [`Blip2BridgeImageProcessor`], and
    `input_ids` and `attention_mask` from the Q-Former's BERT-style tokenizer, which starts every text with [CLS] (the
    model swaps it for [DEC] for image-grounded generation). The Q-Former has no token-type embeddings, so no
    `token_type_ids` are returned.

    Args:
        image_processor: a [`Blip2BridgeImageProcessor`].
        tokenizer: the Q-Former's tokenizer, e.g. bert-base-uncased's `BertTokenizer`.
    """

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        if tokenizer.cls_token is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no [CLS] token; expected the Q-Former's BERT-style "
                "tokenizer, which starts every text with [CLS]"
            )

    @property
    def max_text_length(self) -> int:
        """Texts are truncated to this many tokens, [CLS] and [SEP] included, unless `max_length` says otherwise."""
        model_max_length = self.tokenizer.model_max_length
        if model_max_length is None or model_max_length >= VERY_LARGE_INTEGER:  # transformers' "no limit set"
            return BLIP2_MAX_TEXT_LENGTH
        return model_max_length

    @property
    def unused_input_names(self) -> list[str]:
        return ["token_type_ids"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        padding: bool | str = "longest",
        truncation: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image or a batch (see [`Blip2BridgeImageProcessor`] for what is accepted).
            text: one string or a list with one string per image. A single string goes with every image.
            padding, truncation: as for the tokenizer. Texts longer than `max_length` are cut (keeping [SEP] last).
            max_length: defaults to [`~Blip2BridgeProcessor.max_text_length`].
            return_tensors: "pt", "np", or None for lists.
            kwargs: further image-processor or tokenizer arguments (e.g. `size`, `add_special_tokens`).

        Returns:
            A `BatchFeature` with `pixel_values` when images are given, `input_ids` and `attention_mask` when text is.
        """
        if images is None and text is None:
            raise ValueError(f"{type(self).__name__} needs images, text or both; got neither")
        texts = None if text is None else check_texts(text)
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)

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
                "truncation": truncation,
                "max_length": self.max_text_length if max_length is None else max_length,
                "return_token_type_ids": False,
                "return_tensors": return_tensors,
            }
            encoding.update(self.tokenizer(texts, **text_kwargs))

        encoding = {name: value for name, value in encoding.items() if name not in self.unused_input_names}
        return BatchFeature(encoding, tensor_type=return_tensors)


def check_texts(text) -> list[str]:
    """Returns `text` as a list of strings, refusing empty ones: an empty caption has nothing to learn from."""
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
        if not sample.strip():
            raise ValueError(f"{name} is {sample!r}; expected a non-empty string")
    return texts


__all__ = ["Blip2BridgeProcessor"]
