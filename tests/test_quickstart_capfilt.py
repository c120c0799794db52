"""The quickstart's CapFilt demonstration (`quickstart/capfilt.py`): the caption noise it adds, the corpus it writes,
the statistics it computes from CapFilt's output (with CapFilt itself replaced by hand-built output), and the greedy
Q-Former captions it reads back. Tiny images and a tiny random model, no network."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2 import Blip2BridgeModel
from modeling_blip2.quickstart import capfilt as quickstart_capfilt
from modeling_blip2.quickstart.capfilt import add_caption_noise, clean_corpus, qformer_captions, write_corpus
from modeling_blip2.quickstart.scenes import make_scenes
from tests.data_files import write_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- add_caption_noise --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_captions():
    return [scene.caption for scene in make_scenes(200, 10, seed=0)[0]]


@pytest.mark.parametrize("fraction, expected_changed", [(0.3, 60), (0.25, 50), (0.333, 67), (0.999, 200)])
def test_caption_noise_changes_the_requested_number_of_captions(scene_captions, fraction, expected_changed):
    original = list(scene_captions)
    noisy, right = add_caption_noise(scene_captions, fraction, seed=0)
    assert scene_captions == original  # the input list is not modified
    assert len(noisy) == len(right) == 200
    changed = [index for index in range(200) if noisy[index] != scene_captions[index]]
    assert len(changed) == expected_changed
    pool = set(scene_captions)
    for index in changed:
        # Another scene's caption: a real caption of the corpus, and a different one.
        assert noisy[index] in pool
        assert noisy[index] != scene_captions[index]
    assert right == [index not in changed for index in range(200)]
    assert sum(right) == 200 - expected_changed


def test_caption_noise_is_reproducible_per_seed(scene_captions):
    first = add_caption_noise(scene_captions, 0.3, seed=7)
    again = add_caption_noise(scene_captions, 0.3, seed=7)
    other = add_caption_noise(scene_captions, 0.3, seed=8)
    assert first == again
    changed_first = {index for index, still_right in enumerate(first[1]) if not still_right}
    changed_other = {index for index, still_right in enumerate(other[1]) if not still_right}
    assert len(changed_first) == len(changed_other) == 60
    assert changed_first != changed_other


def test_caption_noise_zero_leaves_the_captions(scene_captions):
    noisy, right = add_caption_noise(scene_captions, 0, seed=3)
    assert noisy == scene_captions
    assert right == [True] * 200


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_caption_noise_refuses_fractions_outside_zero_to_one(scene_captions, fraction):
    with pytest.raises(ValueError, match=re.escape(f"caption noise is {fraction};")):
        add_caption_noise(scene_captions, fraction, seed=0)


# ---- clean_corpus, with CapFilt replaced by hand-built output -----------------------------------------------------

TRUE = [
    "a red circle in the top left",
    "a blue square in the top right",
    "a green triangle in the bottom left",
    "a yellow circle in the bottom right",
    "a red square in the top left and a blue circle in the bottom right",
    "a green circle in the top right",
]
# Images 0 (another scene's caption) and 5 are wrong; 1, 2, 3 and 4 are right.
NOISY = [TRUE[1], TRUE[1], TRUE[2], TRUE[3], TRUE[4], TRUE[3]]
WRONG_SYNTHETIC = {2: "a blue triangle in the top left", 3: "a red triangle in the top right",
                   4: "a yellow square in the bottom left"}


def candidate(text, source, kept, itc):
    return {"text": text, "source": source, "itc": itc, "itm": 0.9 if kept else 0.1, "kept": kept}


def hand_built_rows(paths):
    """CapFilt's per-image output rows, chosen by hand (kept captions best first)."""
    candidates = [
        # 0: the wrong web caption is replaced by the right synthetic one.
        [candidate(NOISY[0], "web", False, 0.1), candidate(TRUE[0], "synthetic", True, 0.8)],
        # 1: the right web caption is kept.
        [candidate(NOISY[1], "web", True, 0.7), candidate("a blue circle", "synthetic", False, 0.2)],
        # 2: the right web caption is dropped and nothing is kept.
        [candidate(NOISY[2], "web", False, 0.3), candidate(WRONG_SYNTHETIC[2], "synthetic", False, 0.2)],
        # 3: the right web caption is dropped for a wrong synthetic one.
        [candidate(NOISY[3], "web", False, 0.2), candidate(WRONG_SYNTHETIC[3], "synthetic", True, 0.6)],
        # 4: two kept, a wrong synthetic one first, then the right web caption.
        [candidate(NOISY[4], "web", True, 0.5), candidate(WRONG_SYNTHETIC[4], "synthetic", True, 0.6)],
        # 5: the wrong web caption is kept, and so is the right synthetic one.
        [candidate(NOISY[5], "web", True, 0.9), candidate(TRUE[5], "synthetic", True, 0.4)],
    ]
    rows = []
    for index, (path, own) in enumerate(zip(paths, candidates)):
        kept = sorted((c for c in own if c["kept"]), key=lambda c: -c["itc"])
        rows.append({"image": path, "image_id": index, "name": path, "caption": [c["text"] for c in kept],
                     "candidates": own})
    return rows


