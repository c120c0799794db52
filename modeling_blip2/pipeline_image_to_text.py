"""The "image-to-text" pipeline of blip2-bridge: one caption per image, no prompt needed.

transformers 5 maps the task "image-to-text" onto "image-text-to-text", which demands a text. This pipeline is that
one with the text optional: an image alone is captioned from the empty prompt (the image placeholders and the
language model's start token), an optional `prompt` ("a photo of") is continued.

The file imports nothing from blip2-bridge, so a saved stage-2 folder carries it as remote code (config
`custom_pipelines`) and `pipeline("image-to-text", model=folder, trust_remote_code=True)` finds it.
"""

from transformers import GenerationConfig
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline, ReturnType
from transformers.utils import logging


logger = logging.get_logger(__name__)


class Blip2BridgeImageToTextPipeline(ImageTextToTextPipeline):
    """
    Captions images with a BLIP-2 stage-2 model.

    ```python
    >>> captioner = pipeline("image-to-text", model="my-blip2", trust_remote_code=True)
    >>> captioner(image)
    [{'generated_text': 'a cat sitting on a sofa'}]
    >>> captioner([image, other_image], prompt="a photo of")  # one list of results per image
    ```

    Generation defaults to at most 30 new tokens, the original's caption length; pass `max_new_tokens`,
    `num_beams`, ... or `generate_kwargs` to change it.

    An instruction-aware model (InstructBLIP: its Q-Former reads text) gets the prompt twice, as the LLM's prompt and
    as the Q-Former's instruction (`qformer_input_ids`), when its processor holds the Q-Former's tokenizer (saved in
    the model folder's `qformer_tokenizer/`).
    """

    _default_generation_config = GenerationConfig(max_new_tokens=30)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model_token_id = getattr(self.model.config, "image_token_id", None)
        processor_token_id = getattr(self.processor, "image_token_id", None)
        if model_token_id is not None and processor_token_id is not None and model_token_id != processor_token_id:
            raise ValueError(
                f"the processor's image token has id {processor_token_id} but the model's config.image_token_id is "
                f"{model_token_id}; expected the same id (save the processor that was used to build the model)"
            )
        qformer_config = getattr(self.model.config, "qformer_config", None)
        if getattr(qformer_config, "use_text_input", False) and getattr(self.processor, "qformer_tokenizer", None) is None:
            logger.warning(
                "the model's Q-Former reads an instruction (qformer_config.use_text_input=True) but the processor has no "
                "Q-Former tokenizer: its queries will read the image alone. Save the processor with its "
                "qformer_tokenizer (Blip2BridgeProcessor(..., qformer_tokenizer=...)) in the model folder"
            )

    def __call__(self, images, prompt: str | None = None, **kwargs):
        """
        Args:
            images: one image (PIL image, path or URL) or a list of them.
            prompt: optional text the caption continues; default none. An instruction-aware model's Q-Former reads it
                too (the empty prompt: [CLS] [SEP]).

        Returns:
            For one image a list with one `{"generated_text": ...}` per returned sequence; for a list of images one
            such list per image.
        """
        text = "" if prompt is None else prompt
        if isinstance(images, (list, tuple)):
            # One pipeline input per image (batched by `batch_size`); the parent class would read a list of dicts as
            # chat messages, so the list goes to the base Pipeline directly.
            inputs = [{"images": image, "text": text} for image in images]
            return super(ImageTextToTextPipeline, self).__call__(inputs, **kwargs)
        return super().__call__(images=images, text=text, **kwargs)

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, **kwargs):
        records = super().postprocess(model_outputs, return_type=return_type, **kwargs)
        if return_type == ReturnType.TENSORS:
            return records
        return [{"generated_text": record["generated_text"]} for record in records]


__all__ = ["Blip2BridgeImageToTextPipeline"]
