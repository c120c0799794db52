"""Stage 1 of BLIP-2: the Q-Former learns to read a frozen image encoder through ITC, ITM and ITG."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .compat import CACHE_KEYWORD, is_traced, pop_cache
from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .losses import (
    gather_across_processes,
    gather_text_across_processes,
    has_two_distinct_images,
    image_grounded_generation_loss,
    image_text_contrastive_loss,
    image_text_matching_loss,
    itc_positive_mask,
    max_over_queries_similarity,
    pad_to_length,
    sample_hard_negatives,
    world_size_and_rank,
)
from .modeling_qformer import Blip2BridgePreTrainedModel, Blip2BridgeQFormerModel, QFormerRows
from .modeling_vision import Blip2BridgeImageQueryModel
from .transformers_formats import BLIP2_RETRIEVAL_ARCHITECTURE, NOT_IN_BLIP2_RETRIEVAL


logger = logging.get_logger(__name__)


class ScalarTemperature(ConversionOps):
    """`from_pretrained` reads the 0-d `temp` of a file (LAVIS's shape, and ours on disk) into the model's 1-element
    vector; `save_pretrained` runs the reverse and writes it 0-d again."""

    def __init__(self, shape: tuple[int, ...] = (1,)):
        self.shape = shape

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        (tensors,) = input_dict.values()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(self.shape)}

    @property
    def reverse_op(self) -> "ScalarTemperature":
        return ScalarTemperature(() if self.shape == (1,) else (1,))


@dataclass
class Blip2BridgeModelOutput(ModelOutput):
    """
    loss: loss_itc + loss_itm + loss_itg, when text is given and `return_loss` is not False.
    loss_itc, loss_itm, loss_itg: the three stage-1 objectives.
    logits_per_image: (batch, gathered_batch) image-to-text similarities divided by the temperature.
    logits_per_text: (batch, gathered_batch) text-to-image similarities divided by the temperature.
    itm_logits: (3 * batch, 2) matching logits for [positive pairs; (negative image, text); (image, negative text)].
    image_feats: (batch, num_query_tokens, embed_dim) L2-normalised query embeddings for ITC.
    text_feats: (batch, embed_dim) L2-normalised [CLS] embeddings for ITC.
    query_output: (batch, num_query_tokens, hidden_size) the Q-Former's query outputs, the visual representation.
    image_embeds: (batch, image_length, vision_width) the features the Q-Former cross-attended to.
    hidden_states, attentions: with output_hidden_states / output_attentions, those of the query pass (the queries
        over the images, whose output is `query_output`): the embeddings and every layer, every layer's
        self-attention weights.
    vision_model_output: the vision tower's output (its hidden states and attentions when asked), from pixels.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    image_feats: torch.FloatTensor | None = None
    text_feats: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_model_output: ModelOutput | None = None


class Blip2BridgeTextPredictionHead(nn.Module):
    """BERT's LM head: dense + activation + LayerNorm, then the vocabulary projection tied to the word embeddings."""

    def __init__(self, config: Blip2BridgeQFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.activation(self.dense(hidden_states))))


def rows_where(flags: torch.Tensor) -> list[int]:
    return flags.nonzero().flatten().tolist()


def non_finite_kind(tensor: torch.Tensor) -> str:
    kinds = [kind for kind, found in (("NaN", tensor.isnan().any()), ("inf", tensor.isinf().any())) if found]
    return " and ".join(kinds)


def refuse_non_finite_image_embeds(
    image_embeds: torch.Tensor, pixel_values: torch.Tensor | None, across_processes: bool
) -> None:
    """NaN or inf image features would surface far away (the ITM sampler's "probability tensor contains inf/nan")."""
    if is_traced():
        return
    rows = image_embeds.flatten(1)
    flags = torch.stack([rows.isnan().any(dim=1), rows.isinf().any(dim=1)], dim=1).long()
    world_size, rank = world_size_and_rank()
    if across_processes:
        flags = gather_across_processes(flags)
    if not flags.any():
        return
    kind = " and ".join(name for name, found in zip(("NaN", "inf"), flags.any(dim=0).tolist()) if found)
    where = f"rows {rows_where(flags.any(dim=1))}"
    if across_processes and world_size > 1:
        where += (
            f" of the batch gathered over {world_size} processes ({image_embeds.shape[0]} rows each, this is "
            f"process {rank})"
        )
    if pixel_values is None:
        hint = "check the image_embeds given (e.g. cached features)"
    elif not torch.isfinite(pixel_values).all():
        bad_pixels = ~torch.isfinite(pixel_values.flatten(1)).all(dim=1)
        hint = (
            f"pixel_values already hold {non_finite_kind(pixel_values)} in rows {rows_where(bad_pixels)} of this "
            "process's batch: check the images and their preprocessing"
        )
    else:
        hint = "check pixel_values and the vision tower's weights (vision_model, vision_layernorm)"
    raise ValueError(f"image_embeds hold {kind} in {where}: {hint}")


