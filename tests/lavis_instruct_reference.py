"""Independent re-statement of the ORIGINAL salesforce/LAVIS InstructBLIP forward, in plain PyTorch.

It re-states, step for step, the training forward of
* ``lavis/models/blip2_models/blip2_vicuna_instruct.py``: ``Blip2VicunaInstruct.forward`` and
  ``concat_text_input_output``;
* ``lavis/models/blip2_models/blip2_t5_instruct.py``: ``Blip2T5Instruct.forward`` (no few-shot examples);
both with ``qformer_text_input=True`` (LAVIS's default): the Q-Former reads [queries; instruction] in one bidirectional
pass (``Qformer.bert(text_Qformer.input_ids, attention_mask=[query ones; instruction mask], query_embeds=...,
encoder_hidden_states=image_embeds)``), the queries cross-attend to the image, the instruction tokens go through the
text feed-forward; the query outputs are projected (``llm_proj`` / ``t5_proj``) and prepended to the LLM's embeddings
of its own prompt.

The Q-Former is the stage-1 re-statement's ``BertModel`` (tests/lavis_reference.py), loaded from the checkpoint's
``Qformer.bert.*``. The LLM is a transformers model (LAVIS's modeling_llama / modeling_t5 are copies of
transformers' LlamaForCausalLM / T5ForConditionalGeneration). The vision encoder is not part of this file:
``image_embeds`` is ``ln_vision(visual_encoder(image))``. All math in fp32, dropout 0 (LAVIS runs the LLM in fp16 /
bf16 under autocast; the re-statement states the math, not the precision).

Tokenisation is the caller's, as LAVIS's tokenizers produce it (``text_input_tokens`` right-padded, starting with the
LLM tokenizer's bos; ``text_output_tokens`` of ``text + eos``, starting with the bos, which
``concat_text_input_output`` drops). ``lavis_llama_tokens`` states what LAVIS's LlamaTokenizer (``use_fast=False``,
bos "</s>", pad "[PAD]") makes of given word pieces.

Dependencies: torch (and the LLM passed in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.lavis_reference import BertModel, _cfg

__all__ = ["LavisInstructBlip", "lavis_llama_tokens", "concat_text_input_output"]

BERT_PREFIX = "Qformer.bert."


class Tokens:
    """What a LAVIS tokenizer call returns, as far as the forward reads it."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids, self.attention_mask = input_ids, attention_mask


def lavis_llama_tokens(pieces: list[list[int]], bos_token_id: int, pad_token_id: int, eos_token_id=None) -> Tokens:
    """LAVIS's ``llm_tokenizer(texts, padding="longest")`` for texts whose word pieces are ``pieces``.

    The slow LlamaTokenizer prepends its bos token (``add_bos_token=True``; LAVIS made it "</s>") and appends no eos;
    ``text + llm_tokenizer.eos_token`` (``text_output``) ends with the eos id (pass ``eos_token_id``). Padding is on the
    right (``padding_side = "right"`` in ``forward``) with "[PAD]".
    """
    rows = [[bos_token_id, *row, *([] if eos_token_id is None else [eos_token_id])] for row in pieces]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [pad_token_id] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return Tokens(input_ids, attention_mask)


def concat_text_input_output(input_ids, input_atts, output_ids, output_atts):
    """``Blip2VicunaInstruct.concat_text_input_output``: per row, [prompt tokens; answer tokens without their bos;
    the prompt's padding]; returns the tokens and each prompt's length."""
    input_part_targets_len = []
    llm_tokens = {"input_ids": [], "attention_mask": []}
    for i in range(input_ids.size(0)):
        this_input_ones = input_atts[i].sum()
        input_part_targets_len.append(this_input_ones)
        llm_tokens["input_ids"].append(
            torch.cat([input_ids[i][:this_input_ones], output_ids[i][1:], input_ids[i][this_input_ones:]])
        )
        llm_tokens["attention_mask"].append(
            torch.cat([input_atts[i][:this_input_ones], output_atts[i][1:], input_atts[i][this_input_ones:]])
        )
    llm_tokens["input_ids"] = torch.stack(llm_tokens["input_ids"])
    llm_tokens["attention_mask"] = torch.stack(llm_tokens["attention_mask"])
    return llm_tokens, input_part_targets_len


