"""Stage 2 of BLIP-2: the Q-Former's query outputs, projected to a frozen language model's width, prompt it.

The projected queries replace `num_query_tokens` image placeholder tokens (`config.image_token_id`) in the LLM's input
ids, as in transformers' `Blip2ForConditionalGeneration`, whose checkpoints this model also loads. An instruction-aware
Q-Former (InstructBLIP) also reads the instruction (`qformer_input_ids`); videos (InstructBLIP-Video) run frame by
frame, each frame's queries taking `num_query_tokens` placeholders. transformers' InstructBLIP and InstructBLIP-Video
checkpoints load too.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration import Blip2BridgeConfig
from .hub import IMAGE_TO_TEXT_PIPELINE
from .modeling_qformer import Blip2BridgeQFormerModel
from .modeling_vision import Blip2BridgeImageFeaturesOutput, Blip2BridgeImageQueryModel

logger = logging.get_logger(__name__)

# Arguments of transformers' Blip2ForConditionalGeneration.forward that this model takes another way. Passed on, the
# LLM would accept them and ignore them: they are refused, with the way this model takes them.
TAKEN_ANOTHER_WAY = {
    "mm_encoder_outputs": "pass image_features = model.get_image_features(pixel_values).pooler_output instead",
}

@dataclass
class Blip2BridgeForConditionalGenerationOutput(ModelOutput):
    """
    loss: the language-modelling loss on the text targets of `labels` (image positions are never targets).
    logits: (batch, sequence_length, vocab_size) the LLM's logits (decoder positions for an encoder-decoder LLM).
    image_features: (batch, num_query_tokens, llm_hidden_size) the projected query outputs that replaced the image
        placeholder tokens; pass them back as `image_features` to ask more about the same images.
    language_model_outputs: the LLM's own output (its cache, encoder states, and with `output_hidden_states` /
        `output_attentions` its hidden states / attention weights).
    image_outputs: `get_image_features`' output for the images given (pixels or image_embeds): the tower's and the
        query pass's hidden states and attentions when asked.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    language_model_outputs: CausalLMOutputWithPast | Seq2SeqLMOutput | None = None
    image_outputs: Blip2BridgeImageFeaturesOutput | None = None

    def to_tuple(self):
        return tuple(
            self[k].to_tuple() if k in ("language_model_outputs", "image_outputs") else self[k] for k in self.keys()
        )


