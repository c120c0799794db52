"""Fine-tuning with the image tower unfrozen (issue #15 item 2): the tower's own learning rate, weight decay and
layer-wise learning-rate decay in the optimiser's groups, a schedule that scales every group alike, gradient
checkpointing of the tower's layers, and the COCO fine-tuning presets with the original's values."""

import logging

import pytest
import torch
from transformers import ViTConfig, ViTModel

from modeling_blip2 import Blip2BridgeModel, Blip2BridgeTrainer
from modeling_blip2.training import Blip2BridgeTrainingArguments, blip2_training_arguments
from modeling_blip2.training.trainer import per_epoch_cosine_schedule, vision_layer_ids
from tests.trainer_helpers import stage1_setup, stage1_trainer
from tests.tiny_models import VISION_CONFIG, tiny_batch, tiny_config, tiny_model
from tests.transformers_versions import ACTIVATION_CHECKPOINTING_ARGUMENT, enable_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread

# salesforce/LAVIS, lavis/projects/blip2/train/caption_coco_ft.yaml@87a27bc (run:) and retrieval_coco_ft.yaml@93e0179
# (run:); written from the files, not from our code.
LAVIS_CAPTION_COCO_FT = dict(init_lr=1e-5, min_lr=0, warmup_lr=1e-8, warmup_steps=1000, weight_decay=0.05,
                             max_epoch=5, batch_size_train=16, lr_layer_decay=1)  # no lr_layer_decay: the runner's 1
LAVIS_RETRIEVAL_COCO_FT = dict(init_lr=1e-5, min_lr=0, warmup_lr=1e-8, warmup_steps=1000, weight_decay=0.05,
                               max_epoch=5, batch_size_train=14, lr_layer_decay=0.95)

CLIP_VISION_CONFIG = dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, image_size=28, patch_size=14)


def three_layer_model(vision_config=None) -> Blip2BridgeModel:
    """The tiny stage-1 model over a 3-layer tower (BLIP-2's unless `vision_config`), the tower unfrozen."""
    torch.manual_seed(0)
    config = tiny_config(vision_config=vision_config or dict(VISION_CONFIG, num_hidden_layers=3))
    config._attn_implementation = "eager"
    model = Blip2BridgeModel(config)
    model.vision_model.requires_grad_(True)
    return model


def arguments(tmp_path, **overrides) -> Blip2BridgeTrainingArguments:
    values = dict(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.05, report_to="none", use_cpu=True)
    return Blip2BridgeTrainingArguments(**{**values, **overrides})


def group_of(optimizer, parameter) -> dict:
    (group,) = [group for group in optimizer.param_groups if any(p is parameter for p in group["params"])]
    return group


def blip2_tower_depth(name: str, num_layers: int) -> int:
    """By hand, LAVIS's exponent (lr_scale ** (L + 1 - layer_id)) for BLIP-2's tower parameter names."""
    if name.startswith("embeddings."):
        return num_layers + 1
    if name.startswith("encoder.layers."):
        return num_layers - int(name.split(".")[2])
    assert name.startswith("post_layernorm."), name
    return 1


# ---- the optimiser's groups -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_learning_rate, vision_weight_decay", [(2e-5, 0.1), (None, None)])
def test_tower_groups_scale_the_learning_rate_by_layer_decay_per_depth(tmp_path, vision_learning_rate,
                                                                       vision_weight_decay):
    model = three_layer_model()
    args = arguments(tmp_path, vision_learning_rate=vision_learning_rate, vision_weight_decay=vision_weight_decay,
                     vision_layer_decay=0.9)
    optimizer = Blip2BridgeTrainer(model=model, args=args).create_optimizer()
    tower_lr = 2e-5 if vision_learning_rate else 1e-4
    tower_decay = 0.1 if vision_weight_decay else 0.05
    tower = dict(model.vision_model.named_parameters())
    depths = set()
    for name, parameter in tower.items():
        group = group_of(optimizer, parameter)
        depth = blip2_tower_depth(name, 3)
        depths.add(depth)
        assert group["lr"] == pytest.approx(tower_lr * 0.9**depth, rel=1e-12), name
        no_decay = parameter.ndim == 1 or name.endswith("bias")
        assert group["weight_decay"] == (0.0 if no_decay else tower_decay), name
    assert depths == {1, 2, 3, 4}  # post-layernorm and the top layer, two layers, the embeddings
    assert group_of(optimizer, tower["encoder.layers.1.layer_norm1.weight"])["weight_decay"] == 0.0
    assert group_of(optimizer, tower["embeddings.patch_embedding.weight"])["weight_decay"] == tower_decay
    # Everything else keeps the Trainer's two groups at the base learning rate.
    assert [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups[:2]] == [(1e-4, 0.05), (1e-4, 0.0)]
    for name, parameter in model.named_parameters():
        if not name.startswith("vision_model."):
            assert group_of(optimizer, parameter) in optimizer.param_groups[:2], name
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.parameters())  # each trainable parameter once


