"""Reliability of the data path: bad annotation entries refused naming file and entry, shard patterns checked at
load, a truncated shard named and passed over, empty caption lists counted, and a run that survives an unreadable
first batch."""

import io
import json
import logging
import tarfile

import numpy as np
import PIL.Image
import pytest

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from modeling_blip2.training.collators import ImageCaptionCollator
from modeling_blip2.training.data import open_sample_image
from modeling_blip2.training.datasets import (
    load_annotation_file,
    load_coco_captions,
    load_image_folder,
    load_lavis_annotations,
    load_webdataset,
)
from tests.helpers import make_bert_tokenizer


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_json(path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


# --- annotation files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}], "annotations": []},
            r"coco\.json: images\[1\] is \{'id': 2\}; expected an object with 'id' \(an integer or string\) and "
            r"'file_name'",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": [1, 2], "caption": "x"}]},
            r"coco\.json: annotations\[0\] is \{'image_id': \[1, 2\], 'caption': 'x'\}; expected an object with "
            r"'image_id'",
        ),
        (
            {"images": [{"id": 1, "file_name": None}], "annotations": []},
            r"coco\.json: images\[0\] is \{'id': 1, 'file_name': None\}",
        ),
    ],
)
def test_coco_entry_without_usable_id_or_file_name_is_refused_naming_file_and_entry(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        load_coco_captions(write_json(tmp_path / "coco.json", content), tmp_path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image": None, "caption": "x"}, r"lavis\.json: entry 1 is \{'image': None, 'caption': 'x'\}; expected"),
        ({"caption": "x"}, r"lavis\.json: entry 1 is \{'caption': 'x'\}; expected an object with 'image'"),
        ({"image": "b.jpg", "image_id": [1, 2]}, r"lavis\.json: entry 1 has image_id \[1, 2\]; expected an integer"),
    ],
)
def test_lavis_entry_without_usable_image_or_id_is_refused_naming_file_and_entry(tmp_path, entry, message):
    path = write_json(tmp_path / "lavis.json", [{"image": "a.jpg", "caption": "a dog"}, entry])
    with pytest.raises(ValueError, match=message):
        load_lavis_annotations(path, tmp_path)


def test_empty_caption_list_is_kept_as_one_row_the_collator_counts(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(1))
    path = write_json(tmp_path / "lavis.json", [{"image": "a.jpg", "caption": []}, {"image": "b.jpg", "caption": "a"}])

    dataset = load_lavis_annotations(path, tmp_path)
    assert dataset["caption"] == [None, "a"]
    assert dataset["image_id"] == [0, 1]

    collator = ImageCaptionCollator(Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_bert_tokenizer()))
    batch = collator(list(dataset))
    assert len(batch["input_ids"]) == 1
    assert collator.skipped.counts["bad text"] == 1


def test_coco_file_starting_with_whitespace_or_bom_is_read_as_coco(tmp_path):
    content = {"images": [{"id": 7, "file_name": "a.jpg"}], "annotations": [{"image_id": 7, "caption": "a dog"}]}
    path = tmp_path / "coco.json"
    path.write_text("\n  " + json.dumps(content))

    dataset = load_annotation_file(path, tmp_path)
    assert dataset.to_list() == [{"image": str(tmp_path / "a.jpg"), "caption": "a dog", "image_id": 7}]
    path.write_text(json.dumps(content), encoding="utf-8-sig")  # with a byte-order mark
    assert load_annotation_file(path, tmp_path)["image_id"] == [7]
    lavis = write_json(tmp_path / "lavis.json", [{"image": "a.jpg", "caption": "a cat"}])
    assert load_annotation_file(lavis, tmp_path)["caption"] == ["a cat"]


def test_metadata_line_without_file_name_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg", "caption": "x"}\n{"file_name": null}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2 is \{'file_name': None\}; expected an object with"):
        load_image_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg"\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1 is not valid JSON"):
        load_image_folder(tmp_path)


# --- shards --------------------------------------------------------------------------------------------------------


