"""The LAVIS re-statement (tests/lavis_reference.py) and our stage-1 model holding the same random weights, with
batches for both and the re-statement's ITM: the oracle side of the modeling, retrieval and LAVIS-reference tests."""

from __future__ import annotations

import torch

from modeling_blip2 import Blip2BridgeModel
from modeling_blip2.convert_lavis import convert_lavis_state_dict, lavis_config_from_state_dict
from tests.lavis_checkpoints import EVA_CONFIG, LAVIS_QFORMER, QFORMER_CONFIG, eva_tower
from tests.lavis_reference import LavisBlip2Qformer, lavis_state_dict_random


PRODUCT_DEC, PRODUCT_CLS, PRODUCT_SEP, PRODUCT_PAD = LAVIS_QFORMER["vocab_size"] - 1, 2, 3, 0


def oracle_and_product(seed: int = 0, weight_scale: float = 10.0, dtype=torch.float32):
    """The LAVIS re-statement and our `Blip2BridgeModel` holding the same random LAVIS weights (both in eval mode).

    The re-statement's N(0, 0.02) weights are scaled by `weight_scale` (N(0, 0.2), as tests/tiny_models.py), so that
    a query seeing one more text token, or one query read instead of the mean, moves the outputs far beyond the
    tolerances. LayerNorm weights and `temp` stay as they are. Our model's tensors come through the converter,
    whose tables test_convert.py checks against an independent statement of where each LAVIS tensor lands.
    """
    state_dict = lavis_state_dict_random(LAVIS_QFORMER, seed)
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and "LayerNorm" not in name and not name.startswith("ln_vision") and name != "temp":
            state_dict[name] = tensor * weight_scale
    state_dict.update({f"visual_encoder.{name}": weight for name, weight in eva_tower().items()})
    config = lavis_config_from_state_dict(state_dict, vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG)
    config._attn_implementation = "eager"
    product = Blip2BridgeModel(config)
    product.load_state_dict(convert_lavis_state_dict(state_dict, config))
    oracle = LavisBlip2Qformer(LAVIS_QFORMER, state_dict)
    return oracle.to(dtype).eval(), product.to(dtype).eval()


def product_batch(batch_size=4, text_length=7, seed=0, lengths=None, dtype=torch.float32):
    """Image features (after ln_vision: what both models cross-attend to) and [CLS] ... [SEP] captions, padded."""
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(batch_size, 5, LAVIS_QFORMER["vision_width"], generator=generator, dtype=dtype)
    input_ids = torch.randint(5, PRODUCT_DEC, (batch_size, text_length), generator=generator)
    input_ids[:, 0] = PRODUCT_CLS
    lengths = lengths or [text_length - (b % 3) for b in range(batch_size)]
    attention_mask = torch.zeros(batch_size, text_length, dtype=torch.long)
    for b, length in enumerate(lengths):
        input_ids[b, length - 1] = PRODUCT_SEP
        input_ids[b, length:] = PRODUCT_PAD
        attention_mask[b, :length] = 1
    return image_embeds, input_ids, attention_mask


@torch.no_grad()
def oracle_itm_logits(oracle, input_ids, attention_mask, image_embeds):
    """The original's ITM: one bidirectional pass over [queries; text] per pair, the 2-way head averaged over the
    query positions (tests/lavis_reference.py)."""
    num_pairs = input_ids.shape[0]
    queries = oracle.query_tokens.expand(num_pairs, -1, -1)
    full_mask = torch.cat([torch.ones(num_pairs, queries.shape[1], dtype=torch.long), attention_mask], 1)
    hidden, _ = oracle.Qformer.bert(input_ids, query_embeds=queries, attention_mask=full_mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
    return oracle.itm_head(hidden[:, : queries.shape[1]]).mean(dim=1)
