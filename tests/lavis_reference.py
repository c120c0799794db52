"""Independent re-statement of the ORIGINAL salesforce/LAVIS stage-1 BLIP-2 numerics, in plain PyTorch.

This file is the numerics oracle (and the "original implementation" speed baseline) that our own
model is checked against. It re-states, structure for structure and operation for operation:

* ``lavis/models/blip2_models/Qformer.py``: BertEmbeddings, BertSelfAttention, BertSelfOutput,
  BertAttention, BertIntermediate, BertOutput, BertLayer, BertEncoder, BertModel (incl.
  ``get_extended_attention_mask`` with the UniLM-style query prefix) and BertLMHeadModel;
* ``lavis/models/blip2_models/blip2_qformer.py``: ``Blip2Qformer.forward`` (ITC, ITM, ITG/"lm");
* ``lavis/models/base_model.py``: ``concat_all_gather`` (no grad) / ``all_gather_with_grad`` (grad),
  for one process (rank 0, world size 1);
* ``lavis/models/blip2_models/blip2.py``: ``ln_vision`` (LayerNorm computed in fp32), Q-Former config
  (``encoder_width = vision_width``, ``cross_attention_freq``, ``query_length = num_query_token``).

Deliberately NOT optimised: separate passes exactly as LAVIS runs them, eager attention with additive
-10000 masks, the per-row ``torch.multinomial(...).item()`` loops for the ITM hard negatives.
All math is fp32. Dropout is 0 everywhere (hidden_dropout_prob / attention_probs_dropout_prob are
0.1 in bert-base; places where LAVIS applies dropout are marked ``# [dropout]``).
The vision encoder itself is not part of this file: ``image_embeds_raw`` is its output.

Dependencies: torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "lavis_state_dict_random",
    "LavisBlip2Qformer",
    "concat_all_gather",
    "all_gather_with_grad",
    "lavis_state_dict_keys",
]


# ----------------------------------------------------------------------------------------------
# config / state dict
# ----------------------------------------------------------------------------------------------
_DEFAULTS = {"layer_norm_eps": 1e-12, "ln_vision_eps": 1e-5, "pad_token_id": 0}


def _cfg(config: dict) -> dict:
    c = dict(_DEFAULTS)
    c.update(config)
    return c


def _has_cross(c: dict, i: int) -> bool:
    # BertLayer: `if config.add_cross_attention and layer_num % config.cross_attention_freq == 0`
    return i % c["cross_attention_frequency"] == 0


def _shapes(config: dict) -> dict[str, tuple]:
    """LAVIS stage-1 parameter/buffer names (without visual_encoder.*) and their shapes."""
    c = _cfg(config)
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    W, Q, E, P = c["vision_width"], c["num_query_tokens"], c["embed_dim"], c["max_position_embeddings"]
    s: dict[str, tuple] = {"query_tokens": (1, Q, H), "ln_vision.weight": (W,), "ln_vision.bias": (W,)}
    b = "Qformer.bert."
    s[b + "embeddings.position_ids"] = (1, P)
    s[b + "embeddings.word_embeddings.weight"] = (V, H)
    s[b + "embeddings.position_embeddings.weight"] = (P, H)
    s[b + "embeddings.LayerNorm.weight"] = (H,)
    s[b + "embeddings.LayerNorm.bias"] = (H,)

    def lin(name, out_f, in_f):
        s[name + ".weight"] = (out_f, in_f)
        s[name + ".bias"] = (out_f,)

    def ln(name):
        s[name + ".weight"] = (H,)
        s[name + ".bias"] = (H,)

    for i in range(c["num_hidden_layers"]):
        L = f"{b}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            lin(L + "attention.self." + n, H, H)
        lin(L + "attention.output.dense", H, H)
        ln(L + "attention.output.LayerNorm")
        if _has_cross(c, i):
            lin(L + "crossattention.self.query", H, H)
            lin(L + "crossattention.self.key", H, W)  # key/value read encoder_width = vision width
            lin(L + "crossattention.self.value", H, W)
            lin(L + "crossattention.output.dense", H, H)
            ln(L + "crossattention.output.LayerNorm")
        lin(L + "intermediate.dense", I, H)
        lin(L + "output.dense", H, I)
        ln(L + "output.LayerNorm")
        lin(L + "intermediate_query.dense", I, H)
        lin(L + "output_query.dense", H, I)
        ln(L + "output_query.LayerNorm")
    p = "Qformer.cls.predictions."
    s[p + "bias"] = (V,)
    lin(p + "transform.dense", H, H)
    ln(p + "transform.LayerNorm")
    s[p + "decoder.weight"] = (V, H)  # tied to word_embeddings
    s[p + "decoder.bias"] = (V,)  # the same Parameter as predictions.bias
    lin("vision_proj", E, H)
    lin("text_proj", E, H)
    lin("itm_head", 2, H)
    s["temp"] = ()
    return s


def lavis_state_dict_keys(config: dict) -> list[str]:
    return list(_shapes(config))


def lavis_state_dict_random(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LAVIS-format stage-1 state dict (no visual_encoder.*), every entry non-trivial.

    Weights ~ N(0, 0.02); LayerNorm weights 1 + 0.1 N(0,1); biases (and LayerNorm biases) 0.02 N(0,1);
    temp = 0.07. ``cls.predictions.decoder.weight`` has the values of the word embeddings and
    ``cls.predictions.decoder.bias`` those of ``cls.predictions.bias`` (tied in LAVIS).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in _shapes(config).items():
        if name.endswith("position_ids"):
            t = torch.arange(shape[1], dtype=torch.long).expand((1, -1)).clone()
        elif name == "temp":
            t = torch.tensor(0.07)
        elif name.endswith("decoder.weight"):
            t = out["Qformer.bert.embeddings.word_embeddings.weight"].clone()
        elif name.endswith("decoder.bias"):
            t = out["Qformer.cls.predictions.bias"].clone()
        elif "LayerNorm.weight" in name or name == "ln_vision.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:  # Linear / Embedding weights, query_tokens
            t = 0.02 * torch.randn(shape, generator=g)
        out[name] = t.to(torch.float32) if t.is_floating_point() else t
    return out


# ----------------------------------------------------------------------------------------------
# lavis/models/base_model.py, one process
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """LAVIS: all_gather into ``ones_like`` buffers under no_grad -> the result carries NO gradient,
    even with world size 1 (LAVIS always runs torch.distributed; ``dist.get_rank()`` is called in forward)."""
    world_size = 1
    tensors_gather = [torch.ones_like(tensor) for _ in range(world_size)]
    tensors_gather[0].copy_(tensor)  # torch.distributed.all_gather(tensors_gather, tensor)
    return torch.cat(tensors_gather, dim=0)


def all_gather_with_grad(tensors: torch.Tensor) -> torch.Tensor:
    """LAVIS: ``if world_size == 1: return tensors`` (graph stays connected)."""
    return tensors


# ----------------------------------------------------------------------------------------------
# lavis/models/blip2_models/Qformer.py (eval-equivalent: dropout p = 0)
# ----------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        # nn.Embedding(vocab, H, padding_idx=config.pad_token_id): the pad row receives no gradient
        # from the lookup (it still receives gradient through the tied LM decoder).
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"], padding_idx=c["pad_token_id"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.register_buffer("position_ids", torch.arange(c["max_position_embeddings"]).expand((1, -1)).clone())
        # NB: no token_type_embeddings in LAVIS's Q-Former.

    def forward(self, input_ids=None, query_embeds=None, past_key_values_length=0):
        seq_length = input_ids.size()[1] if input_ids is not None else 0
        # text positions start at past_key_values_length, which is 0 in every stage-1 pass
        position_ids = self.position_ids[:, past_key_values_length : seq_length + past_key_values_length].clone()
        if input_ids is not None:
            embeddings = self.word_embeddings(input_ids)
            embeddings = embeddings + self.position_embeddings(position_ids)  # absolute positions
            if query_embeds is not None:
                embeddings = torch.cat((query_embeds, embeddings), dim=1)  # queries: no position embedding
        else:
            embeddings = query_embeds
        embeddings = self.LayerNorm(embeddings)  # queries DO get the embedding LayerNorm
        # [dropout] hidden_dropout_prob
        return embeddings


class BertSelfAttention(nn.Module):
    def __init__(self, c: dict, is_cross_attention: bool):
        super().__init__()
        H = c["hidden_size"]
        self.num_attention_heads = c["num_attention_heads"]
        self.attention_head_size = H // self.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        kv_in = c["vision_width"] if is_cross_attention else H  # config.encoder_width = vision width
        self.query = nn.Linear(H, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    def transpose_for_scores(self, x):
        x = x.view(*x.size()[:-1], self.num_attention_heads, self.attention_head_size)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_value=None):
        is_cross_attention = encoder_hidden_states is not None
        if is_cross_attention:
            key_layer = self.transpose_for_scores(self.key(encoder_hidden_states))
            value_layer = self.transpose_for_scores(self.value(encoder_hidden_states))
            attention_mask = encoder_attention_mask
        elif past_key_value is not None:
            key_layer = self.transpose_for_scores(self.key(hidden_states))
            value_layer = self.transpose_for_scores(self.value(hidden_states))
            key_layer = torch.cat([past_key_value[0], key_layer], dim=2)
            value_layer = torch.cat([past_key_value[1], value_layer], dim=2)
        else:
            key_layer = self.transpose_for_scores(self.key(hidden_states))
            value_layer = self.transpose_for_scores(self.value(hidden_states))
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        past_key_value = (key_layer, value_layer)

        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)  # scale after QK^T
        if attention_mask is not None:
            attention_scores = attention_scores + attention_mask  # additive (0 / -10000)
        attention_probs = torch.softmax(attention_scores, dim=-1)
        # [dropout] attention_probs_dropout_prob on attention_probs
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        context_layer = context_layer.view(*context_layer.size()[:-2], self.all_head_size)
        return context_layer, past_key_value


class BertSelfOutput(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        # [dropout] hidden_dropout_prob
        return self.LayerNorm(hidden_states + input_tensor)  # post-LN residual


class BertAttention(nn.Module):
    def __init__(self, c: dict, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(c, is_cross_attention)
        self.output = BertSelfOutput(c)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_value=None):
        context, present = self.self(hidden_states, attention_mask, encoder_hidden_states,
                                     encoder_attention_mask, past_key_value)
        return self.output(context, hidden_states), present


class BertIntermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))  # ACT2FN["gelu"]: exact (erf) GELU


class BertOutput(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["intermediate_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        # [dropout] hidden_dropout_prob
        return self.LayerNorm(hidden_states + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, c: dict, layer_num: int):
        super().__init__()
        self.attention = BertAttention(c)
        self.has_cross_attention = _has_cross(c, layer_num)
        if self.has_cross_attention:
            self.crossattention = BertAttention(c, is_cross_attention=True)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)
        self.intermediate_query = BertIntermediate(c)
        self.output_query = BertOutput(c)

    def feed_forward_chunk(self, attention_output):
        return self.output(self.intermediate(attention_output), attention_output)

    def feed_forward_chunk_query(self, attention_output):
        return self.output_query(self.intermediate_query(attention_output), attention_output)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_value=None, query_length=0):
        self_attn_past_key_value = past_key_value[:2] if past_key_value is not None else None
        attention_output, present_key_value = self.attention(
            hidden_states, attention_mask, past_key_value=self_attn_past_key_value)
        if query_length > 0:
            query_attention_output = attention_output[:, :query_length, :]
            if self.has_cross_attention:
                assert encoder_hidden_states is not None
                # cross-attention only for the query positions
                query_attention_output, _ = self.crossattention(
                    query_attention_output, attention_mask, encoder_hidden_states, encoder_attention_mask)
            layer_output = self.feed_forward_chunk_query(query_attention_output)  # query FFN
            if attention_output.shape[1] > query_length:
                layer_output_text = self.feed_forward_chunk(attention_output[:, query_length:, :])  # text FFN
                layer_output = torch.cat([layer_output, layer_output_text], dim=1)
        else:
            # text-only passes (incl. the ITG pass that reuses the query past_key_values): text FFN, no cross-attn
            layer_output = self.feed_forward_chunk(attention_output)
        return layer_output, present_key_value


class BertEncoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c, i) for i in range(c["num_hidden_layers"])])

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, query_length=0):
        next_decoder_cache = () if use_cache else None
        for i, layer_module in enumerate(self.layer):
            past_key_value = past_key_values[i] if past_key_values is not None else None
            hidden_states, present = layer_module(hidden_states, attention_mask, encoder_hidden_states,
                                                  encoder_attention_mask, past_key_value, query_length)
            if use_cache:
                next_decoder_cache += (present,)
        return hidden_states, next_decoder_cache


class BertModel(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.query_length = c["num_query_tokens"]  # encoder_config.query_length = num_query_token
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)  # add_pooling_layer=False: no pooler

    @staticmethod
    def get_extended_attention_mask(attention_mask, input_shape, device, is_decoder, has_query=False):
        dtype = torch.float32  # self.dtype
        if attention_mask.dim() == 3:
            extended_attention_mask = attention_mask[:, None, :, :]
        elif attention_mask.dim() == 2:
            if is_decoder:
                batch_size, seq_length = input_shape
                seq_ids = torch.arange(seq_length, device=device)
                causal_mask = seq_ids[None, None, :].repeat(batch_size, seq_length, 1) <= seq_ids[None, :, None]
                causal_mask = causal_mask.to(attention_mask.dtype)
                if causal_mask.shape[1] < attention_mask.shape[1]:
                    prefix_seq_len = attention_mask.shape[1] - causal_mask.shape[1]
                    if has_query:  # UniLM style: query rows see no text
                        causal_mask = torch.cat(
                            [torch.zeros((batch_size, prefix_seq_len, seq_length), device=device,
                                         dtype=causal_mask.dtype), causal_mask], dim=1)
                    # every row sees the whole prefix (the queries)
                    causal_mask = torch.cat(
                        [torch.ones((batch_size, causal_mask.shape[1], prefix_seq_len), device=device,
                                    dtype=causal_mask.dtype), causal_mask], dim=-1)
                extended_attention_mask = causal_mask[:, None, :, :] * attention_mask[:, None, None, :]
            else:
                extended_attention_mask = attention_mask[:, None, None, :]
        else:
            raise ValueError("attention_mask must be 2-D or 3-D")
        extended_attention_mask = extended_attention_mask.to(dtype=dtype)
        return (1.0 - extended_attention_mask) * -10000.0

    @staticmethod
    def invert_attention_mask(encoder_attention_mask):
        # transformers ModuleUtilsMixin.invert_attention_mask; the image masks are all ones -> adds 0.
        ext = encoder_attention_mask[:, None, None, :] if encoder_attention_mask.dim() == 2 \
            else encoder_attention_mask[:, None, :, :]
        ext = ext.to(dtype=torch.float32)
        return (1.0 - ext) * torch.finfo(torch.float32).min

    def forward(self, input_ids=None, attention_mask=None, query_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, is_decoder=False):
        if input_ids is None:
            assert query_embeds is not None
        # Q - query_length == 0 for the ITG pass: text positions restart at 0
        past_key_values_length = (past_key_values[0][0].shape[2] - self.query_length
                                  if past_key_values is not None else 0)
        query_length = query_embeds.shape[1] if query_embeds is not None else 0
        embedding_output = self.embeddings(input_ids=input_ids, query_embeds=query_embeds,
                                           past_key_values_length=past_key_values_length)
        batch_size, seq_length = embedding_output.size()[:-1]
        device = embedding_output.device
        if attention_mask is None:
            attention_mask = torch.ones((batch_size, seq_length + past_key_values_length), device=device)
        if is_decoder:
            extended_attention_mask = self.get_extended_attention_mask(
                attention_mask, input_ids.shape, device, is_decoder, has_query=(query_embeds is not None))
        else:
            extended_attention_mask = self.get_extended_attention_mask(
                attention_mask, (batch_size, seq_length), device, is_decoder)
        if encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.size()[:2], device=device)
            encoder_extended_attention_mask = self.invert_attention_mask(encoder_attention_mask)
        else:
            encoder_extended_attention_mask = None
        return self.encoder(embedding_output, attention_mask=extended_attention_mask,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_extended_attention_mask,
                            past_key_values=past_key_values, use_cache=use_cache, query_length=query_length)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, hidden_states):
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """decoder.weight is the word-embedding matrix (tied), decoder.bias is ``self.bias``: neither is a
    separate parameter here; the embedding weight is handed in at call time."""

    def __init__(self, c: dict):
        super().__init__()
        self.transform = BertPredictionHeadTransform(c)
        self.bias = nn.Parameter(torch.zeros(c["vocab_size"]))

    def forward(self, hidden_states, decoder_weight):
        return F.linear(self.transform(hidden_states), decoder_weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.predictions = BertLMPredictionHead(c)


class BertLMHeadModel(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.vocab_size = c["vocab_size"]
        self.bert = BertModel(c)
        self.cls = BertOnlyMLMHead(c)

    def forward(self, input_ids=None, attention_mask=None, query_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, past_key_values=None, use_cache=True,
                is_decoder=True, reduction="mean"):
        if labels is not None:
            use_cache = False
        if past_key_values is not None:
            query_embeds = None
        sequence_output, _ = self.bert(input_ids, attention_mask=attention_mask, query_embeds=query_embeds,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       is_decoder=is_decoder)
        if query_embeds is not None:
            sequence_output = sequence_output[:, query_embeds.shape[1]:, :]
        prediction_scores = self.cls.predictions(sequence_output, self.bert.embeddings.word_embeddings.weight)
        lm_loss = None
        if labels is not None:
            shifted_prediction_scores = prediction_scores[:, :-1, :].contiguous()
            labels = labels[:, 1:].contiguous()
            lm_loss = F.cross_entropy(shifted_prediction_scores.view(-1, self.vocab_size), labels.view(-1),
                                      reduction=reduction, label_smoothing=0.1)  # ignore_index=-100
            if reduction == "none":
                lm_loss = lm_loss.view(prediction_scores.size(0), -1).sum(1)
        return lm_loss, prediction_scores


# ----------------------------------------------------------------------------------------------
# lavis/models/blip2_models/blip2_qformer.py :: Blip2Qformer (stage 1), minus the vision encoder
# ----------------------------------------------------------------------------------------------
class LavisBlip2Qformer(nn.Module):
    """``named_parameters()`` uses the LAVIS names (tied decoder weight/bias appear once, under
    ``Qformer.bert.embeddings.word_embeddings.weight`` / ``Qformer.cls.predictions.bias``)."""

    def __init__(self, config: dict, state_dict: dict):
        super().__init__()
        c = _cfg(config)
        self.config = c
        self.ln_vision = nn.LayerNorm(c["vision_width"], eps=c["ln_vision_eps"])
        self.Qformer = BertLMHeadModel(c)
        self.query_tokens = nn.Parameter(torch.zeros(1, c["num_query_tokens"], c["hidden_size"]))
        self.vision_proj = nn.Linear(c["hidden_size"], c["embed_dim"])
        self.text_proj = nn.Linear(c["hidden_size"], c["embed_dim"])
        self.itm_head = nn.Linear(c["hidden_size"], 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        expected = set(_shapes(c))
        given = set(state_dict)
        missing = (expected - given) - {"Qformer.cls.predictions.decoder.weight",
                                        "Qformer.cls.predictions.decoder.bias",
                                        "Qformer.bert.embeddings.position_ids"}
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        unexpected = {k for k in given - expected if not k.startswith("visual_encoder.")}
        if unexpected:
            raise KeyError(f"unexpected keys {sorted(unexpected)}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(state_dict[name].to(torch.float32).reshape(p.shape))
            for name, tied in (("Qformer.cls.predictions.decoder.weight",
                                "Qformer.bert.embeddings.word_embeddings.weight"),
                               ("Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias")):
                if name in state_dict and not torch.equal(state_dict[name].float(), state_dict[tied].float()):
                    raise ValueError(f"{name} differs from {tied}; LAVIS ties them")

    def _ln_vision(self, x):
        # blip2.LayerNorm: computes in fp32 and casts back
        orig_type = x.dtype
        return self.ln_vision(x.type(torch.float32)).type(orig_type)

    def forward(self, image_embeds_raw=None, image_embeds=None, input_ids=None, attention_mask=None,
                bos_token_id=None, pad_token_id=0, image_ids=None) -> dict:
        if image_embeds is None:
            image_embeds = self._ln_vision(image_embeds_raw)  # ln_vision(visual_encoder(image))
        assert input_ids is not None and attention_mask is not None and bos_token_id is not None
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)

        # ---- query pass (queries only, cross-attend the image), use_cache -> past key/values
        query_last, query_past = self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                                   encoder_attention_mask=image_atts, use_cache=True)
        image_feats = F.normalize(self.vision_proj(query_last), dim=-1)

        # ---- unimodal text pass (bidirectional over text, padding mask)
        text_last, _ = self.Qformer.bert(input_ids, attention_mask=attention_mask)
        text_feat = F.normalize(self.text_proj(text_last[:, 0, :]), dim=-1)

        # ============== Image-text Contrastive ==============
        image_feats_all = concat_all_gather(image_feats)  # [B*world, Q, E], no grad
        text_feat_all = concat_all_gather(text_feat)  # [B*world, E], no grad
        # LAVIS uses a bare .squeeze(); squeeze(-1)/squeeze(-2) are identical for B > 1 and Q > 1
        # (LAVIS itself breaks for B == 1 or Q == 1).
        sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)  # [B, B*w, Q]
        sim_i2t, _ = sim_q2t.max(-1)  # max over queries
        sim_i2t = sim_i2t / self.temp  # never clamped in BLIP-2
        sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1),
                               image_feats_all.permute(0, 2, 1)).squeeze(-2)  # [B, B*w, Q]
        sim_t2i, _ = sim_t2q.max(-1)
        sim_t2i = sim_t2i / self.temp

        rank = 0
        bs = image_embeds.size(0)
        targets = torch.linspace(rank * bs, rank * bs + bs - 1, bs, dtype=int).to(device)

        if image_ids is not None:  # "image_id" in samples (COCO retrieval fine-tuning)
            image_ids = image_ids.view(-1, 1)
            image_ids_all = concat_all_gather(image_ids)
            pos_idx = torch.eq(image_ids, image_ids_all.t()).float()
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
            sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
            loss_itc = (loss_t2i + loss_i2t) / 2
        else:
            loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                        + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

        # the masking below is in place (LAVIS); keep the ITC similarities for the caller
        sim_i2t_out, sim_t2i_out = sim_i2t.clone(), sim_t2i.clone()

        # ============== Image-text Matching ==============
        text_input_ids_world = concat_all_gather(input_ids)
        text_attention_mask_world = concat_all_gather(attention_mask)
        image_embeds_world = all_gather_with_grad(image_embeds)
        with torch.no_grad():
            if image_ids is not None:
                mask = torch.eq(image_ids, image_ids_all.t())
                sim_t2i.masked_fill_(mask, -10000)
                sim_i2t.masked_fill_(mask, -10000)
            else:
                sim_t2i[:, rank * bs: rank * bs + bs].fill_diagonal_(-10000)
                sim_i2t[:, rank * bs: rank * bs + bs].fill_diagonal_(-10000)
            weights_t2i = F.softmax(sim_t2i, dim=1)
            weights_i2t = F.softmax(sim_i2t, dim=1)

        # select a negative image for each text (drawn FIRST)
        image_embeds_neg = []
        neg_image_idx = []
        for b in range(bs):
            neg_idx = torch.multinomial(weights_t2i[b], 1).item()
            neg_image_idx.append(neg_idx)
            image_embeds_neg.append(image_embeds_world[neg_idx])
        image_embeds_neg = torch.stack(image_embeds_neg, dim=0)

        # select a negative text for each image
        text_ids_neg = []
        text_atts_neg = []
        neg_text_idx = []
        for b in range(bs):
            neg_idx = torch.multinomial(weights_i2t[b], 1).item()
            neg_text_idx.append(neg_idx)
            text_ids_neg.append(text_input_ids_world[neg_idx])
            text_atts_neg.append(text_attention_mask_world[neg_idx])
        text_ids_neg = torch.stack(text_ids_neg, dim=0)
        text_atts_neg = torch.stack(text_atts_neg, dim=0)

        text_ids_all = torch.cat([input_ids, input_ids, text_ids_neg], dim=0)  # pos, pos, neg
        text_atts_all = torch.cat([attention_mask, attention_mask, text_atts_neg], dim=0)
        query_tokens_itm = self.query_tokens.expand(text_ids_all.shape[0], -1, -1)
        query_atts_itm = torch.ones(query_tokens_itm.size()[:-1], dtype=torch.long, device=device)
        attention_mask_all = torch.cat([query_atts_itm, text_atts_all], dim=1)
        image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds], dim=0)  # pos, neg, pos
        image_atts_all = torch.ones(image_embeds_all.size()[:-1], dtype=torch.long, device=device)

        # bidirectional pass over [queries; text], queries cross-attend
        itm_last, _ = self.Qformer.bert(text_ids_all, query_embeds=query_tokens_itm,
                                        attention_mask=attention_mask_all,
                                        encoder_hidden_states=image_embeds_all,
                                        encoder_attention_mask=image_atts_all)
        vl_embeddings = itm_last[:, : query_tokens_itm.size(1), :]
        vl_output = self.itm_head(vl_embeddings)
        logits = vl_output.mean(dim=1)  # average over query positions only
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)],
                               dim=0).to(device)
        loss_itm = F.cross_entropy(logits, itm_labels)  # no label smoothing

        # ============== Image-grounded text generation ("loss_lm") ==============
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = bos_token_id  # [DEC] replaces [CLS]
        labels = decoder_input_ids.masked_fill(decoder_input_ids == pad_token_id, -100)
        query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long, device=device)
        lm_attention_mask = torch.cat([query_atts, attention_mask], dim=1)
        # text-only decoder pass; each layer's self-attention prepends the query keys/values of the
        # query pass (with grad), causal over text, every text token sees all queries.
        loss_lm, lm_logits = self.Qformer(decoder_input_ids, attention_mask=lm_attention_mask,
                                          past_key_values=query_past, labels=labels)

        return {
            "loss": loss_itc + loss_itm + loss_lm,
            "loss_itc": loss_itc,
            "loss_itm": loss_itm,
            "loss_itg": loss_lm,
            "sim_i2t": sim_i2t_out,  # ITC similarities / temp, before the ITM positive masking
            "sim_t2i": sim_t2i_out,
            "itm_logits": logits,
            "image_feats": image_feats,
            "text_feat": text_feat,
            # extras for debugging / tests
            "query_output": query_last,
            "itg_logits": lm_logits,
            "itm_neg_image_idx": torch.tensor(neg_image_idx, dtype=torch.long),
            "itm_neg_text_idx": torch.tensor(neg_text_idx, dtype=torch.long),
        }
