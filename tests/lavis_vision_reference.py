"""Independent re-statement of LAVIS's two stage-1 vision towers, in plain PyTorch, on LAVIS-named weights.

- EVA ViT (`lavis/models/eva_vit.py`, `VisionTransformer.forward_features`): patch conv (with bias), [CLS] token,
  absolute positions, pre-norm blocks whose attention adds cat(q_bias, 0, v_bias) to a fused qkv projection, exact
  GELU MLP, LayerNorm eps 1e-6, no final norm.
- CLIP ViT (`lavis/models/clip_vit.py`, `VisionTransformer.forward`): patch conv (no bias), class embedding,
  positions, `ln_pre`, then residual blocks of `nn.MultiheadAttention` (sequence-first) and a QuickGELU MLP, LayerNorm
  eps 1e-5 computed in fp32, no `ln_post`.

`depth` is the number of blocks LAVIS builds; weights of further blocks are ignored, as LAVIS's non-strict loading
ignores them. Random weights come out under LAVIS's names, without the `visual_encoder.` prefix.
"""

import torch
import torch.nn.functional as F


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 0.05), biases ~ N(0, 0.05), LayerNorm weights ~ 1 + N(0, 0.1): every entry non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        is_norm_weight = name.endswith(".weight") and any(norm in name for norm in ("norm", "ln_"))
        weights[name] = 1.0 + 0.1 * noise if is_norm_weight else 0.05 * noise
    return weights


def eva_vit_shapes(width, num_blocks, mlp_width, patch_size, image_size) -> dict[str, tuple[int, ...]]:
    num_positions = (image_size // patch_size) ** 2 + 1
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, num_positions, width),
        "patch_embed.proj.weight": (width, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (width,),
    }
    for block in range(num_blocks):
        prefix = f"blocks.{block}."
        shapes |= {
            prefix + "norm1.weight": (width,),
            prefix + "norm1.bias": (width,),
            prefix + "attn.q_bias": (width,),
            prefix + "attn.v_bias": (width,),
            prefix + "attn.qkv.weight": (3 * width, width),
            prefix + "attn.proj.weight": (width, width),
            prefix + "attn.proj.bias": (width,),
            prefix + "norm2.weight": (width,),
            prefix + "norm2.bias": (width,),
            prefix + "mlp.fc1.weight": (mlp_width, width),
            prefix + "mlp.fc1.bias": (mlp_width,),
            prefix + "mlp.fc2.weight": (width, mlp_width),
            prefix + "mlp.fc2.bias": (width,),
        }
    return shapes


def eva_vit_random(width, num_blocks, mlp_width, patch_size, image_size, seed=0) -> dict[str, torch.Tensor]:
    return _random_weights(eva_vit_shapes(width, num_blocks, mlp_width, patch_size, image_size), seed)


def eva_vit_forward(weights, pixel_values, num_heads, depth, eps=1e-6) -> torch.Tensor:
    """(batch, 1 + patches, width) output of the last of `depth` blocks (LAVIS's `visual_encoder(image)`)."""
    patch_size = weights["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([weights["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + weights["pos_embed"]
    batch, length, width = x.shape
    for block in range(depth):
        w = {name[len(f"blocks.{block}.") :]: t for name, t in weights.items() if name.startswith(f"blocks.{block}.")}
        h = F.layer_norm(x, (width,), w["norm1.weight"], w["norm1.bias"], eps)
        qkv_bias = torch.cat([w["attn.q_bias"], torch.zeros_like(w["attn.v_bias"]), w["attn.v_bias"]])
        qkv = F.linear(h, w["attn.qkv.weight"], qkv_bias)
        qkv = qkv.reshape(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (width // num_heads) ** -0.5
        attention = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + F.linear(h, w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (width,), w["norm2.weight"], w["norm2.bias"], eps)
        h = F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"]))
        x = x + F.linear(h, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    return x


def clip_vit_shapes(width, num_blocks, patch_size, image_size) -> dict[str, tuple[int, ...]]:
    num_positions = (image_size // patch_size) ** 2 + 1
    shapes = {
        "conv1.weight": (width, 3, patch_size, patch_size),
        "class_embedding": (width,),
        "positional_embedding": (num_positions, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for block in range(num_blocks):
        prefix = f"transformer.resblocks.{block}."
        shapes |= {
            prefix + "attn.in_proj_weight": (3 * width, width),
            prefix + "attn.in_proj_bias": (3 * width,),
            prefix + "attn.out_proj.weight": (width, width),
            prefix + "attn.out_proj.bias": (width,),
            prefix + "ln_1.weight": (width,),
            prefix + "ln_1.bias": (width,),
            prefix + "mlp.c_fc.weight": (4 * width, width),
            prefix + "mlp.c_fc.bias": (4 * width,),
            prefix + "mlp.c_proj.weight": (width, 4 * width),
            prefix + "mlp.c_proj.bias": (width,),
            prefix + "ln_2.weight": (width,),
            prefix + "ln_2.bias": (width,),
        }
    return shapes


def clip_vit_random(width, num_blocks, patch_size, image_size, seed=0) -> dict[str, torch.Tensor]:
    return _random_weights(clip_vit_shapes(width, num_blocks, patch_size, image_size), seed)


def clip_vit_forward(weights, pixel_values, num_heads, depth, eps=1e-5) -> torch.Tensor:
    """(batch, 1 + patches, width) output of the last of `depth` residual blocks (LAVIS's `visual_encoder(image)`)."""
    patch_size = weights["conv1.weight"].shape[-1]
    x = F.conv2d(pixel_values, weights["conv1.weight"], stride=patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    width = x.shape[-1]
    class_embedding = weights["class_embedding"] + torch.zeros(x.shape[0], 1, width, dtype=x.dtype)
    x = torch.cat([class_embedding, x], dim=1) + weights["positional_embedding"]
    x = F.layer_norm(x.float(), (width,), weights["ln_pre.weight"], weights["ln_pre.bias"], eps)
    x = x.permute(1, 0, 2)  # NLD -> LND, as nn.MultiheadAttention (batch_first=False) expects
    for block in range(depth):
        prefix = f"transformer.resblocks.{block}."
        w = {name[len(prefix) :]: t for name, t in weights.items() if name.startswith(prefix)}
        h = F.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"], eps)
        h, _ = F.multi_head_attention_forward(
            h, h, h,
            embed_dim_to_check=width,
            num_heads=num_heads,
            in_proj_weight=w["attn.in_proj_weight"],
            in_proj_bias=w["attn.in_proj_bias"],
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=w["attn.out_proj.weight"],
            out_proj_bias=w["attn.out_proj.bias"],
            training=False,
            need_weights=False,
        )
        x = x + h
        h = F.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"], eps)
        h = F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
    return x.permute(1, 0, 2)