def refuse_non_finite_similarities(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_feats: torch.Tensor, text_feats: torch.Tensor, temp
) -> None:
    """Called after the image features passed: non-finite similarities come from the Q-Former side or `temp`.

    Every process sees every gathered image and text in its similarities, so all of them refuse together.
    """
    if is_traced() or (torch.isfinite(sim_i2t).all() & torch.isfinite(sim_t2i).all()).item():
        return
    image_rows = rows_where(~torch.isfinite(image_feats.flatten(1)).all(dim=1))
    text_rows = rows_where(~torch.isfinite(text_feats).all(dim=1))
    raise ValueError(
        f"the ITC similarities hold {non_finite_kind(torch.cat([sim_i2t.flatten(), sim_t2i.flatten()]))} (rows "
        f"{rows_where(~torch.isfinite(sim_i2t).all(dim=1))} of logits_per_image, "
        f"{rows_where(~torch.isfinite(sim_t2i).all(dim=1))} of logits_per_text) although image_embeds are finite; "
        f"image_feats are not finite in rows {image_rows}, text_feats in rows {text_rows}, "
        f"temp = {float(temp.detach()):g}. "
        "Check the Q-Former, vision_proj, text_proj and temp weights (a diverged step: lower the learning rate; "
        "fp16 overflow: train in bf16 or fp32)"
    )


def refuse_batch_without_negatives(
    images: torch.Tensor, gathered_image_ids: torch.Tensor | None, gathered_size: int, world_size: int
) -> None:
    """ITC and ITM contrast each pair with the other images of the gathered batch; with one image there are none."""
    if is_traced() or has_two_distinct_images(images, gathered_image_ids):
        return
    if gathered_size == 1:
        reason = "a batch of 1"
    elif gathered_image_ids is not None:
        reason = f"every image_id is {int(gathered_image_ids[0])}"
    else:
        reason = f"all {gathered_size} images are identical, e.g. a collator repeating its one readable sample"
    pairs = f"{gathered_size} pairs" if gathered_size > 1 else "1 pair"
    processes = f"{world_size} processes" if world_size > 1 else "1 process"
    raise ValueError(
        f"the stage-1 losses need at least 2 distinct images in the batch gathered over all processes; this one "
        f"({pairs} over {processes}) has 1: {reason}. ITC would be 0 and ITM's negatives would be the "
        "positive pair itself labelled 0. Use a bigger batch or more processes (gradient accumulation adds no "
        "in-batch negatives); for similarities without the losses pass return_loss=False"
    )


