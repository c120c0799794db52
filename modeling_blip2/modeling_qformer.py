"""The Querying Transformer (Q-Former): learned queries and text sharing one BERT, queries cross-attending to images.

One module serves the three attention modes of BLIP-2 stage 1:
- text only, bidirectional (ITC text features),
- queries + text, bidirectional (ITM),
- queries + causal text, where queries never see text (ITG, and caption generation with a key/value cache).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .compat import is_traced, select_hidden_states
from .configuration import Blip2BridgeConfig, Blip2BridgeQFormerConfig
from .hub import Blip2BridgeHubMixin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax(q k^T * scale + mask) v, the reference the other attention backends must match."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def qformer_attention_mask(
    key_padding_mask: torch.Tensor | None,
    num_rows: int,
    num_keys: int,
    num_query_rows: int,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Additive (batch, 1, rows, keys) mask for one Q-Former self-attention pass.

    The rows of this pass are the last `num_rows` of the `num_keys` positions (earlier ones come from the cache). In
    causal mode query rows see every query and nothing else, and text rows see every query and the text up to
    themselves: key k is visible from row position p when k < num_query_rows or k <= p. Returns None when every key is
    visible, so attention backends can take their unmasked fast path.
    """
    if not causal and key_padding_mask is None:
        return None
    device = key_padding_mask.device if key_padding_mask is not None else None
    visible = torch.ones(1, 1, num_rows, num_keys, dtype=torch.bool, device=device)
    if causal:
        row_positions = torch.arange(num_keys - num_rows, num_keys, device=device)[:, None]
        key_positions = torch.arange(num_keys, device=device)[None, :]
        visible = visible & ((key_positions < num_query_rows) | (key_positions <= row_positions))
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


