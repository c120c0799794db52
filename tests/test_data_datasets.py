"""Loaders for COCO-style and LAVIS-style JSON, image folders and webdataset shards; unreadable samples skipped and
counted exactly in map-style datasets (also across DataLoader workers) and in streaming ones."""

import json

import PIL.Image
import pytest
import torch

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from modeling_blip2.training.collators import ImageCaptionCollator
from modeling_blip2.training.data import SkippedSamples
from modeling_blip2.training.datasets import (
    DecodeImages,
    load_coco_captions,
    load_image_folder,
    load_lavis_annotations,
    load_webdataset,
)
from tests.data_files import jpeg_bytes, write_shards
from tests.helpers import make_bert_tokenizer


def write_coco_folder(root, broken: bool = True):
    """Three images with five captions; with `broken`, image 2 is a truncated JPEG and image 3's file is missing."""
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(jpeg_bytes(0))
    (root / "images" / "b.jpg").write_bytes(jpeg_bytes(1)[:200] if broken else jpeg_bytes(1))
    if not broken:
        (root / "images" / "c.jpg").write_bytes(jpeg_bytes(2))
    annotations = {
        "images": [
            {"id": 11, "file_name": "a.jpg"},
            {"id": 22, "file_name": "b.jpg"},
            {"id": 33, "file_name": "c.jpg"},
        ],
        "annotations": [
            {"image_id": 11, "id": 1, "caption": "A dog runs."},
            {"image_id": 22, "id": 2, "caption": "A cat sleeps"},
            {"image_id": 11, "id": 3, "caption": "a brown dog"},
            {"image_id": 33, "id": 4, "caption": "a red car"},
            {"image_id": 11, "id": 5, "caption": "dog on grass"},
        ],
    }
    annotation_file = root / "captions.json"
    annotation_file.write_text(json.dumps(annotations))
    return annotation_file


@pytest.fixture(scope="module")
def processor():
    return Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": 14, "width": 14}), make_bert_tokenizer())


def test_coco_style_json_gives_one_row_per_caption(tmp_path):
    dataset = load_coco_captions(write_coco_folder(tmp_path), tmp_path / "images")
    assert dataset["image"] == [
        str(tmp_path / "images" / name) for name in ("a.jpg", "b.jpg", "a.jpg", "c.jpg", "a.jpg")
    ]
    assert dataset["caption"] == ["A dog runs.", "A cat sleeps", "a brown dog", "a red car", "dog on grass"]
    assert dataset["image_id"] == [11, 22, 11, 33, 11]


def test_map_style_skips_are_counted_across_dataloader_workers(tmp_path, processor):
    dataset = load_coco_captions(write_coco_folder(tmp_path), tmp_path / "images")
    collator = ImageCaptionCollator(processor, image_id_column="image_id")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=2)
    batches = list(loader)
    # batches of rows (0, 1), (2, 3), (4): row 1 is truncated, row 3 missing
    assert [batch["image_ids"].tolist() for batch in batches] == [[11], [11], [11]]
    assert collator.skipped.counts == {"missing file": 1, "corrupt image": 1, "empty image": 0, "bad text": 0}
    assert collator.skipped.used == 3


def test_with_transform_decodes_and_drops_unreadable_rows(tmp_path):
    dataset = load_coco_captions(write_coco_folder(tmp_path), tmp_path / "images")
    decode = DecodeImages()
    decoded = dataset.with_transform(decode)
    rows = decoded[0:5]
    assert rows["caption"] == ["A dog runs.", "a brown dog", "dog on grass"]
    assert all(isinstance(image, PIL.Image.Image) and image.size == (20, 16) for image in rows["image"])
    assert decode.skipped.counts == {"missing file": 1, "corrupt image": 1, "empty image": 0, "bad text": 0}


