"""The frozen tower's features on disk (`training.feature_cache`, `blip2-bridge cache-features`) and training from them
(`vision_features`, `--feature_cache`): the same losses and gradients as from pixels, refusal of another tower's
cache, resume by shard."""

import json
import shutil

import pytest
import torch

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeModel
from modeling_blip2.cli import main
from modeling_blip2.training.collators import ImageCaptionCollator
from modeling_blip2.training.data import SkippedSamples
from modeling_blip2.training.feature_cache import FEATURE_CACHE_FILE, FeatureCache, cache_features
from tests.data_files import write_coco_folder, write_image, write_tiny_model
from tests.helpers import CAPTIONS
from tests.trainer_helpers import IMAGE_SIZE, stage1_setup, tiny_stage2_model

STAGE1_LOSSES = ("loss", "loss_itc", "loss_itm", "loss_itg")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six image files and eight caption rows over them (two images have two captions each)."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(6):
        write_image(folder / f"{index}.png", seed=index)
        paths.append(str(folder / f"{index}.png"))
    return [{"image": paths[index % 6], "caption": caption} for index, caption in enumerate(CAPTIONS)]


def stage1_model_and_processor():
    model, collator = stage1_setup(vision_feature_layer=-2)
    return model, collator.processor


def losses_and_layernorm_grad(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the ITM hard negatives draw from torch's generator in training
    output = model(**batch)
    output.loss.backward()
    return {name: output[name].item() for name in STAGE1_LOSSES}, model.vision_layernorm.weight.grad.clone()


def stage1_batches(model, processor, rows, cache_dir, storage_dtype):
    cache_features(model, rows, cache_dir, processor.image_processor, storage_dtype=storage_dtype, shard_size=4)
    pixels = ImageCaptionCollator(processor)(rows)
    cached = ImageCaptionCollator(processor, feature_cache=FeatureCache(cache_dir))(rows)
    return pixels, cached


def test_stage1_losses_from_cached_fp32_features_equal_pixel_training_and_train_vision_layernorm(images, tmp_path):
    model, processor = stage1_model_and_processor()
    model.train()
    pixels, cached = stage1_batches(model, processor, images, tmp_path / "cache", "float32")
    assert set(cached) == {"vision_features", "input_ids", "attention_mask"}
    # (batch, image_length, vision_width) at the feature layer: 2x2 patches + CLS of a 24-wide tower
    assert cached["vision_features"].shape == (8, 5, 24) and cached["vision_features"].dtype == torch.float32
    assert torch.equal(cached["input_ids"], pixels["input_ids"])

    pixel_losses, pixel_grad = losses_and_layernorm_grad(model, pixels)
    cached_losses, cached_grad = losses_and_layernorm_grad(model, cached)
    for name in STAGE1_LOSSES:
        assert cached_losses[name] == pytest.approx(pixel_losses[name], abs=1e-5), name
    assert pixel_grad.abs().sum() > 1e-3  # the gradient reaches vision_layernorm from pixels...
    torch.testing.assert_close(cached_grad, pixel_grad, atol=1e-5, rtol=1e-4)  # ...and from the cache alike
    assert model.vision_model.embeddings.patch_embedding.weight.grad is None  # the tower stays frozen

    # The features before the LayerNorm are what the cache holds: passed as image_embeds they give other losses.
    torch.manual_seed(0)
    as_image_embeds = model(image_embeds=cached["vision_features"], input_ids=cached["input_ids"],
                            attention_mask=cached["attention_mask"]).loss.item()
    assert abs(as_image_embeds - pixel_losses["loss"]) > 1e-3


def test_bf16_storage_gives_the_pixel_losses_within_bf16_rounding(images, tmp_path):
    model, processor = stage1_model_and_processor()
    model.train()
    pixels, cached = stage1_batches(model, processor, images, tmp_path / "cache", "bfloat16")
    assert cached["vision_features"].dtype == torch.bfloat16
    pixel_losses, pixel_grad = losses_and_layernorm_grad(model, pixels)
    cached_losses, cached_grad = losses_and_layernorm_grad(model, cached)
    # bf16 keeps 8 bits of mantissa (relative rounding <= 2**-9): the losses moved by less than 0.1% here (measured
    # 2026-11-28: at most 8e-4 relative, loss_itm); bounded at 0.5%, and the gradient of the LayerNorm (largest entry
    # about 0.2) within 5e-3 (measured 7e-4).
    for name in STAGE1_LOSSES:
        assert cached_losses[name] == pytest.approx(pixel_losses[name], rel=5e-3), name
        assert cached_losses[name] != pixel_losses[name], name  # rounded features: not the fp32 run's losses
    torch.testing.assert_close(cached_grad, pixel_grad, atol=5e-3, rtol=0)
    assert FeatureCache(tmp_path / "cache").metadata["storage_dtype"] == "bfloat16"


def test_stage2_loss_from_cached_features_equals_pixel_training_and_trains_vision_layernorm(images, tmp_path):
    model = tiny_stage2_model()
    model.config.vision_feature_layer = -2
    rows = images[:4]
    cache_features(model, rows, tmp_path / "cache", storage_dtype="float32")
    cache = FeatureCache(tmp_path / "cache")
    image_processor = Blip2BridgeImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pixel_values = torch.cat([image_processor(row["image"], return_tensors="pt")["pixel_values"] for row in rows])
    vision_features = torch.cat([cache.features(row["image"]) for row in rows])
    num_queries, image_token = model.config.num_query_tokens, model.config.image_token_id
    captions = torch.randint(3, image_token, (4, 5), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([torch.full((4, num_queries), image_token), captions], dim=1)
    labels = input_ids.masked_fill(input_ids == image_token, -100)

    def loss_and_grad(**images_given):
        model.zero_grad()
        torch.manual_seed(0)  # the frozen OPT's dropout in train mode
        loss = model(input_ids=input_ids, labels=labels, **images_given).loss
        loss.backward()
        return loss.item(), model.vision_layernorm.weight.grad.clone()

    model.train()
    pixel_loss, pixel_grad = loss_and_grad(pixel_values=pixel_values)
    cached_loss, cached_grad = loss_and_grad(vision_features=vision_features)
    assert cached_loss == pytest.approx(pixel_loss, abs=1e-5)
    assert pixel_grad.abs().sum() > 1e-4
    torch.testing.assert_close(cached_grad, pixel_grad, atol=1e-5, rtol=1e-4)
    # generate reads them too: the same captions as from pixels
    model.eval()
    prompt = torch.full((4, num_queries), image_token)
    assert torch.equal(model.generate(vision_features=vision_features, input_ids=prompt, max_new_tokens=3),
                       model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=3))


def test_vision_features_beside_another_image_input_or_of_the_wrong_width_are_refused():
    model, _ = stage1_model_and_processor()
    features, input_ids = torch.randn(2, 5, 24), torch.tensor([[2, 5, 3], [2, 6, 3]])
    with pytest.raises(ValueError, match="pass exactly one of pixel_values, image_embeds and vision_features; got "
                                         "vision_features and image_embeds"):
        model(vision_features=features, image_embeds=features, input_ids=input_ids)
    with pytest.raises(ValueError, match=r"vision_features has shape \(2, 5, 9\); expected \(batch, image_length, 24\)"):
        model(vision_features=torch.randn(2, 5, 9), input_ids=input_ids)
    with pytest.raises(ValueError, match="pass exactly one of pixel_values and vision_features"):
        model.get_image_embeds()
    torch.testing.assert_close(model.get_image_embeds(vision_features=features), model.vision_layernorm(features))


def test_vision_features_are_refused_while_the_tower_trains_and_taken_again_once_it_is_frozen():
    model, _ = stage1_model_and_processor()
    features, input_ids = torch.randn(2, 5, 24), torch.tensor([[2, 5, 3], [2, 6, 3]])
    model.train()
    model.vision_model.requires_grad_(True)  # fine-tuning the tower (docs/training.md): cached features are stale
    with pytest.raises(ValueError, match="vision_features given while the vision tower trains"):
        model(vision_features=features, input_ids=input_ids)
    model.eval()  # scoring with an unfrozen tower reads the features as given
    expected = model.vision_layernorm(features)
    torch.testing.assert_close(model.get_image_embeds(vision_features=features), expected)
    model.train()
    model.vision_model.requires_grad_(False)
    assert torch.isfinite(model(vision_features=features, input_ids=input_ids).loss)


def test_a_cache_of_another_feature_layer_image_size_or_tower_weights_is_refused_naming_the_field(images, tmp_path):
    model, processor = stage1_model_and_processor()
    cache_features(model, images[:3], tmp_path / "cache", processor.image_processor)
    cache = FeatureCache(tmp_path / "cache")
    cache.check_model(model, processor.image_processor)  # its own model passes

    model.config.vision_feature_layer = -1
    with pytest.raises(ValueError, match=r"vision_feature_layer: cache -2, model -1"):
        cache.check_model(model, processor.image_processor)
    model.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match=r"image_size: cache \[28, 28\], model \[56, 56\]"):
        cache.check_model(model, Blip2BridgeImageProcessor(size={"height": 56, "width": 56}))
    with torch.no_grad():
        model.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="tower_checksum: cache '[0-9a-f]{64}', model '[0-9a-f]{64}'") as refusal:
        cache.check_model(model, processor.image_processor)
    assert "vision_feature_layer" not in str(refusal.value) and "image_size" not in str(refusal.value)
    other_width, _ = stage1_setup(vision_feature_layer=-2, vision_config={
        **model.config.vision_config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    with pytest.raises(ValueError, match=r"vision_config \(hidden_size 24 vs 32, intermediate_size 48 vs 64"):
        cache.check_model(other_width, processor.image_processor)


def test_resume_recomputes_only_a_deleted_shard_and_refuses_other_arguments(images, tmp_path):
    model, processor = stage1_model_and_processor()
    cache_dir = tmp_path / "cache"
    summary = cache_features(model, images, cache_dir, processor.image_processor, storage_dtype="float32",
                             shard_size=2)
    assert (summary["images"], summary["cached"], summary["shards"]) == (6, 6, 3)
    before = FeatureCache(cache_dir)
    first = {row["image"]: before.features(row["image"]).clone() for row in images}
    (cache_dir / "shards" / "shard-00001.safetensors").unlink()
    untouched = (cache_dir / "shards" / "shard-00002.safetensors").stat().st_mtime_ns

    computed = []
    tower = model.get_vision_features
    model.get_vision_features = lambda pixel_values: computed.append(len(pixel_values)) or tower(pixel_values)
    cache_features(model, images, cache_dir, processor.image_processor, storage_dtype="float32", shard_size=2)
    assert computed == [2]  # the two images of the deleted shard, and nothing else
    assert (cache_dir / "shards" / "shard-00002.safetensors").stat().st_mtime_ns == untouched
    after = FeatureCache(cache_dir)
    assert all(torch.equal(after.features(key), features) for key, features in first.items())

    with pytest.raises(ValueError, match=r"holds a feature cache with other arguments \(storage_dtype differ\)"):
        cache_features(model, images, cache_dir, processor.image_processor, storage_dtype="bfloat16", shard_size=2)


def test_augmented_views_are_seeded_and_a_sample_missing_from_the_cache_is_skipped_and_counted(images, tmp_path):
    model, processor = stage1_model_and_processor()
    rows = images[:3]
    cache_features(model, rows, tmp_path / "a", processor.image_processor, storage_dtype="float32", num_views=3,
                   seed=1, shard_size=1)
    cache_features(model, rows, tmp_path / "b", processor.image_processor, storage_dtype="float32", num_views=3,
                   seed=1, shard_size=3)
    a, b = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b")
    views = a.features(rows[0]["image"])
    assert views.shape == (3, 5, 24) and a.metadata["augmentation"]["scale"] == [0.5, 1.0]
    assert (views[0] - views[1]).abs().max() > 1e-3  # three different crops...
    assert all(torch.equal(a.features(row["image"]), b.features(row["image"])) for row in rows)  # ...per image seed

    skipped = SkippedSamples()
    collator = ImageCaptionCollator(processor, feature_cache=a, skipped=skipped)
    batch = collator(rows + [{"image": "elsewhere.png", "caption": "a dog"}])
    assert batch["vision_features"].shape == (3, 5, 24)
    assert skipped.counts["missing file"] == 1 and skipped.used == 3


def test_cache_features_command_then_train_with_feature_cache_changes_vision_layernorm(tmp_path, capsys):
    model_dir, cache_dir, output_dir = tmp_path / "model", tmp_path / "cache", tmp_path / "trained"
    initial = write_tiny_model(model_dir)
    annotation_file = write_coco_folder(tmp_path / "coco")
    image_root = str(tmp_path / "coco" / "images")
    assert main(["cache-features", "--model", str(model_dir), "--annotation-files", str(annotation_file),
                 "--image-root", image_root, "--output", str(cache_dir), "--dtype", "float32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # five images, the last a truncated JPEG: left out
    assert (printed["images"], printed["cached"], printed["left_out"]) == (5, 4, 1)

    train = ["train", "--stage", "1", "--model_name_or_path", str(model_dir), "--annotation_files",
             str(annotation_file), "--image_root", image_root, "--feature_cache", str(cache_dir), "--output_dir",
             str(output_dir), "--per_device_train_batch_size", "8", "--max_steps", "1", "--learning_rate", "1e-2",
             "--lr_scheduler_type", "constant", "--save_strategy", "no", "--use_cpu", "--report_to", "none"]
    assert main(train) == 0
    summary = json.loads((output_dir / "train_summary.json").read_text())
    # One step of all eight captions: the truncated image's one caption is skipped as missing from the cache.
    assert (summary["steps"], summary["samples"]) == (1, 7)
    assert summary["skipped_samples"] == summary["skipped_by_reason"]["missing file"] == 1
    trained = Blip2BridgeModel.from_pretrained(output_dir)
    change = (trained.vision_layernorm.weight - initial.vision_layernorm.weight).abs().max().item()
    assert change > 1e-3  # AdamW moves each weight by about the learning rate on its first step
    assert torch.equal(trained.vision_model.embeddings.patch_embedding.weight,
                       initial.vision_model.embeddings.patch_embedding.weight)

    # A cache whose metadata names another feature layer is refused before training, naming the field.
    metadata = json.loads((cache_dir / FEATURE_CACHE_FILE).read_text())
    metadata["vision_feature_layer"] = -2
    (cache_dir / FEATURE_CACHE_FILE).write_text(json.dumps(metadata))
    shutil.rmtree(output_dir)
    assert main(train) == 1
    assert "vision_feature_layer: cache -2, model -1" in capsys.readouterr().err


def test_webdataset_shards_are_cached_by_sample_key_and_their_unreadable_images_left_out(tmp_path, capsys):
    from modeling_blip2.training.datasets import load_webdataset
    from tests.data_files import write_shards

    (tmp_path / "shards").mkdir()
    shards = write_shards(tmp_path / "shards")
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir)
    assert main(["cache-features", "--model", str(model_dir), "--shards", *shards, "--output",
                 str(tmp_path / "cache")]) == 0
    printed = json.loads(capsys.readouterr().out)
    # eight samples; truncated, zero-byte and non-image files left out (the CMYK one converts)
    assert (printed["images"], printed["cached"], printed["left_out"]) == (8, 5, 3)
    cache = FeatureCache(tmp_path / "cache")
    assert sorted(cache._shard_of) == ["s000", "s002", "s101", "s102", "s103"]
    assert cache.features("s000").dtype == torch.bfloat16

    _, processor = stage1_model_and_processor()
    skipped = SkippedSamples()
    batch = ImageCaptionCollator(processor, feature_cache=cache, skipped=skipped)(list(load_webdataset(shards)))
    assert batch["vision_features"].shape == (5, 5, 24)
    assert skipped.counts["missing file"] == 3
