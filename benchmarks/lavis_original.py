"""The original BLIP-2 models (salesforce/LAVIS's stage-1 `Blip2Qformer` and stage-2 `Blip2OPT`), built from the
released package's own source with random weights, for benchmarks that time them beside ours on the same machine and
precision.

LAVIS itself does not install beside transformers 5 (it pins transformers 4.x, and importing `lavis` loads every model
and dataset it has), so only the modules these models run are imported from the package's files:
`lavis/models/blip2_models/{Qformer,blip2,blip2_qformer,blip2_opt,modeling_opt}.py`, `lavis/models/eva_vit.py` and
`lavis/models/base_model.py`. What they import only to download weights, register models or parse configs is
replaced by stand-ins; what transformers 5 dropped and the transformers-4 code calls is put back (three helpers of
`transformers.modeling_utils`, `invert_attention_mask`, `get_head_mask`, and transformers 4's weight initialisation
and tying). The model code that runs (the Q-Former, the EVA ViT-g tower, LAVIS's OPT, the losses, the negative
sampling, the all-gathers) is LAVIS's, unchanged.

    pip download --no-deps salesforce-lavis==1.0.2 -d /tmp/lavis   # the release BLIP-2 shipped in; not installed
    python benchmarks/train_throughput.py --stage --lavis /tmp/lavis/salesforce_lavis-1.0.2-py3-none-any.whl

Given to the original rather than built by it, all outside its GPU step: the tokenizers (a stand-in hands over the
same pre-tokenised batch ours receives from its collator; LAVIS tokenises inside `forward`, on the CPU) and the
weights (random, as ours: LAVIS downloads bert-base-uncased, the EVA weights and facebook/opt-*).
"""

import importlib.util
import sys
import tempfile
import types
import zipfile
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn

# What the original imports and never runs in a stage-1 training step.
_STAND_INS = {
    "lavis.common.registry": {"registry": types.SimpleNamespace(register_model=lambda name: (lambda cls: cls))},
    "lavis.common.dist_utils": {
        "download_cached_file": lambda *args, **kwargs: None,
        "is_dist_avail_and_initialized": (
            lambda: torch.distributed.is_available() and torch.distributed.is_initialized()
        ),
        "get_rank": lambda: torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "get_world_size": lambda: torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "is_main_process": lambda: True,
    },
    "lavis.common.utils": {"is_url": lambda text: False, "get_abs_path": lambda path: path},
    "lavis.common.logger": {"MetricLogger": object},
    "lavis.models.clip_vit": {"create_clip_vit_L": None},
    "omegaconf": {"OmegaConf": object},
}


def _timm_stand_in() -> dict:
    """The three helpers eva_vit.py takes from timm (timm needs torchvision, which does not install beside a CPU torch
    wheel); used only where timm is missing."""

    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    return {
        "timm.models.layers": {"drop_path": drop_path, "to_2tuple": lambda value: (value, value),
                               "trunc_normal_": nn.init.trunc_normal_},
        "timm.models.registry": {"register_model": lambda function: function},
    }


def _install_module(name: str, attributes: dict, package_path: Path | None = None):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    if package_path is not None:
        module.__path__ = [str(package_path)]
    sys.modules[name] = module
    return module


def _restore_transformers_4_helpers():
    """LAVIS's Qformer.py imports these from transformers.modeling_utils, where transformers 4 kept them."""
    import transformers.modeling_utils as modeling_utils
    from transformers import pytorch_utils

    def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
        raise NotImplementedError("head pruning is not part of a BLIP-2 training step")

    for name, helper in (("apply_chunking_to_forward", pytorch_utils.apply_chunking_to_forward),
                         ("prune_linear_layer", pytorch_utils.prune_linear_layer),
                         ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices)):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, helper)


