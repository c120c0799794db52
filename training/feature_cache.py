"""The frozen vision tower's features on disk: computed once (`cache_features`), read by every epoch (`FeatureCache`).

Both stages keep the image encoder frozen, so its output for an image never changes while the Q-Former trains: a cache
replaces the tower's forward pass (most of a step's time with a ViT-g) by a read. The cache holds the tower's hidden
state at `config.vision_feature_layer`, *before* `vision_layernorm`, which trains: the model takes it as
`vision_features` and runs the LayerNorm itself.

Layout of a cache folder:
- `shards/shard-{i:05d}.safetensors`: one tensor per image, (views, image_length, vision_width), named by the image's
  key (its path as the dataset gives it, or its webdataset `__key__`), in the storage dtype (default bfloat16);
- `feature_cache.json`: what identifies the tower (`vision_config`, `vision_feature_layer`, `image_size` of the
  processor, `tower_checksum`: a SHA-256 of the tower's weights), the storage dtype, the number of views per image and
  the augmentation that made them. Training refuses a cache whose tower differs from the model's, naming the fields.

Augmentation: `num_views=0` (default) stores one view per image, the image processor's plain resize. `num_views=N`
stores N views of `RandomResizedCropAndFlip`, drawn in turn from one generator per image seeded by (seed, image),
and training draws one of them per sample. A cached view is fixed: over all epochs the model sees at most N distinct
crops of an image, where training from pixels draws a new crop at every step. Caching trades that variety (and N
times the disk) for the tower's time.

Resumable: each shard is written as soon as it is done (`evaluation.shards.map_shards`), and a rerun with the same
arguments computes only the shards that are missing. Work splits across processes under `accelerate launch`.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open

from ..evaluation.shards import TENSORS, check_resumable, map_shards
from ..processing import Blip2BridgeImageProcessor
from .augmentation import RandomResizedCropAndFlip
from .data import UnreadableSampleError, open_sample_image


logger = logging.getLogger(__name__)

FEATURE_CACHE_FILE = "feature_cache.json"
SHARD_FOLDER = "shards"
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
# What identifies the tower: a cache made with another value of any of these holds other features.
TOWER_FIELDS = ("vision_config", "vision_feature_layer", "image_size", "tower_checksum")
# Bookkeeping of a config dict that does not change the features.
CONFIG_KEYS_NOT_COMPARED = (
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "_attn_implementation_autoset",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "_commit_hash",
)


# ---- what identifies a tower ------------------------------------------------------------------------------------


def tower_checksum(vision_model: torch.nn.Module) -> str:
    """SHA-256 of the tower's weights and buffers (names, shapes, float32 values), as hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_model.state_dict().items()):
        tensor = tensor.detach().cpu()
        values = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def processor_image_size(image_processor: Blip2BridgeImageProcessor | None, model) -> list[int]:
    """[height, width] of the images the tower reads: the processor's size, else `vision_config.image_size`."""
    if image_processor is not None:
        return [image_processor.size["height"], image_processor.size["width"]]
    size = model.config.vision_config.image_size
    return list(size) if isinstance(size, (list, tuple)) else [size, size]


def tower_identity(model, image_processor: Blip2BridgeImageProcessor | None = None) -> dict:
    """The `TOWER_FIELDS` of a blip2-bridge model (either stage) with the processor that feeds it."""
    vision_config = {
        key: value for key, value in model.config.vision_config.to_dict().items() if key not in CONFIG_KEYS_NOT_COMPARED
    }
    return {
        "vision_config": json.loads(json.dumps(vision_config)),  # as feature_cache.json reads back (string keys)
        "vision_feature_layer": model.config.vision_feature_layer,
        "image_size": processor_image_size(image_processor, model),
        "tower_checksum": tower_checksum(model.vision_model),
    }


def tower_differences(cached: dict, model: dict) -> list[str]:
    """'field: cache X, model Y' for each tower field that differs (the differing keys of vision_config)."""
    differences = []
    for field in TOWER_FIELDS:
        if cached.get(field) == model[field]:
            continue
        if field == "vision_config" and isinstance(cached.get(field), dict):
            keys = sorted(key for key in set(cached[field]) | set(model[field])
                          if cached[field].get(key) != model[field].get(key))
            details = ", ".join(f"{key} {cached[field].get(key)!r} vs {model[field].get(key)!r}" for key in keys)
            differences.append(f"vision_config ({details}; cache vs model)")
        else:
            differences.append(f"{field}: cache {cached.get(field)!r}, model {model[field]!r}")
    return differences


# ---- image keys ----------------------------------------------------------------------------------------------------