def test_lavis_style_json_flattens_caption_lists_and_numbers_image_ids(tmp_path):
    annotations = [
        {"image": "val/1.jpg", "caption": ["first caption", "second caption"], "image_id": "coco_9"},
        {"image": "val/2.jpg", "caption": "third caption", "image_id": "coco_4"},
        {"image": "val/1.jpg", "caption": "fourth caption", "image_id": "coco_9"},
        {"image": "val/3.jpg", "caption": "no id"},
    ]
    first, second = tmp_path / "train.json", tmp_path / "more.json"
    first.write_text(json.dumps(annotations[:3]))
    second.write_text(json.dumps(annotations[3:]))
    dataset = load_lavis_annotations([first, second], tmp_path)
    assert dataset["caption"] == ["first caption", "second caption", "third caption", "fourth caption", "no id"]
    assert dataset["image_id"] == [0, 0, 1, 0, 2]
    assert dataset["image"][2] == str(tmp_path / "val/2.jpg")


def test_image_folder_with_text_files_and_with_metadata_jsonl(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name, caption in (("dog", "a dog\n"), ("cat", "a cat")):
        (pairs / f"{name}.jpg").write_bytes(jpeg_bytes(0))
        (pairs / f"{name}.txt").write_text(caption)
    (pairs / "lonely.png").write_bytes(jpeg_bytes(1))  # no caption file
    dataset = load_image_folder(pairs)
    assert dataset["image"] == [str(pairs / name) for name in ("cat.jpg", "dog.jpg", "lonely.png")]
    assert dataset["caption"] == ["a cat", "a dog", ""]
    assert dataset["image_id"] == [0, 1, 2]

    with_metadata = tmp_path / "metadata"
    (with_metadata / "sub").mkdir(parents=True)
    (with_metadata / "sub" / "x.jpg").write_bytes(jpeg_bytes(2))
    (with_metadata / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/x.jpg", "text": "an x"})
        + "\n"
        + json.dumps({"file_name": "y.jpg", "caption": "a y"})
        + "\n"
    )
    dataset = load_image_folder(with_metadata)
    assert dataset["image"] == [str(with_metadata / "sub" / "x.jpg"), str(with_metadata / "y.jpg")]
    assert dataset["caption"] == ["an x", "a y"]


def test_streaming_shards_skip_unreadable_samples_in_the_collator(tmp_path, processor, caplog):
    dataset = load_webdataset(write_shards(tmp_path))
    assert isinstance(dataset, __import__("datasets").IterableDataset)
    collator = ImageCaptionCollator(processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collator)
    batches = list(loader)
    assert [len(batch["input_ids"]) for batch in batches] == [2, 3]
    assert collator.skipped.counts == {"missing file": 0, "corrupt image": 2, "empty image": 1, "bad text": 0}
    assert collator.skipped.used == 5
    assert "skipped sample s001.jpg (corrupt image)" in caplog.text
    assert "skipped sample s003.jpg (empty image)" in caplog.text
    expected = processor(text=["a dog runs", "a cat"])["input_ids"]
    assert torch.equal(batches[0]["input_ids"], expected)


def test_streaming_shards_decoded_by_map_drop_unreadable_rows(tmp_path):
    skipped = SkippedSamples()
    dataset = load_webdataset(write_shards(tmp_path)).map(DecodeImages(skipped=skipped), batched=True, batch_size=3)
    rows = list(dataset)
    assert [row["caption"] for row in rows] == ["a dog runs", "a cat", "cmyk", "a bird", "a car"]
    assert [row["__key__"] for row in rows] == ["s000", "s002", "s101", "s102", "s103"]
    assert rows[2]["image"].mode == "CMYK"  # kept: the image processor converts it
    assert skipped.counts == {"missing file": 0, "corrupt image": 2, "empty image": 1, "bad text": 0}


def test_bad_annotation_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    lavis_file = tmp_path / "lavis.json"
    lavis_file.write_text(json.dumps([{"image": "x.jpg", "caption": "x"}]))
    with pytest.raises(ValueError, match="not a COCO-style captions file"):
        load_coco_captions(lavis_file, tmp_path)
    coco_file = tmp_path / "coco.json"
    coco_file.write_text(json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}))
    with pytest.raises(ValueError, match="annotations\\[0\\] has image_id 5"):
        load_coco_captions(coco_file, tmp_path)
    with pytest.raises(ValueError, match="is a COCO-style captions file.*read it with load_coco_captions"):
        load_lavis_annotations(coco_file, tmp_path)