def _lavis_root(source: str | Path) -> Path:
    """The folder holding `lavis/`: `source` itself, or the wheel unpacked into a temporary folder."""
    source = Path(source)
    if source.is_dir():
        if not (source / "lavis" / "models" / "blip2_models" / "Qformer.py").is_file():
            raise FileNotFoundError(f"{source} holds no lavis/models/blip2_models/Qformer.py; expected an unpacked "
                                    "salesforce-lavis package")
        return source
    if source.suffix != ".whl":
        raise ValueError(f"{source}: expected a salesforce-lavis wheel (.whl) or the folder it unpacks to")
    unpacked = Path(tempfile.mkdtemp(prefix="lavis-"))
    with zipfile.ZipFile(source) as wheel:
        wheel.extractall(unpacked, [name for name in wheel.namelist() if name.startswith("lavis/models/")])
    return unpacked


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@cache
def load_lavis_blip2(source: str | Path):
    """Imports the original BLIP-2 modules from a salesforce-lavis wheel or unpacked folder, once per process;
    returns a namespace of them: blip2, blip2_qformer, blip2_opt, qformer, modeling_opt, eva_vit."""
    root = _lavis_root(source) / "lavis"
    _restore_transformers_4_helpers()
    _install_module("lavis", {}, root)
    _install_module("lavis.common", {}, root / "common")
    _install_module("lavis.models", {}, root / "models")
    _install_module("lavis.models.blip2_models", {}, root / "models" / "blip2_models")
    _install_module("lavis.models.blip_models", {}, root / "models" / "blip_models")
    stand_ins = dict(_STAND_INS)
    if importlib.util.find_spec("timm") is None:
        stand_ins.update(_timm_stand_in())
        _install_module("timm", {}, Path(tempfile.gettempdir()))
        _install_module("timm.models", {}, Path(tempfile.gettempdir()))
    for name, attributes in stand_ins.items():
        if name not in sys.modules:
            _install_module(name, attributes)
    _import_file("lavis.models.base_model", root / "models" / "base_model.py")
    _import_file("lavis.models.blip_models.blip_outputs", root / "models" / "blip_models" / "blip_outputs.py")
    eva_vit = _import_file("lavis.models.eva_vit", root / "models" / "eva_vit.py")
    qformer = _import_file("lavis.models.blip2_models.Qformer", root / "models" / "blip2_models" / "Qformer.py")
    blip2 = _import_file("lavis.models.blip2_models.blip2", root / "models" / "blip2_models" / "blip2.py")
    blip2_models = root / "models" / "blip2_models"
    return types.SimpleNamespace(
        blip2=blip2, qformer=qformer, eva_vit=eva_vit,
        blip2_qformer=_import_file("lavis.models.blip2_models.blip2_qformer", blip2_models / "blip2_qformer.py"),
        modeling_opt=_import_file("lavis.models.blip2_models.modeling_opt", blip2_models / "modeling_opt.py"),
        blip2_opt=_import_file("lavis.models.blip2_models.blip2_opt", blip2_models / "blip2_opt.py"),
    )


def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ModuleUtilsMixin.invert_attention_mask, which transformers 5 dropped."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4's ModuleUtilsMixin.get_head_mask for a training step, which never masks heads."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not part of a BLIP-2 training step")
    return [None] * num_hidden_layers