def image_key(sample: Mapping, image_column: str = "image") -> str:
    """The name an image is cached under: its path as the dataset gives it (`os.path.normpath`ed: "./a.jpg" is
    "a.jpg"), else the sample's webdataset `__key__`, else a `datasets` Image value's path."""
    image = sample.get(image_column)
    if isinstance(image, (str, os.PathLike)):
        return os.path.normpath(image)
    if sample.get("__key__") is not None:
        return str(sample["__key__"])
    if isinstance(image, Mapping) and image.get("path"):
        return os.path.normpath(image["path"])
    raise ValueError(
        f"a sample's image ({type(image).__name__}) has no name to cache it under: expected an image path in column "
        f"{image_column!r} (as the annotation-file and image-folder loaders give) or a webdataset __key__"
    )


def unique_images(dataset, image_column: str = "image") -> list[tuple[str, object]]:
    """(key, image) of each distinct image of `dataset`, in order of first appearance (a COCO image has 5 captions).

    A map-style dataset's image column is read at once (paths); a streamed one (webdataset shards) is iterated and its
    images (bytes) are held in memory until cached: cache a web-scale corpus shard by shard."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "__len__") and image_column in (dataset.column_names or []):
        if "__key__" in dataset.column_names:
            rows = ({image_column: image, "__key__": key} for image, key in zip(dataset[image_column], dataset["__key__"]))
        else:
            rows = ({image_column: image} for image in dataset[image_column])
    else:
        rows = iter(dataset)
    images = {}
    for row in rows:
        images.setdefault(image_key(row, image_column), row.get(image_column))
    return list(images.items())


# ---- writing -------------------------------------------------------------------------------------------------------


def _write_and_release(tensors: dict[str, torch.Tensor], path: Path) -> None:
    TENSORS[1](tensors, path)
    tensors.clear()  # map_shards keeps each shard's result: the features stay on disk only


# `evaluation.shards.TENSORS`, except that a shard's features are not held in memory once written, nor read back on
# resume: a cache may be far larger than memory, and training reads it shard by shard (`FeatureCache`).
SHARD_STORAGE = (TENSORS[0], _write_and_release, lambda path: {})


def view_generator(seed: int, image_index: int) -> torch.Generator:
    """The generator of one image's views: the same crops whatever the shard size, process or resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + image_index) % (2**63))