def shard_bytes(keys) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, key in enumerate(keys):
            for extension, content in (("jpg", jpeg_bytes(index)), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_shard_pattern_matching_nothing_is_refused_naming_it(tmp_path):
    (tmp_path / "shard-000.tar").write_bytes(shard_bytes(["a"]))
    pattern = str(tmp_path / "train-*.tar")
    with pytest.raises(ValueError, match=r"the shard pattern '.*train-\*\.tar' matches no file"):
        load_webdataset([str(tmp_path / "shard-000.tar"), pattern])
    with pytest.raises(ValueError, match=r"shard file .*shard-001\.tar does not exist"):
        load_webdataset(str(tmp_path / "shard-001.tar"))
    assert [row["__key__"] for row in load_webdataset(str(tmp_path / "shard-*.tar"))] == ["a"]


def test_truncated_shard_is_named_and_the_stream_goes_on(tmp_path, caplog):
    (tmp_path / "shard-000.tar").write_bytes(shard_bytes(["a0", "a1"]))
    whole = shard_bytes(["b0", "b1", "b2"])
    # Each sample takes 2560 bytes (header and image, header and caption); cut inside b2's image.
    (tmp_path / "shard-001.tar").write_bytes(whole[: 2 * 2560 + 512 + 100])
    (tmp_path / "shard-002.tar").write_bytes(shard_bytes(["c0"]))

    with caplog.at_level(logging.WARNING):
        rows = list(load_webdataset(str(tmp_path / "shard-*.tar")))

    # b2, the sample being read when the shard breaks, is lost with the rest of the shard.
    assert [row["__key__"] for row in rows] == ["a0", "a1", "b0", "b1", "c0"]
    assert [row["caption"] for row in rows] == ["caption a0", "caption a1", "caption b0", "caption b1", "caption c0"]
    assert rows[3]["image"] == {"bytes": jpeg_bytes(1), "path": "b1.jpg"}
    assert "shard-001.tar is truncated or corrupt after 2 samples" in caplog.text
    assert "going on with the next shard" in caplog.text


def test_shards_without_images_are_refused_at_load(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "text-only.tar").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"hold no image files .* in their first samples: \['a'\]"):
        load_webdataset(str(tmp_path / "text-only.tar"))


def test_shard_cut_at_a_header_is_named_too(tmp_path, caplog):
    # tarfile itself ends a file cut inside a member header silently, as if the shard were complete.
    whole = shard_bytes(["b0", "b1"])
    (tmp_path / "shard-000.tar").write_bytes(whole[: 2560 + 300])  # cut inside b1's image header

    with caplog.at_level(logging.WARNING):
        rows = list(load_webdataset(str(tmp_path / "shard-000.tar")))

    assert rows == []  # b0 is complete only once the next sample's header is read
    assert "shard-000.tar is truncated or corrupt after 0 samples (the file ends without the end-of-archive" in (
        caplog.text
    )


def test_shards_of_png_images_compressed_are_read_and_split_among_dataloader_workers(tmp_path):
    import gzip

    import torch

    png = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), (255, 0, 0)).save(png, format="PNG")
    for shard, keys in (("p-0.tar", ["p0", "p1"]), ("p-1.tar.gz", ["q0"])):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key in keys:
                for extension, content in (("png", png.getvalue()), ("txt", key.encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        data = buffer.getvalue()
        (tmp_path / shard).write_bytes(gzip.compress(data) if shard.endswith(".gz") else data)

    dataset = load_webdataset(str(tmp_path / "p-*"))
    assert dataset.n_shards == 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    rows = sorted(loader, key=lambda row: row["__key__"])
    assert [(row["__key__"], row["caption"], row["image"]["path"]) for row in rows] == [
        ("p0", "p0", "p0.png"),
        ("p1", "p1", "p1.png"),
        ("q0", "q0", "q0.png"),
    ]
    assert open_sample_image(rows[2]["image"]).getpixel((0, 0)) == (255, 0, 0)
