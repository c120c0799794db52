"""Files the tests read as a user's would, generated: images, JSON, COCO-style folders, webdataset shards, the benchmark
datasets in LAVIS's layouts and a tiny saved stage-1 model."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeModel
from tests.helpers import CAPTIONS, make_bert_tokenizer
from tests.tiny_models import tiny_config


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32 + seed, 40, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def write_json(path: Path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


def jpeg_bytes(seed: int, size=(20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_coco_folder(root, image_dir: str = "images", annotation_file: str = "captions.json"):
    """Five images in `root/image_dir`, eight captions in `root/annotation_file`; the last image is a truncated JPEG
    (one caption)."""
    (root / image_dir).mkdir(parents=True)
    images, annotations = [], []
    for index in range(5):
        pixels = np.random.default_rng(index).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        path = root / image_dir / f"{index}.jpg"
        PIL.Image.fromarray(pixels).save(path)
        images.append({"id": 100 + index, "file_name": path.name})
    path.write_bytes(path.read_bytes()[:300])
    for index, caption in enumerate(CAPTIONS):
        annotations.append({"id": index, "image_id": 100 + index % 4 if index < 7 else 104, "caption": caption})
    annotation_path = root / annotation_file
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    annotation_path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return annotation_path


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, content in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def write_shards(folder):
    """Two shards, eight samples: three unreadable images (truncated, zero bytes, not an image) and a CMYK one."""
    cmyk = io.BytesIO()
    PIL.Image.new("CMYK", (20, 16), (0, 50, 100, 0)).save(cmyk, format="JPEG")
    text = lambda caption: caption.encode()  # noqa: E731
    write_shard(
        folder / "shard-000.tar",
        [
            ("s000", {"jpg": jpeg_bytes(0), "txt": text("a dog runs")}),
            ("s001", {"jpg": jpeg_bytes(1)[:150], "txt": text("truncated")}),
            ("s002", {"jpg": jpeg_bytes(2), "txt": text("a cat")}),
            ("s003", {"jpg": b"", "txt": text("zero bytes")}),
        ],
    )
    write_shard(
        folder / "shard-001.tar",
        [
            ("s100", {"jpg": b"<html>not an image</html>", "txt": text("html")}),
            ("s101", {"jpg": cmyk.getvalue(), "txt": text("cmyk")}),
            ("s102", {"jpg": jpeg_bytes(3), "txt": text("a bird")}),
            ("s103", {"jpg": jpeg_bytes(4), "txt": text("a car")}),
        ],
    )
    return [str(folder / "shard-000.tar"), str(folder / "shard-001.tar")]


def write_tiny_model(folder) -> Blip2BridgeModel:
    """A tiny random stage-1 model saved with its Q-Former tokenizer and image processor, as a user's checkpoint."""
    tokenizer = make_bert_tokenizer()
    config = tiny_config()
    config.qformer_config.vocab_size = len(tokenizer)
    config.qformer_config.bos_token_id = tokenizer.bos_token_id
    config.qformer_config.sep_token_id = tokenizer.sep_token_id
    config.qformer_config.pad_token_id = tokenizer.pad_token_id
    config.qformer_config.max_position_embeddings = 32
    torch.manual_seed(0)
    model = Blip2BridgeModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Blip2BridgeImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    return model


# ---- the benchmarks: VQAv2, COCO and NoCaps captions, Flickr30K retrieval -------------------------------------------

QUESTIONS = ["what color is the sofa?", "how many dogs are there?", "is it raining?", "what is on the plate?",
             "where is the boat?"]
ANSWERS = [["red"] * 7 + ["pink"] * 3, ["2"] * 9 + ["two"], ["yes"] * 10, ["rice"] * 6 + ["food"] * 4,
           ["lake"] * 10]


def write_benchmark_data(root: Path) -> Path:
    """VQAv2 (official JSONs), COCO Karpathy test, NoCaps val and Flickr30K test, a few images each, under `root` in
    LAVIS's cache layout."""
    image_ids = [42, 7, 42, 1234, 7]
    for image_id in set(image_ids):
        write_image(root / "coco" / "images" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id % 13)
    write_json(root / "coco" / "annotations" / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": image_id, "question": question, "question_id": 1000 + index}
        for index, (image_id, question) in enumerate(zip(image_ids, QUESTIONS))
    ]})
    write_json(root / "coco" / "annotations" / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1000 + index, "image_id": image_id,
         "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i, answer in enumerate(answers)]}
        for index, (image_id, answers) in enumerate(zip(image_ids, ANSWERS))
    ]})
    karpathy = [
        {"image": f"val2014/COCO_val2014_{image_id:012d}.jpg", "caption": CAPTIONS[index : index + 3]}
        for index, image_id in enumerate(sorted(set(image_ids)))
    ]
    write_json(root / "coco" / "annotations" / "coco_karpathy_test.json", karpathy)
    flickr = []
    for index in range(5):
        write_image(root / "flickr30k" / "images" / "flickr30k-images" / f"{100 + index}.jpg", index)
        flickr.append({"image": f"flickr30k-images/{100 + index}.jpg",
                       # distinct captions, so that no two texts tie
                       "caption": [f"{CAPTIONS[(index + j) % len(CAPTIONS)]} {index}." for j in range(2 + index % 2)]})
    write_json(root / "flickr30k" / "annotations" / "flickr30k_test.json", flickr)
    write_image(root / "nocaps" / "images" / "0013ea2087020901.jpg", 3)
    write_json(root / "nocaps" / "annotations" / "nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg"}],
        "annotations": [{"image_id": 0, "id": i, "caption": caption} for i, caption in enumerate(CAPTIONS[:2])],
    })
    return root
