"""Image-caption datasets from the layouts BLIP-2's data comes in, as `datasets` datasets of {image, caption, ...}.

Map-style loaders (COCO-style and LAVIS-style JSON, image folders) hold one row per caption with the image's path, not
its pixels: images are opened when a batch is collated (or by `DecodeImages`), so an unreadable file is skipped and
counted there. `load_webdataset` streams tar shards: memory stays flat whatever the number of samples, which is how a
web-scale corpus (BLIP-2 pre-trains on 129M images) is read.
"""

import glob
import itertools
import json
import logging
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
import fsspec

from .data import SkippedSamples, UnreadableSampleError, open_sample_image, sample_name
from .instructions import INSTRUCTION_TEMPLATES, TASK_COLUMNS


logger = logging.getLogger(__name__)

# The file extensions PIL opens that image folders and tar shards use in practice.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_coco_captions(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> datasets.Dataset:
    """
    A COCO-style captions file (`{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"},
    ...]}`, as COCO's captions_train2017.json) as one row per annotation: `image` (the path under `image_root`),
    `caption` and `image_id` (COCO's integer id, so that ITC counts an image's five captions as positives).
    An entry without a usable `id`, `file_name` or `image_id` is refused here, naming the file and the entry.
    """
    return dataset_from_rows(coco_rows(read_json(annotation_file), annotation_file, image_root), annotation_file)


def load_lavis_annotations(
    annotation_files: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike
) -> datasets.Dataset:
    """
    LAVIS-style annotation files (a JSON list of `{"image": relative path, "caption": str or list of str,
    "image_id": ...}`, as LAVIS's coco_karpathy_train.json) as one row per caption. `image_id`s (strings such as
    "coco_391895", or the image path where there is none) become consecutive integers in order of first appearance,
    as LAVIS's caption datasets number them. An entry whose caption list is empty keeps one row without a caption,
    which the collators skip and count; an entry without a usable `image` or `image_id` is refused here, naming it.
    """
    if isinstance(annotation_files, (str, os.PathLike)):
        annotation_files = [annotation_files]
    image_ids: dict = {}
    rows = []
    for annotation_file in annotation_files:
        rows += lavis_rows(read_json(annotation_file), annotation_file, image_root, image_ids)
    return dataset_from_rows(rows, annotation_files[0] if annotation_files else "annotation_files")