def test_a_frozen_tower_stays_out_of_the_optimizer_and_the_settings_warn(tmp_path, caplog):
    model = three_layer_model()
    model.vision_model.requires_grad_(False)
    args = arguments(tmp_path, vision_learning_rate=2e-5, vision_layer_decay=0.9)
    with caplog.at_level(logging.WARNING, logger="modeling_blip2.training.trainer"):
        optimizer = Blip2BridgeTrainer(model=model, args=args).create_optimizer()
    assert len(optimizer.param_groups) == 2
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.vision_model.parameters()}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert "the vision tower is frozen" in caplog.text


def test_clip_tower_numbers_its_pre_layernorm_with_the_embeddings(tmp_path):
    # LAVIS's clip_vit get_num_layer: ln_pre and the embeddings are layer 0, the rest after the blocks layer L.
    model = three_layer_model(CLIP_VISION_CONFIG)
    optimizer = Blip2BridgeTrainer(model=model, args=arguments(tmp_path, vision_layer_decay=0.5)).create_optimizer()
    tower = dict(model.vision_model.named_parameters())
    expected = {"embeddings.patch_embedding.weight": 3, "pre_layrnorm.weight": 3, "encoder.layers.0.mlp.fc1.weight": 2,
                "encoder.layers.1.mlp.fc1.weight": 1, "post_layernorm.weight": 1}
    for name, depth in expected.items():
        assert group_of(optimizer, tower[name])["lr"] == pytest.approx(1e-4 * 0.5**depth, rel=1e-12), name


def test_vit_layer_ids_read_its_layer_names():
    tower = ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14))
    names = [name for name, _ in tower.named_parameters()]
    ids, num_layers = vision_layer_ids(tower)
    assert num_layers == 2
    assert ids["embeddings.cls_token"] == ids["embeddings.patch_embeddings.projection.weight"] == 0
    first, last = names.index(next(n for n in names if ".0." in n)), max(i for i, n in enumerate(names) if ".1." in n)
    assert {ids[name] for name in names[first:last + 1]} == {1, 2}
    assert [ids[name] for name in names[last + 1:]] == [2] * len(names[last + 1:]) and names[last + 1:]


# ---- the schedule scales every group alike -----------------------------------------------------------------------


def assert_groups_follow_one_factor(optimizer, scheduler, steps: int) -> list[float]:
    initial = [group["initial_lr"] for group in optimizer.param_groups]
    assert len(set(initial)) > 2  # base, and tower layers at several rates
    factors = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        factor = optimizer.param_groups[0]["lr"] / initial[0]
        for group, start in zip(optimizer.param_groups, initial):
            assert group["lr"] == pytest.approx(start * factor, rel=1e-9)
        factors.append(factor)
    return factors


def test_per_step_cosine_scales_every_group_and_each_floor_by_its_ratio(tmp_path):
    args = arguments(tmp_path, vision_learning_rate=2e-5, vision_layer_decay=0.9, warmup_steps=2,
                     lr_scheduler_type="cosine_warmup_with_min_lr",
                     lr_scheduler_kwargs={"min_lr": 1e-5, "warmup_lr_rate": 0.01})
    trainer = Blip2BridgeTrainer(model=three_layer_model(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = trainer.optimizer
    factors = assert_groups_follow_one_factor(optimizer, trainer.lr_scheduler, steps=9)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)  # peak, then min_lr / learning_rate
    tower_top = optimizer.param_groups[-1]
    assert tower_top["lr"] == pytest.approx(2e-5 * 0.9 * 0.1, rel=1e-9)  # the tower's floor: min_lr times its ratio


def test_per_epoch_cosine_scales_every_group(tmp_path):
    args = arguments(tmp_path, vision_learning_rate=3e-5, vision_layer_decay=0.8)
    optimizer = Blip2BridgeTrainer(model=three_layer_model(), args=args).create_optimizer()
    scheduler = per_epoch_cosine_schedule(optimizer, num_warmup_steps=3, num_training_steps=20, steps_per_epoch=5,
                                          min_lr=1e-5, warmup_lr_rate=0.01)
    factors = assert_groups_follow_one_factor(optimizer, scheduler, steps=19)
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 4)).item()))


# ---- gradient checkpointing of the tower -------------------------------------------------------------------------