SUMMARY = {
    "images": 6,
    "kept": {"web": 3, "synthetic": 4},
    "images_without_kept_caption": 1,
    "images_per_second": {"captioning": 12.5, "filtering": 40.0},
}


class FakeCapFilt:
    """Stands in for `training.capfilt.capfilt`: records how it was called and what the folder held, and writes the
    files CapFilt writes (shards/shard-00000.jsonl, annotations.json with the images that kept a caption)."""

    def __init__(self):
        self.calls = []

    def __call__(self, dataset, output_dir, filter_model, filter_processor, captioner_model=None,
                 captioner_processor=None, captioner_settings=None, keep_rule=None, batch_size=16, shard_size=1024,
                 seed=0, accelerator=None, image_column="image", caption_column="caption", source=None):
        rows = list(dataset)
        self.calls.append({
            "images": [row["image"] for row in rows],
            "captions": [row["caption"] for row in rows],
            "image_ids": [row["image_id"] for row in rows],
            "files": sorted(str(path.relative_to(output_dir)) for path in Path(output_dir).rglob("*")),
            "filter_model": filter_model,
            "filter_processor": filter_processor,
            "captioner_model": captioner_model,
            "captioner_settings": captioner_settings,
            "keep_rule": keep_rule,
            "seed": seed,
            "source": source,
            "eval": not filter_model.training,
            "grad": torch.is_grad_enabled(),
        })
        output = hand_built_rows([row["image"] for row in rows])
        (output_dir / "shards").mkdir(parents=True)
        (output_dir / "shards" / "shard-00000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in output))
        kept = [row for row in output if row["caption"]]
        (output_dir / "annotations.json").write_text(json.dumps(kept, indent=1) + "\n")
        return json.loads(json.dumps(SUMMARY))


def tiny_images():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 200, 200), (120, 30, 200)]
    return [Image.new("RGB", (8, 8), colour) for colour in colours]


def test_clean_corpus_statistics_from_capfilt_output(tmp_path, monkeypatch):
    fake = FakeCapFilt()
    monkeypatch.setattr(quickstart_capfilt, "capfilt", fake)
    stage1, processor = torch.nn.Linear(1, 1).train(), object()
    images = tiny_images()
    corpus_file = write_corpus(tmp_path / "corpus", images, NOISY)
    folder = tmp_path / "round-1"

    kept, statistics = clean_corpus(stage1, processor, corpus_file, TRUE, folder, seed=5)

    # The corpus: PNG files with the images' pixels, and a LAVIS-style file naming them with the noisy captions.
    paths = [str(tmp_path / "corpus" / "images" / f"{index:05d}.png") for index in range(6)]
    for path, image in zip(paths, images):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
    assert corpus_file == tmp_path / "corpus" / "noisy_annotations.json"
    assert json.loads(corpus_file.read_text()) == [
        {"image": path, "caption": caption, "image_id": index}
        for index, (path, caption) in enumerate(zip(paths, NOISY))
    ]

    # CapFilt read that corpus with the quickstart's settings, the model in eval mode and without gradients, into an
    # empty folder.
    (call,) = fake.calls
    assert call["images"] == paths and call["captions"] == NOISY and call["image_ids"] == list(range(6))
    assert call["files"] == []
    assert call["filter_model"] is stage1 and call["filter_processor"] is processor
    assert call["captioner_model"] is None
    assert call["captioner_settings"] == quickstart_capfilt.CAPTIONER
    assert call["keep_rule"] == quickstart_capfilt.KEEP_RULE
    assert call["seed"] == 5
    assert call["source"] == str(corpus_file)
    assert call["eval"] and not call["grad"]

    # Every kept caption, best first within an image; image 2 kept none.
    assert kept == [
        {"image_index": 0, "caption": TRUE[0]},
        {"image_index": 1, "caption": TRUE[1]},
        {"image_index": 3, "caption": WRONG_SYNTHETIC[3]},
        {"image_index": 4, "caption": WRONG_SYNTHETIC[4]},
        {"image_index": 4, "caption": TRUE[4]},
        {"image_index": 5, "caption": TRUE[3]},
        {"image_index": 5, "caption": TRUE[5]},
    ]
    # Before: 2 of 6 wrong. After: of 7 kept, 3 wrong (images 3, 4's synthetic, 5's web). Right web captions
    # (images 1, 2, 3, 4): those of 1 and 4 kept.
    assert statistics == {
        "wrong_before": pytest.approx(100 * 2 / 6),
        "wrong_after": pytest.approx(100 * 3 / 7),
        "right_kept": pytest.approx(50.0),
        "captions_before": 6,
        "captions_after": 7,
        "synthetic_kept": 4,
        "images_without_caption": 1,
        "images_per_second": {"captioning": 12.5, "filtering": 40.0},
    }


