"""Image-caption datasets from the layouts BLIP-2's data comes in, as `datasets` datasets of {image, caption, ...}.

Map-style loaders (COCO-style and LAVIS-style JSON, image folders) hold one row per caption with the image's path, not
its pixels: images are opened when a batch is collated (or by `DecodeImages`), so an unreadable file is skipped and
counted there. `load_webdataset` streams tar shards: memory stays flat whatever the number of samples, which is how a
web-scale corpus (BLIP-2 pre-trains on 129M images) is read.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets

from .data import SkippedSamples, UnreadableSampleError, open_sample_image, sample_name


# The file extensions PIL opens that image folders and tar shards use in practice.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_coco_captions(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> datasets.Dataset:
    """
    A COCO-style captions file (`{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"},
    ...]}`, as COCO's captions_train2017.json) as one row per annotation: `image` (the path under `image_root`),
    `caption` and `image_id` (COCO's integer id, so that ITC counts an image's five captions as positives).
    """
    content = read_json(annotation_file)
    if not isinstance(content, dict) or "images" not in content or "annotations" not in content:
        raise ValueError(
            f"{annotation_file} is not a COCO-style captions file; expected a JSON object with 'images' and "
            "'annotations' lists"
        )
    file_names = {image["id"]: image["file_name"] for image in content["images"]}
    rows = []
    for index, annotation in enumerate(content["annotations"]):
        if annotation.get("image_id") not in file_names:
            raise ValueError(
                f"{annotation_file}: annotations[{index}] has image_id {annotation.get('image_id')!r}, which no entry "
                "of 'images' has"
            )
        image_id = annotation["image_id"]
        rows.append(
            {
                "image": os.path.join(image_root, file_names[image_id]),
                "caption": annotation.get("caption"),
                "image_id": image_id,
            }
        )
    return dataset_from_rows(rows, annotation_file)


def load_lavis_annotations(
    annotation_files: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike
) -> datasets.Dataset:
    """
    LAVIS-style annotation files (a JSON list of `{"image": relative path, "caption": str or list of str,
    "image_id": ...}`, as LAVIS's coco_karpathy_train.json) as one row per caption. `image_id`s (strings such as
    "coco_391895", or the image path where there is none) become consecutive integers in order of first appearance,
    as LAVIS's caption datasets number them.
    """
    if isinstance(annotation_files, (str, os.PathLike)):
        annotation_files = [annotation_files]
    image_ids: dict = {}
    rows = []
    for annotation_file in annotation_files:
        content = read_json(annotation_file)
        if not isinstance(content, list):
            raise ValueError(
                f"{annotation_file} holds a JSON {type(content).__name__}; expected a list of "
                '{"image": ..., "caption": ...} entries (LAVIS style)'
            )
        for index, annotation in enumerate(content):
            if not isinstance(annotation, dict) or "image" not in annotation:
                raise ValueError(f"{annotation_file}: entry {index} is {annotation!r}; expected an object with 'image'")
            key = annotation.get("image_id", annotation["image"])
            image_id = image_ids.setdefault(key, len(image_ids))
            captions = annotation.get("caption")
            for caption in captions if isinstance(captions, list) else [captions]:
                rows.append(
                    {"image": os.path.join(image_root, annotation["image"]), "caption": caption, "image_id": image_id}
                )
    return dataset_from_rows(rows, annotation_files[0] if annotation_files else "annotation_files")


def load_image_folder(folder: str | os.PathLike) -> datasets.Dataset:
    """
    A folder of images with their captions, in either layout:

    - `metadata.jsonl` files (as `datasets`' imagefolder): one JSON object per line with `file_name` (relative to the
      metadata file's folder) and `caption` or `text`;
    - otherwise every image file with a same-name `.txt` file next to it holding its caption (`dog.jpg` + `dog.txt`).
      An image without its `.txt` keeps an empty caption and is skipped (and counted) when collated.

    Rows: `image` (path), `caption`, `image_id` (consecutive integers, one per image).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist or is not a folder")
    rows = []
    metadata_files = sorted(folder.rglob("metadata.jsonl"))
    if metadata_files:
        for metadata_file in metadata_files:
            for line_number, line in enumerate(metadata_file.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                entry = json.loads(line)
                if "file_name" not in entry:
                    raise ValueError(f"{metadata_file}:{line_number} has no 'file_name'; got keys {sorted(entry)}")
                caption = entry.get("caption", entry.get("text"))
                rows.append({"image": str(metadata_file.parent / entry["file_name"]), "caption": caption})
    else:
        for image_file in sorted(folder.rglob("*")):
            if image_file.suffix.lower() in IMAGE_EXTENSIONS:
                caption_file = image_file.with_suffix(".txt")
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
                rows.append({"image": str(image_file), "caption": caption})
    image_ids: dict = {}
    for row in rows:
        row["image_id"] = image_ids.setdefault(row["image"], len(image_ids))
    return dataset_from_rows(rows, folder)


def load_webdataset(
    data_files: str | Sequence[str],
    caption_column: str = "txt",
    image_column: str | None = None,
) -> datasets.IterableDataset:
    """
    Streams webdataset tar shards (`000.jpg`, `000.txt`, `001.jpg`, ... per tar file; local paths or globs) through
    `datasets.load_dataset("webdataset", streaming=True)`: samples are read shard by shard and never held together.
    Columns: `image` (left undecoded, `{"bytes", "path"}`, so that a corrupt image is skipped when collated instead of
    stopping the stream), `caption` (the `caption_column` file's text) and `__key__` (the sample's name in its shard).

    image_column: the image file's extension in the shards; default the first image column `datasets` finds.
    """
    dataset = datasets.load_dataset("webdataset", data_files=data_files, split="train", streaming=True)
    features = dataset.features or {}
    if image_column is None:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not image_columns:
            raise ValueError(f"the shards {data_files} hold no image files; found the columns {sorted(features)}")
        image_column = image_columns[0]
    for column in (image_column, caption_column):
        if column not in features:
            raise ValueError(f"the shards {data_files} have no {column!r} files; found the columns {sorted(features)}")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.rename_columns({image_column: "image", caption_column: "caption"})
    return dataset.select_columns(["image", "caption", "__key__"])


class DecodeImages:
    """
    A batched transform that opens the `image_column` of every row and drops the rows whose image is unreadable,
    counting them in `skipped`: for `Dataset.with_transform` (map-style) and `IterableDataset.map(...,
    batched=True)` (streaming), when the images should be decoded before the collator.
    """

    def __init__(self, image_column: str = "image", skipped: SkippedSamples | None = None):
        self.image_column = image_column
        self.skipped = skipped if skipped is not None else SkippedSamples()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        columns = list(batch)
        size = len(batch[self.image_column])
        kept = {column: [] for column in columns}
        for index in range(size):
            row = {column: batch[column][index] for column in columns}
            name = sample_name(row, index, self.image_column)
            try:
                row[self.image_column] = open_sample_image(row[self.image_column], name)
            except UnreadableSampleError as error:
                self.skipped.skip(name, error)
                continue
            for column in columns:
                kept[column].append(row[column])
        return kept


def read_json(path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise ValueError(f"annotation file {path} does not exist") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error


def dataset_from_rows(rows: list[dict], source) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"{source} holds no image-caption pairs")
    # Captions may be missing or not strings in some rows; strings (or None) keep one Arrow type, and the collator
    # skips and counts the rows without a usable caption.
    for row in rows:
        if row["caption"] is not None and not isinstance(row["caption"], str):
            row["caption"] = None
    return datasets.Dataset.from_list(rows)


__all__ = ["DecodeImages", "load_coco_captions", "load_image_folder", "load_lavis_annotations", "load_webdataset"]