class Blip2BridgeModel(Blip2BridgeImageQueryModel):
    """BLIP-2 stage 1: vision encoder (frozen), learned queries, Q-Former, ITC projections, ITM head and ITG head.

    `forward` returns `loss = loss_itc + loss_itm + loss_itg`, computed as the original implementation does.
    """

    config: Blip2BridgeConfig
    hub_auto_classes = ("AutoModelForPreTraining",)
    # Everything that trains stays float32 when the model loads in float16 (dtype=torch.float16), as the original
    # trains these in float32 beside an fp16 tower; the frozen tower computes in the precision asked. transformers
    # applies this list to float16 only: dtype=torch.bfloat16 loads everything in bfloat16
    # (tests/test_mixed_precision.py measures both).
    _keep_in_fp32_modules = [
        "query_tokens", "qformer", "vision_layernorm", "vision_proj", "text_proj", "itm_head", "itg_head", "temp"
    ]
    _tied_weights_keys = {"itg_head.decoder.weight": "qformer.word_embeddings.weight"}
    # transformers' BLIP-2 folders (`from_pretrained`) hold no vision `post_layernorm` of ours: theirs becomes our
    # `vision_layernorm`, and the Q-Former never reads the tower's own final norm. Not a weight to report as missing.
    _keys_to_ignore_on_load_missing = [r"^vision_model\.post_layernorm\."]

    def __init__(self, config: Blip2BridgeConfig):
        super().__init__(config)
        qformer_config = config.qformer_config
        if not qformer_config.use_text_input:
            raise ValueError(
                "this configuration's Q-Former reads no text (use_text_input=False), as a stage-2 model's: load it with "
                "Blip2BridgeForConditionalGeneration (AutoModelForImageTextToText); a stage-1 model needs the text side"
            )
        self._build_vision(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.qformer = Blip2BridgeQFormerModel(qformer_config)
        self.vision_proj = nn.Linear(qformer_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(qformer_config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qformer_config.hidden_size, 2)
        self.itg_head = Blip2BridgeTextPredictionHead(qformer_config)
        # One number, held as a 1-element vector: FSDP refuses 0-d parameters ("FSDP doesn't support scalar
        # parameters") and DeepSpeed cannot broadcast them. Files keep LAVIS's 0-d `temp` (`ScalarTemperature`).
        self.temp = nn.Parameter(torch.full((1,), config.initial_temperature))
        self.post_init()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A 0-d `temp` (a saved model, a Trainer checkpoint, the LAVIS converter) loads into the 1-element vector.
        key = prefix + "temp"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # transformers' Blip2ForImageTextRetrieval folders load too (`transformers_formats.converted_config`); that format
    # holds no ITC temperature and no ITG head: they are initialised as the original initialises them (`temp` =
    # config.initial_temperature, the ITG head as BERT's LM head with its decoder tied to the word embeddings), and
    # `report_conversion` names them.
    stage = 1

    def report_conversion(self, source) -> None:
        logger.warning(
            f"{source} is in transformers' {BLIP2_RETRIEVAL_ARCHITECTURE} format, which holds no "
            f"{', '.join(NOT_IN_BLIP2_RETRIEVAL)}: initialised as the original BLIP-2 does (temp = "
            f"{float(self.temp.detach()):g}; the ITG head as BERT's LM head, its decoder weight tied to "
            "qformer.word_embeddings). ITM and ITC scores are the checkpoint's; ITG (the loss_itg part of the loss) and "
            "caption generation need training first"
        )

    def get_input_embeddings(self):
        return self.qformer.word_embeddings

    def set_input_embeddings(self, value):
        self.qformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.itg_head.decoder

    def set_output_embeddings(self, value):
        self.itg_head.decoder = value

    # ---- features -------------------------------------------------------------------------------------------------

    def project_query_output(self, query_output: torch.Tensor) -> torch.Tensor:
        """(batch, num_query_tokens, embed_dim) L2-normalised query embeddings, the image side of ITC: what
        `get_image_features(...).pooler_output` holds."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """The unimodal text pass, as transformers' `get_text_features` returns it: `pooler_output` (batch, embed_dim)
        holds the L2-normalised [CLS] embeddings, the text side of ITC; `last_hidden_state` the Q-Former's text
        outputs; `hidden_states`/`attentions` when asked (default: the config's)."""
        self._check_text(input_ids, attention_mask)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        text_output = self.qformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=text_output.last_hidden_state,
            pooler_output=F.normalize(self.text_proj(text_output.last_hidden_state[:, 0]), dim=-1),
            hidden_states=text_output.hidden_states,
            attentions=text_output.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _text_feats(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`get_text_features(...).pooler_output` of word embeddings, computing [CLS] alone in the last layer."""
        text_output = self.qformer(
            inputs_embeds=text_embeds, attention_mask=attention_mask, rows=QFormerRows(output_rows=1)
        ).last_hidden_state
        return F.normalize(self.text_proj(text_output[:, 0]), dim=-1)

    def get_itm_logits(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        *,
        image_index: torch.LongTensor | None = None,
        text_index: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_key_values: list | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(num_pairs, 2) image-text matching logits; softmax(...)[:, 1] is the probability that the pair matches.

        Pair p is text `text_index[p]` (default text p) with image `image_index[p]` (default image p), so one image is
        scored against many texts (and one text against many images) while each is computed once.
        inputs_embeds: the texts' word embeddings instead of input_ids.
        image_key_values: `qformer.project_image(image_embeds)` instead of pixels or image_embeds, to score the same
            images over several calls (retrieval) with their cross-attention keys/values projected once.
        vision_features: the tower's cached output instead of pixels, as `forward` takes it.
        """
        if inputs_embeds is None:
            self._check_text(input_ids, attention_mask)
        if image_key_values is None:
            image_embeds = self._resolve_image_embeds(pixel_values, image_embeds, vision_features=vision_features)
        num_texts = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        num_images = image_embeds.shape[0] if image_key_values is None else image_key_values[0].shape[1]
        self._check_pairs(num_texts, num_images, text_index, image_index)
        output = self.qformer(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            query_embeds=self.query_tokens,
            image_embeds=image_embeds,
            image_key_values=image_key_values,
            rows=QFormerRows(
                input_index=text_index,
                image_index=image_index,
                output_rows=self.config.num_query_tokens,
            ),
        ).last_hidden_state
        # The original averages the 2-way head over the query positions only.
        return self.itm_head(output).mean(dim=1)

    @staticmethod
    def _check_pairs(num_texts: int, num_images: int, text_index, image_index):
        """Refuses pairings that do not give each pair one text and one image (from shapes only: no host sync)."""
        for name, index in (("text_index", text_index), ("image_index", image_index)):
            if index is not None and index.dim() != 1:
                raise ValueError(f"{name} has shape {tuple(index.shape)}; expected (num_pairs,)")
        num_text_rows = num_texts if text_index is None else len(text_index)
        num_image_rows = num_images if image_index is None else len(image_index)
        if num_text_rows != num_image_rows:
            raise ValueError(
                f"{num_text_rows} texts{'' if text_index is None else ' (text_index)'} but {num_image_rows} "
                f"images{'' if image_index is None else ' (image_index)'}: each pair needs one text and one image; "
                "pair them with text_index and image_index"
            )

    def _check_text(self, input_ids, attention_mask, batch_size: int | None = None):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, text_length) with text_length >= 1 "
                "(tokenize with the processor: even an empty caption becomes [CLS] [SEP])"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if batch_size is not None and input_ids.shape[0] != batch_size:
            raise ValueError(
                f"input_ids has batch size {input_ids.shape[0]} but there are {batch_size} images; "
                "each text needs one image"
            )
        vocab_size = self.config.qformer_config.vocab_size
        if not is_traced() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0].item()
            raise ValueError(
                f"input_ids holds token id {bad}; expected ids in [0, {vocab_size}) (the Q-Former's vocabulary: "
                "tokenize with the model's processor)"
            )

    # ---- stage-1 objectives ---------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool = True,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
    ) -> Blip2BridgeModelOutput | tuple:
        r"""
        pixel_values: (batch, 3, height, width) images, or
        image_embeds: (batch, image_length, vision_width) features after the vision LayerNorm, instead of pixels, or
        vision_features: (batch, image_length, vision_width) the frozen tower's output at `vision_feature_layer`,
            before `vision_layernorm`, as `blip2-bridge cache-features` stores it: the LayerNorm runs (and trains).
        input_ids: (batch, text_length) Q-Former (BERT) token ids, [CLS] first; attention_mask: 1 for real tokens.
        image_ids: (batch,) optional ids of the images; captions of the same image are all ITC positives and never
            drawn as ITM negatives of each other.
        return_loss: compute ITC + ITM + ITG (default: whenever text is given). False stops after the ITC
            similarities.
        return_dict: False returns a tuple of the output's fields that are set.
        output_attentions, output_hidden_states: return those of the query pass (the queries over the images) and
            of the vision tower (`vision_model_output`); the text passes' are `get_text_features`' and
            `model.qformer(...)`'s to give. Default: the config's.
        labels: refused: the ITG targets are `input_ids` themselves.
        interpolate_pos_encoding: let a tower with a fixed position table read pixel_values of another size than
            `vision_config.image_size` (its position table interpolated, as transformers' BLIP-2 does).

        In eval mode the ITM hard negatives come from a generator seeded alike on every call, so that identical calls
        (and an evaluation loss) give identical results; training draws from torch's global generator, as the
        original.

        The losses need in-batch negatives: a batch gathered over all processes that holds a single image (a batch
        of 1, one image_id, or identical rows of pixel_values / image_embeds) raises a ValueError, as do NaN or inf
        image features or similarities (naming the rows).
        """
        if labels is not None:
            raise ValueError(
                "Blip2BridgeModel.forward takes no labels: ITG predicts input_ids themselves (padding, marked by "
                "attention_mask, is ignored); pass input_ids and attention_mask only"
            )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds
        )
        given_images = image_embeds if pixel_values is None else pixel_values
        vision_model_output = None
        if pixel_values is not None and image_embeds is None:
            image_embeds, vision_model_output = self.run_vision_model(
                pixel_values,
                interpolate_pos_encoding,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
        else:
            image_embeds = self._resolve_image_embeds(pixel_values, image_embeds)  # refuses both or neither
        batch_size = image_embeds.shape[0]
        query_outputs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        # With text, every process runs the ITC gathers below: the check gathers too, so that all of them refuse.
        refuse_non_finite_image_embeds(image_embeds, pixel_values, across_processes=input_ids is not None)
        if input_ids is None:
            query_pass = self.get_query_output(image_embeds, **query_outputs)
            output = Blip2BridgeModelOutput(
                image_feats=self.project_query_output(query_pass.last_hidden_state),
                query_output=query_pass.last_hidden_state,
                image_embeds=image_embeds,
                hidden_states=query_pass.hidden_states,
                attentions=query_pass.attentions,
                vision_model_output=vision_model_output,
            )
            return output if return_dict else output.to_tuple()
        self._check_text(input_ids, attention_mask, batch_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_ids is not None and image_ids.shape != (batch_size,):
            raise ValueError(f"image_ids has shape {tuple(image_ids.shape)}; expected ({batch_size},)")
        return_loss = True if return_loss is None else return_loss
        if return_loss and input_ids.shape[1] < 2:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: ITG predicts each token after [CLS], so the losses need "
                "text_length >= 2 ([CLS] and at least [SEP]; the processor gives even an empty caption both); for "
                "similarities alone pass return_loss=False"
            )

        # The images' cross-attention keys/values serve both the query pass and ITM. The query pass keeps its
        # self-attention keys/values: the ITG text pass below attends to them.
        image_key_values = self.qformer.project_image(image_embeds)
        query_pass = self.get_query_output(
            image_embeds, use_cache=return_loss, image_key_values=image_key_values, **query_outputs
        )
        query_output = query_pass.last_hidden_state
        image_feats = self.project_query_output(query_output)
        # What the output reports besides the objectives, in every return below.
        passes = dict(
            hidden_states=query_pass.hidden_states,
            attentions=query_pass.attentions,
            vision_model_output=vision_model_output,
        )
        # One word-embedding lookup serves the ITC, ITM and ITG text passes ([DEC] looked up alongside): each
        # further lookup would cost a dense vocabulary-sized gradient in backward.
        dec_column = torch.full_like(input_ids[:, :1], self.config.qformer_config.bos_token_id)
        text_embeds, dec_embeds = self.qformer.word_embeddings(torch.cat([input_ids, dec_column], dim=1)).split(
            [input_ids.shape[1], 1], dim=1
        )
        text_feats = self._text_feats(text_embeds, attention_mask)

        # ---- ITC: each image against every text gathered over the processes, by its best-matching query ----
        world_size, rank = world_size_and_rank()
        image_feats_all = gather_across_processes(image_feats, with_grad=self.config.gather_with_grad)
        text_feats_all = gather_across_processes(text_feats, with_grad=self.config.gather_with_grad)
        sim_i2t = max_over_queries_similarity(image_feats, text_feats_all) / self.temp
        sim_t2i = max_over_queries_similarity(image_feats_all, text_feats).t() / self.temp
        refuse_non_finite_similarities(sim_i2t, sim_t2i, image_feats, text_feats, self.temp)
        gathered_image_ids = None if image_ids is None else gather_across_processes(image_ids)
        if not return_loss:
            output = Blip2BridgeModelOutput(
                logits_per_image=sim_i2t,
                logits_per_text=sim_t2i,
                image_feats=image_feats,
                text_feats=text_feats,
                query_output=query_output,
                image_embeds=image_embeds,
                **passes,
            )
            return output if return_dict else output.to_tuple()
        refuse_batch_without_negatives(given_images, gathered_image_ids, batch_size * world_size, world_size)
        positive_mask = itc_positive_mask(image_ids, gathered_image_ids, batch_size, rank, world_size, sim_i2t.device)
        loss_itc = image_text_contrastive_loss(sim_i2t, sim_t2i, positive_mask, positive_mask)

        # ---- ITM: [positives; (hard negative image, text); (image, hard negative text)] through the 2-way head ----
        pairs = self.itm_pairs(sim_i2t, sim_t2i, positive_mask, input_ids, text_embeds, attention_mask, image_embeds,
                               image_key_values)
        itm_logits = self.get_itm_logits(**pairs)
        loss_itm = image_text_matching_loss(itm_logits, num_positives=batch_size)

        # ---- ITG: text is causal and reads every query through the query pass's cached keys/values ----
        decoder_embeds = torch.cat([dec_embeds, text_embeds[:, 1:]], dim=1)  # [DEC] replaces [CLS]
        text_output = self.qformer(
            inputs_embeds=decoder_embeds, attention_mask=attention_mask, cache=query_pass.cache, is_causal=True
        ).last_hidden_state
        # Predict token t+1 from position t; padded targets are left out before the vocabulary projection.
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        predicted = labels != -100
        loss_itg = image_grounded_generation_loss(self.itg_head(text_output[:, :-1][predicted]), labels[predicted])

        output = Blip2BridgeModelOutput(
            loss=loss_itc + loss_itm + loss_itg,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            logits_per_image=sim_i2t,
            logits_per_text=sim_t2i,
            itm_logits=itm_logits,
            image_feats=image_feats,
            text_feats=text_feats,
            query_output=query_output,
            image_embeds=image_embeds,
            **passes,
        )
        return output if return_dict else output.to_tuple()

    def itm_pairs(
        self,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        positive_mask: torch.Tensor,
        input_ids: torch.LongTensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_key_values: list,
    ) -> dict:
        """The 3B pairs of ITM as keyword arguments of `get_itm_logits`: [positive pairs; (hard negative image, text);
        (image, hard negative text)], the negatives drawn from the batch gathered over all processes.

        A hard negative image is drawn for each text first, then a hard negative text for each image, each with
        probability softmax(similarity) over the non-positives (`sample_hard_negatives`). Each distinct text and
        image is stored once and the pairs index them: this process's texts and images, then the negatives that
        live on other processes (texts padded to the longest process; the extra padding is masked).
        """
        batch_size = input_ids.shape[0]
        world_size, _ = world_size_and_rank()
        # Evaluation is reproducible: the same draws on every call (see forward).
        generator = None if self.training else torch.Generator(sim_i2t.device).manual_seed(0)
        negative_image_index = sample_hard_negatives(sim_t2i, positive_mask, generator)
        negative_text_index = sample_hard_negatives(sim_i2t, positive_mask, generator)
        positives = torch.arange(batch_size, device=input_ids.device)
        if world_size > 1:
            # Negatives may live on other processes: bring them here and append them after this process's own.
            input_ids_all, attention_mask_all = gather_text_across_processes(
                input_ids, attention_mask, self.config.qformer_config.pad_token_id
            )
            text_length = input_ids_all.shape[1]
            text_embeds = torch.cat([
                F.pad(text_embeds, (0, 0, 0, text_length - text_embeds.shape[1])),
                self.qformer.word_embeddings(input_ids_all[negative_text_index]),
            ])
            attention_mask = torch.cat(
                [pad_to_length(attention_mask, text_length, 0), attention_mask_all[negative_text_index]]
            )
            image_embeds_all = gather_across_processes(image_embeds, with_grad=True)
            negative_key_values = self.qformer.project_image(image_embeds_all[negative_image_index])
            image_key_values = [
                None if own is None else torch.cat([own, negative], dim=1)
                for own, negative in zip(image_key_values, negative_key_values)
            ]
            negative_text_index = negative_image_index = positives + batch_size
        return {
            "inputs_embeds": text_embeds,
            "attention_mask": attention_mask,
            "text_index": torch.cat([positives, positives, negative_text_index]),
            "image_key_values": image_key_values,
            "image_index": torch.cat([positives, negative_image_index, positives]),
        }

    # ---- captioning with the Q-Former decoder ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Captions images with the ITG decoder, through transformers' `generate` (greedy, beams, sampling, ...).

        input_ids: optional prompt in Q-Former tokens starting with [DEC]; default [DEC] alone. Returns the token ids,
        prompt included; decode them with the processor's tokenizer. interpolate_pos_encoding, vision_features: as for
        `forward`.
        """
        image_embeds = self._resolve_image_embeds(
            pixel_values, image_embeds, interpolate_pos_encoding, vision_features=vision_features
        )
        batch_size = image_embeds.shape[0]
        qformer_config = self.config.qformer_config
        if input_ids is None:
            input_ids = torch.full((batch_size, 1), qformer_config.bos_token_id, device=image_embeds.device)
        if attention_mask is None:
            # generate() extends a mask it is given step by step; decoding positions are counted from it.
            attention_mask = torch.ones_like(input_ids)
        self._check_text(input_ids, attention_mask, batch_size)
        return Blip2BridgeCaptionDecoder(self).generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_embeds=self.query_tokens.expand(batch_size, -1, -1),
            image_embeds=image_embeds,
            **generate_kwargs,
        )

    def _caption_generation_config(self) -> GenerationConfig:
        qformer_config = self.config.qformer_config
        # The original's `Blip2Qformer.generate` (LAVIS blip2_qformer.py): 3 beams, min_length=10, max_length=30,
        # both counting the [DEC] prompt token, as here; [SEP] ends a caption. Its top_p=0.9 applies only to its
        # nucleus-sampling option (which also sets num_beams=1): generate(do_sample=True, top_p=0.9, num_beams=1).
        # Set here, top_p would make transformers warn on every beam-search call.
        return GenerationConfig(
            bos_token_id=qformer_config.bos_token_id,
            eos_token_id=qformer_config.sep_token_id,
            pad_token_id=qformer_config.pad_token_id,
            max_length=30,
            min_length=10,
            num_beams=3,
        )


class Blip2BridgeCaptionDecoder(Blip2BridgePreTrainedModel, GenerationMixin):
    """A view of a stage-1 model's Q-Former and ITG head as a causal LM, so `GenerationMixin` drives captioning.

    It shares the parent's modules (no copy, no new weights) and is built per `generate` call. The first step runs
    the queries (cross-attending to the image) and the prompt in one multimodal-causal pass; later steps read the
    cache, which then holds the queries' keys/values before the text's.
    """

    config: Blip2BridgeQFormerConfig
    main_input_name = "input_ids"

    def __init__(self, model: Blip2BridgeModel):
        super().__init__(model.config.qformer_config)
        self.qformer = model.qformer
        self.itg_head = model.itg_head
        self.generation_config = model._caption_generation_config()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **cache,
    ) -> CausalLMOutputWithPast | tuple:
        """cache: the key/value cache, under the name the installed transformers release gives it ("cache" or
        "past_key_values"); any other keyword is refused."""
        past = pop_cache(cache)
        if cache:
            raise TypeError(f"Blip2BridgeCaptionDecoder.forward got unexpected arguments {sorted(cache)}")
        output = self.qformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_embeds=query_embeds,
            image_embeds=image_embeds,
            is_causal=True,
            cache=past,
            use_cache=use_cache,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        logits = self.itg_head(output.last_hidden_state[:, query_length:])
        result = CausalLMOutputWithPast(
            logits=logits,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            **{CACHE_KEYWORD: output.cache},
        )
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, query_embeds=None, image_embeds=None, **kwargs
    ):
        cache = pop_cache(kwargs)  # `generate` names it as its transformers release does
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Text positions count real tokens from 0, so left-padded prompts line up with unpadded ones.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if cache is not None and cache.get_seq_length() > 0:
            # The queries and earlier tokens are cached; only the newest token runs.
            input_ids, query_embeds, image_embeds = input_ids[:, -1:], None, None
        position_ids = position_ids[:, -input_ids.shape[1] :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_embeds": query_embeds,
            "image_embeds": image_embeds,
            "cache": cache,
            "position_ids": position_ids,
            "use_cache": True,
        }


# overwrite: the module may be imported twice in one process (installed, and as a Hub folder's remote code).
register_checkpoint_conversion_mapping(
    Blip2BridgeModel.__name__,
    [WeightConverter(source_patterns="temp", target_patterns="temp", operations=[ScalarTemperature()])],
    overwrite=True,
)