class Blip2BridgeForConditionalGeneration(Blip2BridgeImageQueryModel, GenerationMixin):
    """BLIP-2 stage 2: vision encoder (frozen), queries, Q-Former, language projection and an LLM (frozen by default).

    The Q-Former is built as `config.qformer_config` says: the configs that builders, converters and
    `config_from_blip2` make set `use_text_input=False`, so it carries no text-side weights and the queries read the
    image alone. A Q-Former configured with `use_text_input=True` (InstructBLIP, `config_from_instructblip`) keeps them:
    given `qformer_input_ids`, the queries read the instruction too; without them, the image alone.

    Images are (batch, 3, height, width); videos (batch, frames, 3, height, width), as transformers' InstructBLIP-Video:
    every frame goes through the tower and the query pass (with the sample's instruction), and the sample's
    `frames * num_query_tokens` image features fill as many placeholders in its prompt.
    """

    config: Blip2BridgeConfig
    # transformers' BLIP-2 checkpoints hold no vision `post_layernorm` of ours: theirs becomes our `vision_layernorm`,
    # and the Q-Former never reads the vision tower's own final norm. Not a weight to report as missing.
    _keys_to_ignore_on_load_missing = [r"^vision_model\.post_layernorm\."]
    hub_auto_classes = ("AutoModelForImageTextToText",)
    # As transformers' BLIP-2: the queries and the Q-Former stay float32 when the model loads in half precision; the
    # query outputs are cast to the language projection's precision (`project_query_output`).
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    # Trainer passes `num_items_in_batch` to forward, which normalises the loss by the step's target count: gradient
    # accumulation and data parallelism then give the token mean of the full batch.
    accepts_loss_kwargs = True
    hub_custom_pipelines = {"image-to-text": IMAGE_TO_TEXT_PIPELINE}

    def __init__(self, config: Blip2BridgeConfig):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("a stage-2 model needs config.text_config, the language model's configuration")
        qformer_config = config.qformer_config
        self._build_vision(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.qformer = Blip2BridgeQFormerModel(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)
        if config.text_config.is_encoder_decoder:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._freeze_frozen_modules()
        self.post_init()

    def _freeze_frozen_modules(self):
        super()._freeze_frozen_modules()
        if self.config.freeze_language_model and hasattr(self, "language_model"):  # built after the vision tower
            self.language_model.requires_grad_(False)

    # transformers' BLIP-2 and InstructBLIP folders load too (`transformers_formats.converted_config`).
    stage = 2

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality=None):
        if modality is None:
            return self.language_model.get_encoder()
        return super().get_encoder(modality=modality)

    # ---- image features -------------------------------------------------------------------------------------------

    def project_query_output(self, query_output: torch.Tensor) -> torch.Tensor:
        """(batch, num_query_tokens, llm_hidden_size): the query outputs in the LLM's embedding space, what
        `get_image_features(...).pooler_output` holds. Compute them once per image and pass them as `image_features`
        to `forward`/`generate` for every question."""
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> "Blip2BridgeImageFeaturesOutput | tuple":
        """The images (or videos) through the tower and the query pass; see `Blip2BridgeImageQueryModel`'s.

        Videos, as transformers' InstructBLIP-Video: pixel_values (batch, frames, 3, height, width) or image_embeds
        (batch, frames, image_length, vision_width). The frames run as one batch of images, each with its sample's
        instruction (qformer_input_ids / qformer_attention_mask: (batch, length), repeated per frame); `pooler_output`
        and `query_output` then hold each sample's frames one after the other, (batch, frames * num_query_tokens,
        width), what fills the prompt's `frames * num_query_tokens` placeholders; the other fields hold one row per
        frame (batch * frames, ...). vision_features: the tower's cached output, as `forward` takes it.
        """
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds
        )
        video = pixel_values if pixel_values is not None and pixel_values.dim() == 5 else None
        if video is None and pixel_values is None and image_embeds is not None and image_embeds.dim() == 4:
            video = image_embeds
        if video is not None:
            if pixel_values is not None and image_embeds is not None:
                raise ValueError("pass exactly one of pixel_values and image_embeds")
            batch_size, frames = video.shape[:2]
            if 0 in (batch_size, frames):
                raise ValueError(f"the video has shape {tuple(video.shape)}; expected at least one video of one frame")
            if pixel_values is not None:
                pixel_values = video.flatten(0, 1)  # the frames as one batch of images
            else:
                image_embeds = video.flatten(0, 1)
            if qformer_input_ids is not None:
                if qformer_input_ids.dim() != 2 or qformer_input_ids.shape[0] != batch_size:
                    raise ValueError(
                        f"qformer_input_ids has shape {tuple(qformer_input_ids.shape)}; expected ({batch_size}, "
                        "length): one instruction per video, read with each of its frames"
                    )
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
                if qformer_attention_mask is not None:
                    qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        output = super().get_image_features(
            pixel_values,
            image_embeds,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        )
        if video is not None:
            output.pooler_output = output.pooler_output.reshape(batch_size, frames * self.config.num_query_tokens, -1)
            output.query_output = output.query_output.reshape(batch_size, frames * self.config.num_query_tokens, -1)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _image_outputs(
        self, pixel_values, image_embeds, image_features, **query_pass
    ) -> tuple[torch.Tensor, Blip2BridgeImageFeaturesOutput | None]:
        """(image_features, get_image_features' output, None when image_features were given). query_pass: the
        instruction (qformer_input_ids, qformer_attention_mask) and the output_* flags of `get_image_features`."""
        if image_features is None:
            image_outputs = self.get_image_features(pixel_values, image_embeds, return_dict=True, **query_pass)
            return image_outputs.pooler_output, image_outputs
        if query_pass.get("qformer_input_ids") is not None:
            raise ValueError(
                "qformer_input_ids and image_features given: image_features already hold what the queries read of "
                "their instruction; pass pixel_values (or image_embeds) with the instruction instead"
            )
        return self._resolve_image_features(pixel_values, image_embeds, image_features), None

    def _resolve_image_features(self, pixel_values, image_embeds, image_features) -> torch.Tensor:
        if image_features is None:
            return self.get_image_features(pixel_values, image_embeds, return_dict=True).pooler_output
        if pixel_values is not None or image_embeds is not None:
            raise ValueError("pass exactly one of pixel_values, image_embeds and image_features")
        num_query_tokens, width = self.config.num_query_tokens, self.config.text_config.hidden_size
        if (
            image_features.dim() != 3
            or image_features.shape[-1] != width
            or image_features.shape[1] == 0
            or image_features.shape[1] % num_query_tokens
        ):
            raise ValueError(
                f"image_features has shape {tuple(image_features.shape)}; expected (batch, {num_query_tokens}, {width}) "
                f"for images, (batch, frames * {num_query_tokens}, {width}) for videos"
            )
        return image_features

    def _embed_with_image_features(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings of `input_ids`, the image placeholders replaced by the image features."""
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("config.image_token_id is not set: the LLM's input ids need an image placeholder token")
        if input_ids.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"input_ids has batch size {input_ids.shape[0]} but there are {image_features.shape[0]} images; "
                "each prompt needs one image"
            )
        is_image = input_ids == image_token_id
        counts = is_image.sum(dim=1)
        # num_query_tokens per image; per frame for a video (transformers' InstructBLIP-Video).
        num_query_tokens, expected = self.config.num_query_tokens, image_features.shape[1]
        if (counts != expected).any():
            frames = expected // num_query_tokens
            expectation = (
                f"{expected} in every row (num_query_tokens={num_query_tokens} for each of {frames} frames)"
                if frames > 1
                else f"num_query_tokens={num_query_tokens} in every row"
            )
            raise ValueError(
                f"input_ids rows hold {counts.tolist()} image placeholder tokens (id {image_token_id}); expected "
                + expectation
            )
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), image_features)

    def _decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        """The encoder-decoder LLM's decoder inputs for `labels`: the labels shifted right, as the LLM makes them."""
        prepare = getattr(self.language_model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError(
                f"{type(self.language_model).__name__} cannot make decoder_input_ids from labels "
                "(no prepare_decoder_input_ids_from_labels); pass decoder_input_ids with the labels"
            )
        return prepare(labels=labels)

    def _check_language_model_kwargs(self, kwargs: dict) -> None:
        """Refuses what the LLM would take and silently not honour."""
        for name, alternative in TAKEN_ANOTHER_WAY.items():
            if kwargs.pop(name, None) not in (None, False):
                raise ValueError(f"{name} is not taken by {type(self).__name__}.forward: {alternative}")
        attention = self.language_model.config._attn_implementation
        if kwargs.get("output_attentions") and attention != "eager":
            # As transformers' BLIP-2 the call goes on (the LLM returns what its attention computes), with a word why
            # its attentions may be empty.
            logger.warning_once(
                f"output_attentions=True, but the language model runs {attention!r} attention, which may compute no "
                "attention weights; load the model with attn_implementation='eager' to get them"
            )

    # ---- training and scoring -------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> Blip2BridgeForConditionalGenerationOutput:
        r"""
        pixel_values: (batch, 3, height, width) images or (batch, frames, 3, height, width) videos, or
        image_embeds: (batch, image_length, vision_width) features after the vision LayerNorm (a video: (batch, frames,
            image_length, vision_width)), or
        image_features: (batch, num_query_tokens, llm_hidden_size) from `get_image_features(...).pooler_output`
            (a video: (batch, frames * num_query_tokens, llm_hidden_size)), or
        vision_features: (batch, image_length, vision_width) the frozen tower's output at `vision_feature_layer`,
            before `vision_layernorm`, as `blip2-bridge cache-features` stores it (a video: (batch, frames,
            image_length, vision_width)): the LayerNorm runs (and trains).
        qformer_input_ids, qformer_attention_mask: (batch, length) the instruction in Q-Former tokens, read by the
            queries of an instruction-aware (InstructBLIP) model, whose Q-Former is built with `use_text_input=True`;
            transformers' InstructBLIP names. Without them such a model's queries read the image alone.
        interpolate_pos_encoding: let a tower with a fixed position table read pixel_values of another size than
            `vision_config.image_size` (fine-tuning at a higher resolution), as transformers' BLIP-2.
        input_ids: (batch, length) LLM token ids holding `num_query_tokens` placeholders of id `config.image_token_id`
            per row (per frame for a video: `frames * num_query_tokens`); attention_mask: 1 for real tokens.
        labels: decoder-only LLM: (batch, length) targets aligned with `input_ids` (shifted inside the loss), -100
            ignored; the image positions never count. Encoder-decoder LLM: the decoder's targets, as T5's `labels`
            (decoder_input_ids default to them shifted right).
        num_items_in_batch (keyword, from `Trainer`): the number of targets in the whole optimiser step; the loss is
            then this batch's summed token loss divided by it. Trainer counts `labels != -100` (after the first
            position for a decoder-only LLM): put -100 on the image placeholders, as the training collators do.
        output_hidden_states, output_attentions and the LLM's other keywords (`use_cache`, ...) go to the LLM; what it
            returns for them is in `language_model_outputs` (attention weights need the LLM's eager attention).
        return_dict: False returns the output as a tuple (`ModelOutput.to_tuple()`), as transformers' BLIP-2 does.
        """
        if input_ids is None:
            raise ValueError("input_ids is required: the prompt with its image placeholder tokens")
        # PEFT's task wrappers (PeftModelForCausalLM, ...) pass these explicitly, as None.
        if kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("inputs_embeds are built here from input_ids and the image features; pass input_ids")
        self._check_language_model_kwargs(kwargs)
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds, image_features=image_features
        )
        image_features, image_outputs = self._image_outputs(
            pixel_values,
            image_embeds,
            image_features,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=kwargs.get("output_attentions"),
            output_hidden_states=kwargs.get("output_hidden_states"),
        )
        inputs_embeds = self._embed_with_image_features(input_ids, image_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Trainer passes the number of target tokens of the whole optimiser step (all accumulated micro-batches, all
        # processes): the loss is their sum over this micro-batch divided by it, so that accumulated micro-batches
        # and processes add up to the token mean of the full batch. Without it, the mean over this batch's targets.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # Pre-shifted targets (shift_labels[t] is the target of logit t), as sequence-parallel training passes them.
        shift_labels = kwargs.pop("shift_labels", None)
        if self.config.text_config.is_encoder_decoder:
            # The LLM gets no labels: its own loss is a plain mean that ignores num_items_in_batch.
            if labels is not None and decoder_input_ids is None:
                decoder_input_ids = self._decoder_input_ids_from_labels(labels)
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                return_dict=True,
                **kwargs,
            )
            logits, loss = outputs.logits, None
            if labels is not None:
                # The decoder's logit t predicts labels[t]: no shift.
                loss = self.loss_function(
                    logits=logits,
                    labels=None,
                    shift_labels=(labels if shift_labels is None else shift_labels).to(logits.device),
                    vocab_size=logits.shape[-1],
                    num_items_in_batch=num_items_in_batch,
                )
        else:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, **kwargs
            )
            logits, loss = outputs.logits, None
            if labels is not None or shift_labels is not None:
                # As transformers' BLIP-2, shorter labels align with the end of the sequence; logit t predicts
                # labels[t + 1] (the loss shifts them), or shift_labels[t] when given. Image positions are no target.
                targets = labels if shift_labels is None else shift_labels
                targets = targets.to(logits.device)
                is_image = (input_ids == self.config.image_token_id).to(targets.device)
                if shift_labels is not None:
                    is_image = nn.functional.pad(is_image[:, 1:], (0, 1), value=False)  # the target of logit t is token t + 1
                targets = targets.masked_fill(is_image[:, -targets.shape[1] :], -100)
                loss = self.loss_function(
                    logits=logits[:, -targets.shape[1] :],
                    labels=None if shift_labels is not None else targets,
                    shift_labels=targets if shift_labels is not None else None,
                    vocab_size=logits.shape[-1],
                    num_items_in_batch=num_items_in_batch,
                )
        return Blip2BridgeForConditionalGenerationOutput(
            loss=loss,
            logits=logits,
            image_features=image_features,
            language_model_outputs=outputs,
            image_outputs=image_outputs,
        )

    # ---- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Answers or captions through the LLM's `generate` (greedy, beams, sampling, ...), as transformers' BLIP-2.

        input_ids: the prompts with their image placeholders (left-pad batched prompts); default the placeholders
        followed by the LLM's BOS (decoder-only) or EOS (encoder-decoder, as T5's tokenizer ends an empty prompt),
        i.e. captioning. A decoder-only LLM returns the prompt followed by the new tokens; an encoder-decoder one the
        decoder's tokens. pixel_values, image_embeds, image_features, qformer_input_ids, qformer_attention_mask: as for
        `forward` (images or videos; the instruction an instruction-aware Q-Former reads). interpolate_pos_encoding:
        let a tower with a fixed position table read pixel_values of another size than `vision_config.image_size`, as
        transformers' BLIP-2 `generate` and `forward`. vision_features: the tower's cached output, as for `forward`.
        """
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds, image_features=image_features
        )
        image_features, _ = self._image_outputs(
            pixel_values,
            image_embeds,
            image_features,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        text_config = self.config.text_config
        if input_ids is None:
            start_token_id = text_config.eos_token_id if text_config.is_encoder_decoder else text_config.bos_token_id
            start_tokens = [self.config.image_token_id] * image_features.shape[1]  # frames * queries for a video
            start_tokens += [] if start_token_id is None else [start_token_id]
            input_ids = torch.tensor([start_tokens], device=image_features.device).repeat(image_features.shape[0], 1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {
            "inputs_embeds": self._embed_with_image_features(input_ids, image_features),
            "attention_mask": attention_mask,
        }
        if not text_config.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        return self.language_model.generate(**inputs, **generate_kwargs)


__all__ = [
    "Blip2BridgeForConditionalGeneration",
    "Blip2BridgeForConditionalGenerationOutput",
]
