"""Tiny random LAVIS checkpoints (EVA and CLIP towers, stage 1 and blip2_opt / blip2_t5 stage 2) and the LAVIS-side
re-statements the converter tests compare with; shared by the converter, reliability, LAVIS-reference and docs tests."""

import json
import re

import torch
import torch.nn.functional as F

from modeling_blip2.convert_lavis import lavis_config_from_state_dict
from tests.helpers import make_llm_tokenizer
from tests.lavis_reference import lavis_state_dict_random
from tests.lavis_vision_reference import clip_vit_forward, clip_vit_random, eva_vit_forward, eva_vit_random
from tests.tiny_models import tiny_llm


VISION_WIDTH, VISION_HEADS, VISION_DEPTH, PATCH, IMAGE = 24, 4, 2, 14, 28
# The Q-Former of the LAVIS reference's random state dicts, in its own keys (and BERT-style keys for the converter).
LAVIS_QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=50,
    max_position_embeddings=16,
    cross_attention_frequency=2,
    vision_width=VISION_WIDTH,
    num_query_tokens=4,
    embed_dim=16,
)
DEC_ID = LAVIS_QFORMER["vocab_size"] - 1
QFORMER_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    cross_attention_freq=2,  # LAVIS's name for it
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
# LAVIS's towers hold one block fewer than the released encoder files; the extra block must be ignored.
EVA_CONFIG = dict(
    model_type="blip_2_vision_model",
    hidden_size=VISION_WIDTH,
    intermediate_size=48,
    num_hidden_layers=VISION_DEPTH,
    num_attention_heads=VISION_HEADS,
    patch_size=PATCH,
    image_size=IMAGE,
    layer_norm_eps=1e-6,
    qkv_bias=True,
)
CLIP_CONFIG = dict(
    model_type="clip_vision_model",
    hidden_size=VISION_WIDTH,
    intermediate_size=4 * VISION_WIDTH,
    num_hidden_layers=VISION_DEPTH,
    num_attention_heads=VISION_HEADS,
    patch_size=PATCH,
    image_size=IMAGE,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)


def eva_tower():
    return eva_vit_random(VISION_WIDTH, VISION_DEPTH + 1, 48, PATCH, IMAGE, seed=1)


def clip_tower():
    return clip_vit_random(VISION_WIDTH, VISION_DEPTH + 1, PATCH, IMAGE, seed=2)


TOWERS = {
    "eva": (eva_tower, eva_vit_forward, EVA_CONFIG, 1e-6),
    "clip": (clip_tower, clip_vit_forward, CLIP_CONFIG, 1e-5),
}


def lavis_checkpoint(tower: str) -> dict[str, torch.Tensor]:
    state_dict = lavis_state_dict_random(LAVIS_QFORMER, seed=0)
    state_dict.update({f"visual_encoder.{name}": weight for name, weight in TOWERS[tower][0]().items()})
    return state_dict


def save_checkpoint(path, state_dict, wrap=True):
    torch.save({"model": state_dict} if wrap else state_dict, path)
    return path


def write_json(path, content):
    path.write_text(json.dumps(content))
    return str(path)


def tower_weights(state_dict) -> dict[str, torch.Tensor]:
    """The checkpoint's visual_encoder.* weights under the tower's own names."""
    prefix = "visual_encoder."
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def converted_config(state_dict, tower):
    return lavis_config_from_state_dict(state_dict, vision=TOWERS[tower][2], qformer_config=QFORMER_CONFIG)


def lavis_vision_features(tower, state_dict, pixel_values):
    """LAVIS's `ln_vision(visual_encoder(image))` on the checkpoint's weights, re-stated."""
    forward, eps = TOWERS[tower][1], TOWERS[tower][3]
    features = forward(tower_weights(state_dict), pixel_values, num_heads=VISION_HEADS, depth=VISION_DEPTH, eps=eps)
    return F.layer_norm(features, (VISION_WIDTH,), state_dict["ln_vision.weight"], state_dict["ln_vision.bias"], 1e-5)


# ---- stage 2: blip2_opt and blip2_t5 -------------------------------------------------------------------------------

# What LAVIS's Blip2OPT / Blip2T5 set to None, so that their checkpoints never hold it (stated independently of the
# converter's own pattern).
LAVIS_STAGE2_DROPS = re.compile(
    r"Qformer\.cls\.|Qformer\.bert\.embeddings\.(word|position)_embeddings\."
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|vision_proj\.|text_proj\.|itm_head\.|temp$"
)
LAVIS_PROJECTIONS = {"opt": "opt_proj", "t5": "t5_proj"}


def tiny_language_model_folder(tmp_path, name: str):
    """A tiny pretrained LLM saved with its tokenizer, as a hub checkpoint is."""
    folder = tmp_path / f"{name}-llm"
    tiny_llm(name).save_pretrained(folder)
    make_llm_tokenizer(name).save_pretrained(folder)
    return folder


def lavis_stage2_checkpoint(name: str, llm_width: int = 16) -> dict[str, torch.Tensor]:
    """A LAVIS blip2_opt / blip2_t5 state dict: the stage-1 dict without what LAVIS drops, plus the projection."""
    state_dict = {key: value for key, value in lavis_checkpoint("eva").items() if not LAVIS_STAGE2_DROPS.match(key)}
    generator = torch.Generator().manual_seed(11)
    projection = LAVIS_PROJECTIONS[name]
    state_dict[f"{projection}.weight"] = 0.2 * torch.randn(llm_width, LAVIS_QFORMER["hidden_size"], generator=generator)
    state_dict[f"{projection}.bias"] = 0.1 * torch.randn(llm_width, generator=generator)
    return state_dict