def test_the_corpus_and_each_cleaning_start_afresh(tmp_path, monkeypatch):
    fake = FakeCapFilt()
    monkeypatch.setattr(quickstart_capfilt, "capfilt", fake)
    stage1 = torch.nn.Linear(1, 1)
    corpus_file = write_corpus(tmp_path / "corpus", tiny_images(), NOISY)
    first = clean_corpus(stage1, None, corpus_file, TRUE, tmp_path / "round", seed=0)
    (tmp_path / "round" / "stale.txt").write_text("from an earlier run\n")
    (tmp_path / "corpus" / "images" / "00099.png").write_bytes(b"not an image")

    corpus_file = write_corpus(tmp_path / "corpus", tiny_images(), NOISY)
    second = clean_corpus(stage1, None, corpus_file, TRUE, tmp_path / "round", seed=0)

    # The second CapFilt call found an empty folder (no shards it would resume from) and the corpus had no stale file.
    assert [call["files"] for call in fake.calls] == [[], []]
    assert not (tmp_path / "corpus" / "images" / "00099.png").exists()
    assert sorted(path.name for path in (tmp_path / "corpus" / "images").iterdir()) == [
        f"{index:05d}.png" for index in range(6)
    ]
    assert sorted(path.name for path in (tmp_path / "round").iterdir()) == ["annotations.json", "shards"]
    assert second == first


def test_clean_corpus_refuses_a_run_that_kept_nothing(tmp_path, monkeypatch):
    def keep_nothing(dataset, output_dir, *args, **kwargs):
        rows = [{**row, "caption": [], "candidates": []} for row in hand_built_rows([r["image"] for r in dataset])]
        (output_dir / "shards").mkdir(parents=True)
        (output_dir / "shards" / "shard-00000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (output_dir / "annotations.json").write_text("[]\n")
        return {**SUMMARY, "kept": {"web": 0, "synthetic": 0}, "images_without_kept_caption": 6}

    monkeypatch.setattr(quickstart_capfilt, "capfilt", keep_nothing)
    corpus_file = write_corpus(tmp_path / "corpus", tiny_images(), NOISY)
    with pytest.raises(ValueError, match="CapFilt kept no caption of the 6 images"):
        clean_corpus(torch.nn.Linear(1, 1), None, corpus_file, TRUE, tmp_path / "round", seed=0)


# ---- qformer_captions --------------------------------------------------------------------------------------------


def test_qformer_captions_are_greedy_and_joined_in_order(tmp_path):
    from transformers import AutoTokenizer

    # The tiny model's tokenizer and config, with a position table long enough for max_length=41 (the saved tiny
    # model has 32 positions; the quickstart's stage-1 model has 64).
    config = copy.deepcopy(write_tiny_model(tmp_path).config)
    config.qformer_config.max_position_embeddings = 48
    torch.manual_seed(1)
    model = Blip2BridgeModel(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():
        probe = model.get_image_embeds(torch.randn(1, 3, 28, 28))
    image_tokens, width = probe.shape[1], model.config.qformer_config.encoder_hidden_size
    assert probe.shape[2] == width
    image_embeds = 3 * torch.randn(5, image_tokens, width)

    model.train()  # qformer_captions puts the model in eval mode itself
    captions = qformer_captions(model, tokenizer, image_embeds, batch_size=2)

    assert not model.training
    expected = []
    with torch.no_grad():
        for row in image_embeds.split(1):
            generated = model.generate(image_embeds=row, num_beams=1, do_sample=False, max_length=41, min_length=2)
            expected += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert len(expected) == 5
    # Distinct captions, so that a batch joined out of order would show.
    assert len(set(expected)) >= 3
    assert all(expected)
    assert captions == expected