class PretokenizedText:
    """Stands in for LAVIS's BertTokenizer: hands over a batch tokenised beforehand, as our collator does for ours."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, bos_token_id: int,
                 pad_token_id: int = 0):
        self.batch = types.SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask)
        self.batch.to = lambda device: self.batch
        self.vocab_size, self.bos_token_id, self.pad_token_id = vocab_size, bos_token_id, pad_token_id

    def __len__(self):
        return self.vocab_size

    def __call__(self, text, **kwargs):
        return self.batch


def lavis_eva_vit(lavis, tower: dict, dtype: torch.dtype, drop_path_rate: float = 0.0,
                  use_checkpoint: bool = False) -> nn.Module:
    """LAVIS's EVA `VisionTransformer` of `tower`'s shape (our vision-config fields) with random weights, in `dtype`,
    as `create_eva_vit_g` builds it (its `mlp_ratio` is 4.3637 for 6144 units of width 1408: `int()` truncates)."""
    return lavis.eva_vit.VisionTransformer(
        img_size=tower["image_size"], patch_size=tower["patch_size"], use_mean_pooling=False,
        embed_dim=tower["hidden_size"], depth=tower["num_hidden_layers"], num_heads=tower["num_attention_heads"],
        mlp_ratio=(tower["intermediate_size"] + 0.5) / tower["hidden_size"], qkv_bias=True,
        drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint,
    ).to(dtype)


def _patch_builders(lavis, tower: dict, qformer: dict, tokenizer: "PretokenizedText", tower_dtype: torch.dtype):
    """Blip2Base's builders, with random weights of the given shapes instead of downloaded ones: an EVA ViT
    (LAVIS's `VisionTransformer`, frozen and cast to `tower_dtype` as `vit_precision` does) and a Q-Former of
    `qformer`'s BertConfig fields (LAVIS's `init_Qformer` with the config built here)."""
    blip2, qformer_module = lavis.blip2, lavis.qformer

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        visual_encoder = lavis_eva_vit(lavis, dict(tower, image_size=img_size), tower_dtype, drop_path_rate,
                                       use_grad_checkpoint)
        return visual_encoder, blip2.LayerNorm(visual_encoder.num_features)

    # transformers 5's init_weights needs post_init(), which the transformers-4 code never calls: initialise as
    # transformers 4 did (module by module), tie as it did, and build the vocabulary at the tokenizer's size (LAVIS
    # resizes bert-base's 30522 to 30523 for [DEC]).
    qformer_module.BertPreTrainedModel.init_weights = lambda self: self.apply(self._init_weights)
    qformer_module.BertPreTrainedModel.invert_attention_mask = _invert_attention_mask
    qformer_module.BertPreTrainedModel.get_head_mask = _get_head_mask
    qformer_module.BertLMHeadModel.resize_token_embeddings = lambda self, size, *args, **kwargs: None
    qformer_config = dict(qformer, vocab_size=len(tokenizer))
    qformer_config.pop("cross_attention_freq", None)

    def init_qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
        config = qformer_module.BertConfig(**qformer_config)
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        model = qformer_module.BertLMHeadModel(config)
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return model, query_tokens

    blip2.Blip2Base.init_tokenizer = classmethod(lambda cls: tokenizer)
    blip2.Blip2Base.init_vision_encoder = classmethod(init_vision_encoder)
    blip2.Blip2Base.init_Qformer = classmethod(init_qformer)


def build_lavis_blip2_qformer(source, *, tower: dict, qformer: dict, num_query_tokens: int, embed_dim: int,
                              tokenizer: "PretokenizedText", tower_dtype: torch.dtype):
    """LAVIS's stage-1 `Blip2Qformer` with random weights (see `_patch_builders`)."""
    lavis = load_lavis_blip2(source)
    _patch_builders(lavis, tower, qformer, tokenizer, tower_dtype)
    return lavis.blip2_qformer.Blip2Qformer(
        vit_model="eva_clip_g", img_size=tower["image_size"], drop_path_rate=0, use_grad_checkpoint=False,
        vit_precision="bf16", freeze_vit=True, num_query_token=num_query_tokens,
        cross_attention_freq=qformer.get("cross_attention_freq", 2), embed_dim=embed_dim,
        max_txt_len=tokenizer.batch.input_ids.shape[1])


def build_lavis_blip2_opt(source, *, tower: dict, qformer: dict, num_query_tokens: int, opt: dict,
                          qformer_tokenizer: "PretokenizedText", opt_tokenizer: "PretokenizedText",
                          dtype: torch.dtype):
    """LAVIS's stage-2 `Blip2OPT` with random weights: the tower and Q-Former as `build_lavis_blip2_qformer`, and
    LAVIS's own OPTForCausalLM (`blip2_models/modeling_opt.py`) of `opt`'s OPTConfig fields in `dtype`, where LAVIS
    loads facebook/opt-* in fp16. LAVIS's `maybe_autocast` runs the tower and the LLM under fp16 autocast; here under
    `dtype`, so that both implementations compute in the same precision."""
    lavis = load_lavis_blip2(source)
    _patch_builders(lavis, tower, qformer, qformer_tokenizer, dtype)
    modeling_opt = lavis.modeling_opt

    def opt_from_pretrained(cls, name, torch_dtype=None, **kwargs):
        model = cls(modeling_opt.OPTConfig(**opt))
        return model.to(dtype)

    modeling_opt.OPTForCausalLM.from_pretrained = classmethod(opt_from_pretrained)
    lavis.blip2_opt.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: opt_tokenizer)
    lavis.blip2.Blip2Base.maybe_autocast.__defaults__ = (dtype,)
    return lavis.blip2_opt.Blip2OPT(
        vit_model="eva_clip_g", img_size=tower["image_size"], drop_path_rate=0, use_grad_checkpoint=False,
        vit_precision="bf16", freeze_vit=True, num_query_token=num_query_tokens, opt_model="random", prompt="",
        max_txt_len=opt_tokenizer.batch.input_ids.shape[1])