def cache_features(
    model,
    dataset,
    output_dir: str | Path,
    image_processor: Blip2BridgeImageProcessor | None = None,
    storage_dtype: str = "bfloat16",
    num_views: int = 0,
    min_crop_scale: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    shard_size: int = 1024,
    image_column: str = "image",
    accelerator: Accelerator | None = None,
) -> dict | None:
    """Runs `model`'s frozen vision tower once over every distinct image of `dataset` and writes its features at
    `vision_feature_layer`, before `vision_layernorm`, to `output_dir` (see the module's docstring for the layout).

    model: a blip2-bridge model of either stage, on the device to compute on. dataset: rows with an image path in
    `image_column` (the annotation-file and image-folder loaders), or a webdataset `__key__` with the image.
    image_processor: the model's (its size is the cached image size); default the plain resize to
    `vision_config.image_size`. storage_dtype: bfloat16 (default, half the disk of float32; the features differ by
    bfloat16 rounding, about 3 significant digits), float16 or float32 (exact). num_views: 0 for the processor's plain
    resize, N for N `RandomResizedCropAndFlip` views per image (crop area `min_crop_scale`-1, seeded by `seed`).
    Unreadable images are left out, counted and named in a warning; training then skips their samples.

    Returns a summary on the main process (None on the others): images, cached, left_out, shards, ...
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype is {storage_dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
    if num_views < 0:
        raise ValueError(f"num_views is {num_views}; expected 0 (no augmentation) or a number of augmented views")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; expected at least 1")
    if not model.vision_model_is_frozen:
        raise ValueError("the model's vision tower trains (requires_grad): only a frozen tower's features can be cached")
    accelerator = accelerator or Accelerator()
    output_dir = Path(output_dir)
    if image_processor is None:
        height, width = processor_image_size(None, model)
        image_processor = Blip2BridgeImageProcessor(size={"height": height, "width": width})
    entries = unique_images(dataset, image_column)
    if not entries:
        raise ValueError("the dataset holds no images")
    key_digest = hashlib.sha256("\n".join(key for key, _ in entries).encode()).hexdigest()
    metadata = {
        **tower_identity(model, image_processor),
        "storage_dtype": storage_dtype,
        "num_views": max(num_views, 1),
        "augmentation": None if num_views == 0 else {
            "transform": "RandomResizedCropAndFlip", "scale": [min_crop_scale, 1.0], "seed": seed
        },
        "images": len(entries),
        "image_keys_checksum": key_digest,
        "shard_size": shard_size,
    }
    check_resumable(output_dir, metadata, accelerator, FEATURE_CACHE_FILE, "a feature cache")
    augmentation = None
    if num_views:
        augmentation = RandomResizedCropAndFlip(image_processor, scale=(min_crop_scale, 1.0))
    dtype = getattr(torch, storage_dtype)
    device = next(model.vision_model.parameters()).device
    unreadable = []

    def pixels_of(index: int, key: str, image) -> torch.Tensor:
        image = open_sample_image(image, key)
        try:
            if augmentation is None:
                return image_processor(image, return_tensors="pt")["pixel_values"]
            augmentation.generator = view_generator(seed, index)
            return augmentation([image] * num_views)
        except (ValueError, TypeError, OSError) as error:
            raise UnreadableSampleError(f"{key} could not be processed: {error}", "corrupt image") from error

    def compute(items: range) -> dict[str, torch.Tensor]:
        features = {}
        for start in range(items.start, items.stop, batch_size):
            keys, pixels = [], []
            for index in range(start, min(start + batch_size, items.stop)):
                key, image = entries[index]
                try:
                    pixels.append(pixels_of(index, key, image))
                except UnreadableSampleError as error:
                    logger.warning("feature cache: left out image %s (%s): %s", key, error.reason, error)
                    unreadable.append(key)
                    continue
                keys.append(key)
            if not keys:
                continue
            batch = model.get_vision_features(torch.cat(pixels).to(device))
            batch = batch.reshape(len(keys), max(num_views, 1), *batch.shape[1:]).to("cpu", dtype)
            features.update(zip(keys, batch))
        return features

    # The tower is frozen (checked above), so it computes in eval mode whatever the model's mode (run_vision_tower).
    map_shards(accelerator, output_dir / SHARD_FOLDER, len(entries), shard_size, compute, SHARD_STORAGE)
    if not accelerator.is_main_process:
        return None
    cache = FeatureCache(output_dir)
    summary = {
        "images": len(entries),
        "cached": len(cache),
        "left_out": len(entries) - len(cache),
        "left_out_this_run": unreadable[:20],
        "num_views": metadata["num_views"],
        "storage_dtype": storage_dtype,
        "shards": len(cache.shard_files),
        "output_dir": str(output_dir.resolve()),
    }
    return summary


# ---- reading -------------------------------------------------------------------------------------------------------


class FeatureCache:
    """A cache folder written by `cache_features`, read by image key.

    `features(key)` is the (views, image_length, vision_width) tensor of one image; `check_model(model, processor)`
    refuses a model whose tower is not the one the cache was made with. The shard files are memory-mapped when first
    read (in each DataLoader worker), so a cache larger than memory trains.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        metadata_file = self.directory / FEATURE_CACHE_FILE
        if not metadata_file.is_file():
            raise ValueError(
                f"{self.directory} is not a feature cache (no {FEATURE_CACHE_FILE}); make one with "
                "`blip2-bridge cache-features`"
            )
        self.metadata = json.loads(metadata_file.read_text())
        self.shard_files = sorted((self.directory / SHARD_FOLDER).glob(f"shard-*{TENSORS[0]}"))
        self._shard_of = {}
        for shard_file in self.shard_files:
            with safe_open(str(shard_file), framework="pt") as shard:
                self._shard_of.update(dict.fromkeys(shard.keys(), shard_file))
        self._open_shards = {}

    @property
    def num_views(self) -> int:
        return self.metadata["num_views"]

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def features(self, key: str) -> torch.Tensor:
        """(views, image_length, vision_width) in the storage dtype; a key not cached is an `UnreadableSampleError`
        ("missing file"): its image was unreadable when the cache was made, or is not in the data it was made from."""
        shard_file = self._shard_of.get(key)
        if shard_file is None:
            raise UnreadableSampleError(
                f"image {key} is not in the feature cache {self.directory} (unreadable when the cache was made, or "
                "not in the data it was made from)",
                "missing file",
            )
        shard = self._open_shards.get(shard_file)
        if shard is None:
            shard = self._open_shards[shard_file] = safe_open(str(shard_file), framework="pt")
        return shard.get_tensor(key)

    def check_model(self, model, image_processor: Blip2BridgeImageProcessor | None = None) -> None:
        """Refuses a model (with the processor that would feed its tower) whose tower is not the cache's."""
        differences = tower_differences(self.metadata, tower_identity(model, image_processor))
        if differences:
            raise ValueError(
                f"the feature cache {self.directory} was made with another vision tower than the model's: "
                f"{'; '.join(differences)}. Make a cache with this model (`blip2-bridge cache-features`)"
            )
        if not model.vision_model_is_frozen:
            raise ValueError("the model's vision tower trains (requires_grad): cached features would be stale")

    def __getstate__(self):
        # Open shard handles do not pickle (DataLoader workers started by spawn): each worker opens its own.
        return {**self.__dict__, "_open_shards": {}}

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.directory)!r}, {len(self)} images, {self.num_views} view(s), "
                f"{self.metadata['storage_dtype']})")


__all__ = ["FeatureCache", "cache_features", "image_key", "tower_checksum", "tower_identity"]