def load_annotation_file(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> datasets.Dataset:
    """One annotation file, COCO-style (a JSON object) or LAVIS-style (a JSON list), told apart by its content."""
    content = read_json(annotation_file)
    if isinstance(content, dict):
        rows = coco_rows(content, annotation_file, image_root)
    else:
        rows = lavis_rows(content, annotation_file, image_root, {})
    return dataset_from_rows(rows, annotation_file)


def coco_rows(content, annotation_file, image_root) -> list[dict]:
    if not isinstance(content, dict) or "images" not in content or "annotations" not in content:
        raise ValueError(
            f"{annotation_file} is not a COCO-style captions file; expected a JSON object with 'images' and "
            "'annotations' lists"
        )
    file_names = {}
    for index, image in enumerate(content["images"]):
        if not (isinstance(image, dict) and is_id(image.get("id")) and isinstance(image.get("file_name"), str)):
            raise ValueError(
                f"{annotation_file}: images[{index}] is {shorten(image)}; expected an object with 'id' (an integer or "
                "string) and 'file_name' (a string)"
            )
        file_names[image["id"]] = image["file_name"]
    rows = []
    for index, annotation in enumerate(content["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if not is_id(image_id) or image_id not in file_names:
            raise ValueError(
                f"{annotation_file}: annotations[{index}] has image_id {image_id!r}, which no entry of 'images' has"
                if is_id(image_id)
                else f"{annotation_file}: annotations[{index}] is {shorten(annotation)}; expected an object with "
                "'image_id' (an integer or string) and 'caption'"
            )
        rows.append(
            {
                "image": os.path.join(image_root, file_names[image_id]),
                "caption": annotation.get("caption"),
                "image_id": image_id,
            }
        )
    return rows


def lavis_rows(content, annotation_file, image_root, image_ids: dict) -> list[dict]:
    """The rows of one LAVIS-style file; `image_ids` numbers the images across files."""
    if isinstance(content, dict) and "images" in content and "annotations" in content:
        raise ValueError(
            f"{annotation_file} is a COCO-style captions file (an object with 'images' and 'annotations'); read it "
            "with load_coco_captions or load_annotation_file"
        )
    if not isinstance(content, list):
        raise ValueError(
            f"{annotation_file} holds a JSON {type(content).__name__}; expected a list of "
            '{"image": ..., "caption": ...} entries (LAVIS style)'
        )
    rows = []
    for index, annotation in enumerate(content):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("image"), str):
            raise ValueError(
                f"{annotation_file}: entry {index} is {shorten(annotation)}; expected an object with 'image' (a "
                "path relative to the image root)"
            )
        key = annotation.get("image_id", annotation["image"])
        if not is_id(key):
            raise ValueError(
                f"{annotation_file}: entry {index} has image_id {shorten(key)}; expected an integer or a string"
            )
        image_id = image_ids.setdefault(key, len(image_ids))
        captions = annotation.get("caption")
        # An empty list keeps one caption-less row, so that the collator counts the entry instead of losing it.
        for caption in (captions or [None]) if isinstance(captions, list) else [captions]:
            image = os.path.join(image_root, annotation["image"])
            rows.append({"image": image, "caption": caption, "image_id": image_id})
    return rows


def is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def shorten(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{metadata_file}:{line_number} is not valid JSON: {error}") from error
                if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                    raise ValueError(
                        f"{metadata_file}:{line_number} is {shorten(entry)}; expected an object with 'file_name' (a "
                        "string)"
                    )
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
    Streams webdataset tar shards (`000.jpg`, `000.txt`, `001.jpg`, ... per tar file, optionally compressed; local
    paths or globs, or fsspec URLs) as a `datasets.IterableDataset`: samples are read shard by shard and never held
    together, and DataLoader workers and processes each read their own shards. Columns: `image` (left undecoded,
    `{"bytes", "path"}`, so that a corrupt image is skipped when collated instead of stopping the stream), `caption`
    (the `caption_column` file's text) and `__key__` (the sample's name in its shard).

    image_column: the image file's extension in the shards; default each sample's first image file.

    A pattern that matches no file is refused here, naming it. A shard that turns out truncated or corrupt while
    streaming ends early with a warning naming it and the samples read from it; the stream goes on with the next shard.
    """
    patterns = [str(data_files)] if isinstance(data_files, (str, os.PathLike)) else [str(file) for file in data_files]
    shards = resolve_shards(patterns)
    first_samples = list(itertools.islice(shard_samples(shards, caption_column, image_column, warn=False), 5))
    if first_samples and all(sample["image"] is None for sample in first_samples):
        raise ValueError(
            f"the shards {patterns} hold no image files"
            + (f" named *.{image_column}" if image_column else f" ({', '.join(IMAGE_EXTENSIONS)})")
            + f" in their first samples: {[sample['__key__'] for sample in first_samples]}"
        )
    if first_samples and all(sample["caption"] is None for sample in first_samples):
        raise ValueError(
            f"the shards {patterns} have no {caption_column!r} files in their first samples: "
            f"{[sample['__key__'] for sample in first_samples]}"
        )
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "caption": datasets.Value("string"),
            "__key__": datasets.Value("string"),
        }
    )
    return datasets.IterableDataset.from_generator(
        shard_samples,
        features=features,
        gen_kwargs={"shards": shards, "caption_column": caption_column, "image_column": image_column},
    )


def resolve_shards(patterns: list[str]) -> list[str]:
    """The shard files the patterns name, in order; a local pattern matching no file is an error naming it."""
    shards = []
    for pattern in patterns:
        if "://" in pattern:  # remote: fsspec opens it when streamed
            shards.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ValueError(f"the shard pattern {pattern!r} matches no file")
            shards += matches
        elif not os.path.isfile(pattern):
            raise ValueError(f"shard file {pattern} does not exist")
        else:
            shards.append(pattern)
    if not shards:
        raise ValueError("no shard files given")
    return shards


def shard_samples(shards: list[str], caption_column: str, image_column: str | None, warn: bool = True):
    """The samples of the shards in order, as rows; a truncated or corrupt shard ends with a warning naming it."""
    for shard in shards:
        count = 0
        try:
            with fsspec.open(shard, "rb") as file, tarfile.open(fileobj=file, mode="r|*", tarinfo=ShardMember) as tar:
                for key, files in tar_samples(tar):
                    yield webdataset_row(key, files, caption_column, image_column)
                    count += 1
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            if warn:
                logger.warning(
                    "shard %s is truncated or corrupt after %d samples (%s); going on with the next shard",
                    shard,
                    count,
                    error,
                )


class ShardMember(tarfile.TarInfo):
    """A tar member header that refuses to be cut short: `tarfile` ends a file cut inside a header silently."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) < tarfile.BLOCKSIZE:  # a complete tar ends with zero blocks, never with a short or missing one
            raise tarfile.ReadError("the file ends without the end-of-archive blocks")
        return super().frombuf(buf, encoding, errors)


def tar_samples(tar: tarfile.TarFile):
    """(key, {extension: bytes}) per sample: consecutive files sharing the name up to the first dot, as webdataset."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if not dot:
            continue
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key and files:
            yield key, files
            files = {}
        key = member_key
        files[extension] = tar.extractfile(member).read()
    if files:
        yield key, files


def webdataset_row(key: str, files: dict[str, bytes], caption_column: str, image_column: str | None) -> dict:
    if image_column is None:
        image_column = next((ext for ext in files if f".{ext.lower()}" in IMAGE_EXTENSIONS), None)
    image = files.get(image_column) if image_column else None
    caption = files.get(caption_column)
    try:
        caption = caption.decode("utf-8") if caption is not None else None
    except UnicodeDecodeError:
        caption = None  # the collator skips and counts it as bad text
    return {
        "image": {"bytes": image, "path": f"{key}.{image_column}"} if image is not None else None,
        "caption": caption,
        "__key__": key,
    }


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


def load_instruction_annotations(
    annotation_file: str | os.PathLike, image_root: str | os.PathLike, task: str
) -> datasets.Dataset:
    """
    A task dataset for instruction tuning (`InstructionTuningCollator`, `mix_datasets`), with a `task` column:

    - "caption": a COCO- or LAVIS-style captions file, read by `load_annotation_file`;
    - "vqa", "vqg", "ocr_vqa", "classification": a JSON list (or a .jsonl file, one object per line) of objects with
      `image` (a path under `image_root`) and the task's fields (`training.instructions.TASK_COLUMNS`): `question` and
      `answer` (a string, or a list of answers, as LAVIS's VQAv2 files, of which the most frequent is kept, the first
      of equals), `ocr_tokens` (a string or a list of strings, joined with ", "), `label` (any value, as a string).
      A missing field keeps its row as None, which the collator skips and counts ("bad text").
    """
    if task not in INSTRUCTION_TEMPLATES:
        raise ValueError(f"task {task!r}; expected one of {sorted(INSTRUCTION_TEMPLATES)}")
    if task == "caption":
        dataset = load_annotation_file(annotation_file, image_root)
        return dataset.add_column("task", [task] * len(dataset))
    if str(annotation_file).endswith(".jsonl"):
        entries = []
        for number, line in enumerate(Path(annotation_file).read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{annotation_file}:{number} is not valid JSON: {error}") from error
    else:
        entries = read_json(annotation_file)
    if not isinstance(entries, list):
        raise ValueError(f"{annotation_file} holds a JSON {type(entries).__name__}; expected a list of objects")
    rows = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(
                f"{annotation_file}: entry {index} is {shorten(entry)}; expected an object with 'image' (a path)"
            )
        row = {"image": os.path.join(image_root, entry["image"]), "task": task}
        for column in TASK_COLUMNS[task]:
            value = entry.get(column)
            if column == "answer" and isinstance(value, list):
                value = Counter(value).most_common(1)[0][0] if value else None
            elif column == "ocr_tokens" and isinstance(value, list):
                value = ", ".join(str(token) for token in value)
            elif column == "label" and value is not None:
                value = str(value)
            row[column] = value if isinstance(value, str) else None
        rows.append(row)
    if not rows:
        raise ValueError(f"{annotation_file} holds no entries")
    return datasets.Dataset.from_list(rows)


def read_json(path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8-sig") as file:  # also reads files saved with a byte-order mark
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


__all__ = [
    "DecodeImages",
    "load_annotation_file",
    "load_coco_captions",
    "load_image_folder",
    "load_instruction_annotations",
    "load_lavis_annotations",
    "load_webdataset",
]