class LavisInstructBlip(nn.Module):
    """The Q-Former side of Blip2VicunaInstruct / Blip2T5Instruct (``Qformer.bert``, ``query_tokens``, the projection)
    loaded from a LAVIS state dict, around the LLM given.

    config: the stage-1 re-statement's Q-Former dict (hidden_size, num_hidden_layers, ..., vision_width,
        num_query_tokens); vocab_size and max_position_embeddings as the checkpoint's word/position embeddings.
    projection: "llm_proj" (blip2_vicuna_instruct) or "t5_proj" (blip2_t5_instruct).
    """

    def __init__(self, config: dict, state_dict: dict, projection: str, llm: nn.Module):
        super().__init__()
        c = _cfg(config)
        self.bert = BertModel(c)  # LAVIS's self.Qformer.bert, text side kept (qformer_text_input=True)
        bert_weights = {
            key[len(BERT_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(BERT_PREFIX)
        }
        self.bert.load_state_dict(bert_weights, strict=True)
        self.query_tokens = nn.Parameter(state_dict["query_tokens"].clone())
        weight = state_dict[f"{projection}.weight"]
        self.proj = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(state_dict[f"{projection}.bias"])
        self.llm = llm

    def query_inputs(self, image_embeds, text_Qformer) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs_llm`` / ``inputs_t5`` and their all-ones mask: the projected query outputs of the instruction-aware
        pass."""
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long).to(device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long).to(device)
        Qformer_atts = torch.cat([query_atts, text_Qformer.attention_mask], dim=1)
        last_hidden_state, _ = self.bert(
            text_Qformer.input_ids,
            attention_mask=Qformer_atts,
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        inputs_llm = self.proj(last_hidden_state[:, : query_tokens.size(1), :])
        atts_llm = torch.ones(inputs_llm.size()[:-1], dtype=torch.long).to(device)
        return inputs_llm, atts_llm

    def vicuna_forward(self, image_embeds, text_Qformer, text_input_tokens, text_output_tokens, pad_token_id) -> dict:
        """``Blip2VicunaInstruct.forward``; ``pad_token_id`` is the LLM tokenizer's ("[PAD]")."""
        inputs_llm, atts_llm = self.query_inputs(image_embeds, text_Qformer)
        llm_tokens, input_part_targets_len = concat_text_input_output(
            text_input_tokens.input_ids,
            text_input_tokens.attention_mask,
            text_output_tokens.input_ids,
            text_output_tokens.attention_mask,
        )
        # do not apply loss to the padding
        targets = llm_tokens["input_ids"].masked_fill(llm_tokens["input_ids"] == pad_token_id, -100)
        # do not apply loss to the text input (i.e., instruction)
        for i, length in enumerate(input_part_targets_len):
            targets[i][:length] = -100
        # do not apply loss to the query tokens
        empty_targets = torch.ones(atts_llm.size(), dtype=torch.long).to(image_embeds.device).fill_(-100)
        targets = torch.cat([empty_targets, targets], dim=1)

        inputs_embeds = self.llm.get_input_embeddings()(llm_tokens["input_ids"])
        inputs_embeds = torch.cat([inputs_llm, inputs_embeds], dim=1)
        attention_mask = torch.cat([atts_llm, llm_tokens["attention_mask"]], dim=1)
        outputs = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, labels=targets)
        return {
            "loss": outputs.loss,
            "logits": outputs.logits,
            "llm_tokens": llm_tokens,
            "targets": targets,
            "attention_mask": attention_mask,
            "inputs_llm": inputs_llm,
        }

    def t5_forward(self, image_embeds, text_Qformer, input_tokens, output_tokens, pad_token_id) -> dict:
        """``Blip2T5Instruct.forward`` without few-shot examples; ``pad_token_id`` is the T5 tokenizer's."""
        inputs_t5, atts_t5 = self.query_inputs(image_embeds, text_Qformer)
        encoder_atts = torch.cat([atts_t5, input_tokens.attention_mask], dim=1)
        targets = output_tokens.input_ids.masked_fill(output_tokens.input_ids == pad_token_id, -100)
        inputs_embeds = self.llm.encoder.embed_tokens(input_tokens.input_ids)
        inputs_embeds = torch.cat([inputs_t5, inputs_embeds], dim=1)
        outputs = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=encoder_atts,
            decoder_attention_mask=output_tokens.attention_mask,
            return_dict=True,
            labels=targets,
        )
        return {"loss": outputs.loss, "logits": outputs.logits, "targets": targets, "inputs_llm": inputs_t5}


def cross_entropy_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (token mean over targets != -100, logit t predicts label t + 1), for logits whose
    vocabulary the caller chose."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