def gather_rows(tensors: tuple[torch.Tensor, ...], index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Row `index[r]` of each tensor becomes row r (None: unchanged)."""
    return tensors if index is None else tuple(tensor.index_select(0, index) for tensor in tensors)


@dataclass(frozen=True)
class QFormerRows:
    """Which input and which image each output row of a Q-Former pass reads, and which positions the caller keeps.

    The Q-Former's speed tricks are all asked for here, once per pass; `Blip2BridgeQFormerModel` turns them into one
    `LayerPlan` per layer. Every field is optional: the default is one output row per input row, row r reading image r,
    every position computed.

    input_index: (num_rows,) output row r continues input row `input_index[r]` (its text and queries). Rows that share
        an input stay identical until their queries first meet their images, so the first layer's self-attention and
        text feed-forward run once per distinct input and the rows fan out just before that cross-attention (ITM pairs
        each caption with two images). While dropout is active each row gets its own copy from the start instead, and
        with it its own dropout masks, as in the original.
    image_index: (num_rows,) output row r cross-attends to image `image_index[r]`; one image's keys/values then serve
        all the rows that read it.
    output_rows: the caller reads only the first `output_rows` positions (ITM the queries, ITC the [CLS] token): the
        last layer computes just those.
    """

    input_index: torch.LongTensor | None = None
    image_index: torch.LongTensor | None = None
    output_rows: int | None = None


@dataclass(frozen=True)
class LayerPlan:
    """What one Q-Former layer computes, derived from `QFormerRows` by `Blip2BridgeQFormerModel.plan_layers`.

    attention_mask: additive self-attention mask of this layer's input rows (None: every key visible).
    text_token_index: flat indices of the real text tokens of this layer's input rows, the only ones the text
        feed-forward computes (None: all): padding is never read by a later position (masked) nor by a loss.
    input_index: the rows fan out after this layer's self-attention (the first layer only).
    image_index: which image each output row cross-attends to.
    output_rows: compute only the first positions (the last layer only).
    """

    attention_mask: torch.Tensor | None = None
    text_token_index: torch.LongTensor | None = None
    input_index: torch.LongTensor | None = None
    image_index: torch.LongTensor | None = None
    output_rows: int | None = None


EVERY_ROW = LayerPlan()


class Blip2BridgeQFormerAttention(nn.Module):
    """Multi-head attention + BERT's output block (dense, dropout, residual LayerNorm).

    As self-attention, keys and values are projected from `hidden_states` (and extended by `past_key_value`). As
    cross-attention, `encoder_key_value` holds the image features' keys and values, projected once per image by
    `project_key_value` before the rows that read the image are gathered.

    Keys and values travel as one tensor, stacked on a leading dimension of 2: a layer then gets each as a single
    positional tensor, which gradient checkpointing (reentrant or not) sees as an input, rows are gathered once, and
    keys and values stay contiguous (what the attention kernels read fastest).
    """

    def __init__(self, config: Blip2BridgeQFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the mask we pass says everything; SDPA must not add its own causal mask
        key_value_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_key_value(self, states: torch.Tensor) -> torch.Tensor:
        """(2, batch, length, hidden_size): keys and values stacked. Heads are split where they are used, after any
        gather of rows (along dimension 1): gathering whole contiguous rows costs half as much, backward included. The
        two projections stay module calls, so that adapters on `key`/`value` (PEFT's LoRA) take part."""
        return torch.stack([self.key(states), self.value(states)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_key_value: torch.Tensor | None = None,
        past_key_value: torch.Tensor | None = None,
        output_rows: int | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Returns the block output, this pass's (key, value) (a cache keeps them for later tokens) and, with
        `output_attentions`, the attention weights (batch, heads, rows, keys).

        encoder_key_value: (2, batch, image_length, hidden_size) from `project_key_value`, for cross-attention.
        past_key_value: (2, batch, heads, past_length, head_dim) cached keys and values, stacked.
        output_rows: only the first rows attend and are returned; every row still serves as a key.
        """
        if encoder_key_value is None:
            key, value = self.key(hidden_states), self.value(hidden_states)
        else:
            key, value = encoder_key_value.unbind(0)
        if output_rows is not None:
            hidden_states = hidden_states[:, :output_rows]
            if attention_mask is not None and attention_mask.shape[2] > 1:
                attention_mask = attention_mask[:, :, :output_rows]
        query = self._split_heads(self.query(hidden_states))
        key, value = self._split_heads(key), self._split_heads(value)
        new_key_value = (key, value)
        if past_key_value is not None:
            past_key, past_value = past_key_value.unbind(0)
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)

        # Fused kernels (SDPA) do not return the weights: a call that asks for them takes the eager path.
        attention_interface: Callable = eager_attention_forward
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1)
        output = self.LayerNorm(self.dropout(self.dense(attn_output)) + hidden_states)
        return output, new_key_value, attn_weights if output_attentions else None


class Blip2BridgeQFormerFeedForward(nn.Module):
    """BERT's intermediate + output blocks; queries and text each have their own copy."""

    def __init__(self, config: Blip2BridgeQFormerConfig):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """token_index: flat indices of the (batch * length) positions worth computing; the others (padding, which
        no later position attends to and no loss reads) are left at zero."""
        if token_index is None:
            return self._block(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        computed = self._block(flat.index_select(0, token_index))
        return flat.new_zeros(flat.shape).index_copy(0, token_index, computed).view_as(hidden_states)

    def _block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.output(self.activation(self.intermediate(hidden_states)))
        return self.LayerNorm(self.dropout(output) + hidden_states)


class Blip2BridgeQFormerLayer(GradientCheckpointingLayer):
    def __init__(self, config: Blip2BridgeQFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2BridgeQFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2BridgeQFormerAttention(config, is_cross_attention=True)
        self.query_feed_forward = Blip2BridgeQFormerFeedForward(config)
        if config.use_text_input:
            self.text_feed_forward = Blip2BridgeQFormerFeedForward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_key_value: torch.Tensor | None = None,
        past_key_value: torch.Tensor | None = None,
        query_length: int = 0,
        plan: LayerPlan = EVERY_ROW,
        output_attentions: bool = False,
        project_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Self-attention over every position, cross-attention for the queries, a feed-forward for each side.

        Returns (output, this pass's self-attention keys, values, self-attention weights, cross-attention weights); the
        weights only with `output_attentions`. Tensors that need gradients come and go as flat positional tensors:
        reentrant gradient checkpointing tracks no tensor nested in a tuple. The layer only reads the cache, so a
        recomputation in backward cannot write it twice.

        project_image: `hidden_states` are image features; returns this layer's cross-attention keys and values of them
        (`Blip2BridgeQFormerAttention.project_key_value`), for a layer an FSDP unit wraps (`layer_image_key_value`).
        """
        if project_image:
            return self.crossattention.project_key_value(hidden_states)
        attention_output, new_key_value, self_attention_weights = self.attention(
            hidden_states,
            plan.attention_mask,
            past_key_value=past_key_value,
            output_rows=plan.output_rows,
            output_attentions=output_attentions,
        )
        query_states = attention_output[:, :query_length]
        text_output = None
        if attention_output.shape[1] > query_length:
            text_output = self.text_feed_forward(attention_output[:, query_length:], plan.text_token_index)
        if plan.input_index is not None:
            query_states, *new_key_value = gather_rows((query_states, *new_key_value), plan.input_index)
            text_output = None if text_output is None else text_output.index_select(0, plan.input_index)
        cross_attention_weights = None
        if query_length > 0 and self.has_cross_attention:
            if image_key_value is None:
                raise ValueError("image_embeds must be given when queries pass through a cross-attention layer")
            query_states, _, cross_attention_weights = self.crossattention(
                query_states,
                encoder_key_value=(
                    image_key_value if plan.image_index is None else image_key_value.index_select(1, plan.image_index)
                ),
                output_attentions=output_attentions,
            )
        outputs = [self.query_feed_forward(query_states)] if query_length > 0 else []
        if text_output is not None:
            outputs.append(text_output)
        layer_output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return layer_output, *new_key_value, self_attention_weights, cross_attention_weights


def layer_image_key_value(layer: nn.Module, image_embeds: torch.Tensor) -> torch.Tensor:
    """`layer`'s cross-attention keys and values of `image_embeds`.

    A layer wrapped by a sharder (an FSDP unit: FSDP's wrapper module, or the subclass FSDP2 makes of it) gathers its
    weights only in its own call, so it projects through that call (`project_image=True`). Any other layer projects
    directly, outside activation checkpointing: reentrant checkpointing would give the projection weights no gradient
    where the features need none (image_embeds given as input). A wrapped layer that checkpoints gets features that
    require a gradient for the same reason."""
    if type(layer) is Blip2BridgeQFormerLayer:
        return layer.crossattention.project_key_value(image_embeds)
    checkpoints = layer.gradient_checkpointing and layer.training  # read through the wrapper
    if checkpoints and torch.is_grad_enabled() and not image_embeds.requires_grad:
        image_embeds = image_embeds.detach().requires_grad_()
    return layer(image_embeds, project_image=True)


@dataclass
class Blip2BridgeQFormerOutput(ModelOutput):
    """
    last_hidden_state: (batch, query_length + text_length, hidden_size) outputs, queries first.
    cache: self-attention keys/values of every position seen so far, when `use_cache`.
    hidden_states: with `output_hidden_states`, the embeddings' output and each layer's, (batch, positions, hidden_size).
    attentions: with `output_attentions`, each layer's self-attention weights (batch, heads, positions, keys).
    cross_attentions: with `output_attentions`, the weights (batch, heads, query_length, image_length) of each layer
        with cross-attention, when queries and images are given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class Blip2BridgePreTrainedModel(Blip2BridgeHubMixin, PreTrainedModel):
    config: Blip2BridgeConfig
    base_model_prefix = "blip2_bridge"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_flash_attn = False  # masks are 4-D additive tensors, which flash-attention kernels do not take
    _no_split_modules = ["Blip2BridgeQFormerLayer"]
    _skip_keys_device_placement = ["cache"]

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialised as transformers' own models are: `_init_weights` writes through `transformers.initialization`,
        which leaves loaded tensors alone. transformers therefore need not treat the model as custom code, which would
        skip every nested module without parameters of its own, e.g. a T5 LLM's attention blocks, whose weights T5
        initialises at the block (`from_pretrained` with the LLM's weights missing would give them plain normal(1))."""
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # BERT's scheme: normal(initializer_range) weights, zero biases, unit norms
        std = self.config.initializer_range
        if hasattr(module, "query_tokens"):
            init.normal_(module.query_tokens, mean=0.0, std=std)
        if hasattr(module, "temp"):
            init.constant_(module.temp, self.config.initial_temperature)


class Blip2BridgeQFormerModel(Blip2BridgePreTrainedModel):
    """BERT with learned-query support. Positions: text starts at 0 whatever precedes it; queries get none."""

    config: Blip2BridgeQFormerConfig
    main_input_name = "input_ids"

    def __init__(self, config: Blip2BridgeQFormerConfig):
        super().__init__(config)
        if config.use_text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer = nn.ModuleList(
            [Blip2BridgeQFormerLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.post_init()

    def project_image(self, image_embeds: torch.Tensor) -> list[torch.Tensor | None]:
        """Each cross-attention layer's keys/values of the images (None for layers without cross-attention).

        Computed once per image, they serve every pass that reads the same images (ITC's query pass and ITM).
        """
        image_embeds = image_embeds.to(self.layernorm.weight.dtype)  # from a tower that may compute in half precision
        return [
            layer_image_key_value(layer, image_embeds) if layer.has_cross_attention else None for layer in self.layer
        ]

    def get_input_embeddings(self):
        return getattr(self, "word_embeddings", None)

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def embed(
        self,
        inputs_embeds: torch.Tensor | None,
        query_embeds: torch.Tensor | None,
        position_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """[queries; word + position embeddings of the text], then the embedding LayerNorm over both."""
        parts = [] if query_embeds is None else [query_embeds]
        if inputs_embeds is not None:
            if query_embeds is not None and query_embeds.shape[0] == 1:
                parts = [query_embeds.expand(inputs_embeds.shape[0], -1, -1)]  # one set of queries serves every text
            text_length = inputs_embeds.shape[1]
            if position_ids is None:
                if text_length > self.config.max_position_embeddings:
                    raise ValueError(
                        f"text of {text_length} tokens is longer than the Q-Former's position table "
                        f"(max_position_embeddings={self.config.max_position_embeddings}); truncate it"
                    )
                position_ids = torch.arange(text_length, device=inputs_embeds.device)[None]
            elif not is_traced() and position_ids.numel() and int(position_ids.max()) >= self.config.max_position_embeddings:
                # Caption generation passes positions step by step; past the table, the lookup would be an IndexError.
                raise ValueError(
                    f"text position {int(position_ids.max())} is past the Q-Former's position table "
                    f"(max_position_embeddings={self.config.max_position_embeddings}); generate at most "
                    f"{self.config.max_position_embeddings} tokens (max_length or max_new_tokens)"
                )
            parts.append(inputs_embeds + self.position_embeddings(position_ids))
        return self.dropout(self.layernorm(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        is_causal: bool = False,
        cache: Cache | None = None,
        use_cache: bool = False,
        image_key_values: list | None = None,
        rows: QFormerRows | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool | list[int] = False,
        return_dict: bool = True,
    ) -> Blip2BridgeQFormerOutput | tuple:
        r"""
        input_ids: (batch, text_length) BERT token ids, or
        inputs_embeds: (batch, text_length, hidden_size) their word embeddings (positions are added here).
        attention_mask: (batch, text_length) 1 for text tokens to attend to, covering every text token so far
            (cached and current); query positions are always visible.
        query_embeds: (batch, num_query_tokens, hidden_size) learned queries, placed before the text; a batch of 1
            serves every row (every image's query pass starts from the same queries, computed once until they meet
            the images).
        image_embeds: (num_images, image_length, encoder_hidden_size) features the queries cross-attend to, or
        image_key_values: `project_image(image_embeds)`, when the caller already has it.
        is_causal: the multimodal-causal mode of ITG: text is causal and queries never see it.
        cache: keys/values of earlier positions (e.g. the queries' from an earlier pass); read, and
            extended only when `use_cache`.
        rows: which input and which image each output row reads, and which positions the caller keeps (`QFormerRows`).
        output_attentions, output_hidden_states: also return every layer's attention weights / outputs. The speed
            tricks are then off (every row and position computed from its own copy of its input), and attention runs
            eagerly. output_hidden_states may also list the indices to keep (the others are None).
        return_dict: False returns a tuple of the output's fields that are set.
        """
        if input_ids is not None:
            if not self.config.use_text_input:
                raise ValueError("this Q-Former was built with use_text_input=False and cannot read input_ids")
            inputs_embeds = self.word_embeddings(input_ids)
        if inputs_embeds is None and query_embeds is None:
            raise ValueError("the Q-Former needs input_ids (or inputs_embeds), query_embeds or both")
        rows = QFormerRows() if rows is None else rows
        # The Q-Former may compute in another precision than the tower feeding it (kept in float32 by
        # `_keep_in_fp32_modules` when the model loads in half precision).
        dtype = self.layernorm.weight.dtype
        query_embeds, inputs_embeds, image_embeds = (
            None if tensor is None else tensor.to(dtype) for tensor in (query_embeds, inputs_embeds, image_embeds)
        )
        past_length = 0 if cache is None else cache.get_seq_length()
        if image_key_values is None and image_embeds is not None and query_embeds is not None:
            image_key_values = self.project_image(image_embeds)
        num_images = None if image_key_values is None else image_key_values[0].shape[1]  # layer 0 cross-attends
        input_index = self._input_index(rows, query_embeds, inputs_embeds, num_images, past_length)
        every_position = bool(output_attentions or output_hidden_states)
        if input_index is not None and (self._dropout_active() or every_position):
            # Dropout draws its masks per row, as the original does: rows share the first layer only where it is
            # deterministic, so here every row gets its own copy of its input from the start. So do rows whose
            # hidden states and attention weights are asked for: each is then an input of the rows' own graph.
            if query_embeds.shape[0] == 1:
                query_embeds = query_embeds.expand(len(input_index), -1, -1)
            else:
                query_embeds = query_embeds.index_select(0, input_index)
            inputs_embeds, attention_mask, position_ids = (
                None if tensor is None else tensor.index_select(0, input_index)
                for tensor in (inputs_embeds, attention_mask, position_ids)
            )
            input_index = None

        hidden_states = self.embed(inputs_embeds, query_embeds, position_ids)
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        text_length = 0 if inputs_embeds is None else inputs_embeds.shape[1]
        plans = self.plan_layers(
            attention_mask,
            num_keys=past_length + hidden_states.shape[1],
            query_length=query_length,
            text_length=text_length,
            is_causal=is_causal,
            dtype=hidden_states.dtype,
            input_index=input_index,
            image_index=rows.image_index,
            output_rows=None if every_position else rows.output_rows,
            skip_padding=not every_position,
        )

        if cache is None and use_cache:
            cache = DynamicCache()
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and query_length > 0 and image_key_values is not None else None
        for layer_idx, (layer, plan) in enumerate(zip(self.layer, plans)):
            past_key_value = None
            if past_length > 0:
                past_key_value = torch.stack([cache.layers[layer_idx].keys, cache.layers[layer_idx].values])
            hidden_states, new_keys, new_values, attention_weights, cross_attention_weights = layer(
                hidden_states,
                None if image_key_values is None else image_key_values[layer_idx],
                past_key_value,
                query_length=query_length,
                plan=plan,
                output_attentions=output_attentions,
            )
            if use_cache:
                cache.update(new_keys, new_values, layer_idx)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attention_weights,)
                if all_cross_attentions is not None and cross_attention_weights is not None:
                    all_cross_attentions += (cross_attention_weights,)

        output = Blip2BridgeQFormerOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=select_hidden_states(all_hidden_states, output_hidden_states),
            attentions=all_attentions,
            cross_attentions=all_cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _dropout_active(self) -> bool:
        return self.training and (self.config.hidden_dropout_prob > 0 or self.config.attention_probs_dropout_prob > 0)

    @staticmethod
    def _input_index(rows: QFormerRows, query_embeds, inputs_embeds, num_images: int | None, past_length: int):
        """Which distinct input each output row continues, or None when every row is its own input."""
        input_index = rows.input_index
        if input_index is None and query_embeds is not None and query_embeds.shape[0] == 1 and inputs_embeds is None:
            # One set of learned queries for every image: the rows fan out to the images.
            num_rows = len(rows.image_index) if rows.image_index is not None else num_images
            if num_rows is not None and num_rows > 1:
                input_index = torch.zeros(num_rows, dtype=torch.long, device=query_embeds.device)
        if input_index is not None and (query_embeds is None or past_length > 0):
            raise ValueError(
                "rows.input_index needs query_embeds and no cache: rows fan out at the first cross-attention, which "
                "only queries have"
            )
        return input_index

    def plan_layers(
        self,
        attention_mask: torch.Tensor | None,
        num_keys: int,
        query_length: int,
        text_length: int,
        is_causal: bool,
        dtype: torch.dtype,
        input_index: torch.LongTensor | None,
        image_index: torch.LongTensor | None,
        output_rows: int | None,
        skip_padding: bool = True,
    ) -> list[LayerPlan]:
        """One `LayerPlan` per layer: the one place that decides which rows and positions each layer computes.

        The first layer reads the distinct inputs and fans them out to `input_index` after its self-attention; every
        later layer reads one copy per output row, so its mask and text positions are the fanned-out ones.
        """
        first_mask = self._self_attention_mask(attention_mask, num_keys, query_length, text_length, is_causal, dtype)
        first_tokens = self._text_token_index(attention_mask, text_length) if skip_padding else None
        later_mask, later_tokens = first_mask, first_tokens
        if input_index is not None:
            later_mask = None if first_mask is None or first_mask.shape[0] == 1 else first_mask.index_select(0, input_index)
            if attention_mask is not None and skip_padding:
                later_tokens = self._text_token_index(attention_mask.index_select(0, input_index), text_length)
        plans = [
            LayerPlan(attention_mask=later_mask, text_token_index=later_tokens, image_index=image_index)
            for _ in self.layer
        ]
        plans[0] = replace(plans[0], attention_mask=first_mask, text_token_index=first_tokens, input_index=input_index)
        if output_rows is not None:
            # The last layer's few kept rows are all computed (the token index would cover every row).
            plans[-1] = replace(plans[-1], output_rows=output_rows, text_token_index=None)
        return plans

    def _self_attention_mask(self, attention_mask, num_keys: int, query_length: int, text_length: int, is_causal: bool, dtype):
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape[1] > num_keys:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} text tokens but only {num_keys} positions exist"
                )
            key_padding_mask = torch.cat(
                [attention_mask.new_ones(attention_mask.shape[0], num_keys - attention_mask.shape[1]), attention_mask],
                dim=1,
            )
        num_rows = query_length + text_length
        return qformer_attention_mask(key_padding_mask, num_rows, num_keys, query_length, is_causal, dtype)

    @staticmethod
    def _text_token_index(attention_mask, text_length: int) -> torch.Tensor | None:
        """Flat indices of the real text tokens, which the feed-forward blocks compute; None: all of them.

        Skipping padding there saves the bulk of a padded caption batch's compute."""
        if attention_mask is None or text_length == 0 or is_traced():
            return None
        text_token_index = attention_mask[:, -text_length:].reshape(-1).nonzero().squeeze(1)
        if text_token_index.numel() == attention_mask.shape[0] * text_length:
            return None  # no padding: gathering would only cost
        return text_token_index