@pytest.mark.parametrize("vision_config", [None, CLIP_VISION_CONFIG], ids=["blip2_tower", "clip_tower"])
def test_checkpointing_recomputes_the_unfrozen_towers_layers_with_the_same_gradients(vision_config):
    pixel_values, input_ids, attention_mask = tiny_batch()
    gradients, layer_calls = [], []
    for checkpointing in (False, True):
        model = three_layer_model(vision_config).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        layers = model.vision_model.encoder.layers
        assert all(layer.gradient_checkpointing is checkpointing for layer in layers)
        calls = []
        # The layer's first module: a recomputation that stops once it has what the backward needs still runs it.
        layers[0].layer_norm1.register_forward_pre_hook(lambda module, args: calls.append(1))
        torch.manual_seed(3)
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).loss.backward()
        layer_calls.append(len(calls))
        gradients.append({name: p.grad for name, p in model.vision_model.named_parameters()})
    assert layer_calls == [1, 2]  # the checkpointed layer runs again in the backward pass
    # The queries read the last layer's hidden state before the tower's post-layernorm, which gets no gradient.
    unused = {name for name, grad in gradients[0].items() if grad is None}
    assert unused == {"post_layernorm.weight", "post_layernorm.bias"}
    assert {name for name, grad in gradients[1].items() if grad is None} == unused
    for name, plain in gradients[0].items():
        if name not in unused:
            assert plain.abs().sum() > 0, name
            torch.testing.assert_close(gradients[1][name], plain, atol=1e-6, rtol=0)


def test_training_arguments_checkpointing_recomputes_the_towers_layers_in_training(tmp_path):
    model, collator = stage1_setup()
    model.vision_model.requires_grad_(True)
    calls = []
    model.vision_model.encoder.layers[0].layer_norm1.register_forward_pre_hook(lambda module, args: calls.append(1))
    trainer = stage1_trainer(tmp_path, model, collator, max_steps=1, **{ACTIVATION_CHECKPOINTING_ARGUMENT: True})
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in model.vision_model.encoder.layers)
    assert len(calls) == 2  # one step: the forward pass and its recomputation


# ---- the presets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, lavis", [("caption_coco_ft", LAVIS_CAPTION_COCO_FT),
                                           ("retrieval_coco_ft", LAVIS_RETRIEVAL_COCO_FT)])
def test_finetune_presets_carry_the_lavis_values(tmp_path, recipe, lavis):
    args = blip2_training_arguments(recipe=recipe, output_dir=str(tmp_path), use_cpu=True)
    assert args.learning_rate == lavis["init_lr"]
    assert args.learning_rate * args.lr_scheduler_kwargs["warmup_lr_rate"] == pytest.approx(lavis["warmup_lr"])
    assert args.lr_scheduler_kwargs["min_lr"] == lavis["min_lr"]
    assert args.warmup_steps == lavis["warmup_steps"]
    assert args.weight_decay == lavis["weight_decay"]
    assert (args.num_train_epochs, args.max_steps) == (lavis["max_epoch"], -1)
    assert args.per_device_train_batch_size == lavis["batch_size_train"]
    # LAVIS's schedulers set every group to one rate (lavis/common/optims.py@57bee8d), so the file's lr_layer_decay never
    # applied: the presets train the tower at one rate, as the original ran.
    assert args.vision_layer_decay == 1.0
    assert (args.vision_learning_rate, args.vision_weight_decay) == (None, None)
    # linear_warmup_cosine_lr: the warm-up, then one cosine step per epoch; use_grad_checkpoint: True; no clipping.
    assert args.lr_scheduler_type == "cosine_warmup_with_min_lr" and args.cosine_decay_per_epoch
    assert getattr(args, ACTIVATION_CHECKPOINTING_ARGUMENT) is True
    assert (args.adam_beta1, args.adam_beta2, args.max_grad_norm) == (0.9, 0.999, 0.0)
    # A new peak keeps the recipe's ends.
    faster = blip2_training_arguments(recipe=recipe, output_dir=str(tmp_path), learning_rate=2e-5, use_cpu=True)
    assert faster.lr_scheduler_kwargs == {"min_lr": 0.0, "warmup_lr_rate": pytest.approx(1e-8 / 2e-5)}


def test_stage_calls_are_unchanged_and_recipes_are_refused_by_name(tmp_path):
    by_stage = blip2_training_arguments(1, str(tmp_path), use_cpu=True)
    by_name = blip2_training_arguments(recipe="pretrain_stage1", output_dir=str(tmp_path), use_cpu=True)
    assert by_stage.to_dict() == by_name.to_dict()
    assert (by_stage.learning_rate, by_stage.max_steps, by_stage.vision_layer_decay) == (1e-4, 250_000, 1.0)
    with pytest.raises(ValueError, match="recipe='caption_coco'"):
        blip2_training_arguments(recipe="caption_coco", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pass exactly one"):
        blip2_training_arguments(2, str(tmp_path), recipe="caption_coco_ft")
    with pytest.raises(ValueError, match="vision_layer_decay=0"):
        arguments(tmp_path, vision_layer_decay=0)
