"""CapFilt (`training/capfilt.py`, `blip2-bridge capfilt`): the keep rules on hand-built scores, the merging of web and
synthetic captions, reproducible sampling, scores equal to the model's own ITC/ITM, resumable shards, output that our
training loaders read, and the command line. Tiny random models, generated images, no network."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2.cli import main
from modeling_blip2.training import capfilt as capfilt_module
from modeling_blip2.training.capfilt import (
    CapFiltModels,
    CaptionerSettings,
    KeepRule,
    capfilt,
    capfilt_webdataset,
    keep_captions,
    merge_candidates,
    read_capfilt_rows,
    same_vision,
)
from modeling_blip2.training.data import UnreadableSampleError, open_sample_image, pre_caption
from modeling_blip2.training.datasets import load_annotation_file, load_lavis_annotations, load_webdataset
from tests.data_files import write_coco_folder, write_image, write_shards, write_tiny_model
from tests.helpers import CAPTIONS
from tests.tiny_models import tiny_model, tiny_stage2


pytestmark = pytest.mark.usefixtures("one_thread")

FAST = CaptionerSettings(num_captions=3, max_new_tokens=6, min_new_tokens=2)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The tiny stage-1 model saved as a folder, loaded back as a user would: (folder, model, processor)."""
    from transformers import AutoModel, AutoProcessor

    folder = tmp_path_factory.mktemp("model")
    write_tiny_model(folder)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Five images (the last truncated), eight captions: (annotation file, image root, dataset)."""
    root = tmp_path_factory.mktemp("coco")
    annotation_file = write_coco_folder(root)
    return annotation_file, root / "images", load_annotation_file(annotation_file, root / "images")


def synthetic_texts(rows):
    readable = [row for row in rows if "skipped" not in row]
    return [[c["text"] for c in row["candidates"] if c["source"] == "synthetic"] for row in readable]


# ---- the keep rule on hand-built scores --------------------------------------------------------------------------

# itc: 1 and 3 tie at 0.5 (1 comes first); itm: 2 sits exactly at 0.5.
SCORES = [
    {"itc": 0.2, "itm": 0.9},
    {"itc": 0.5, "itm": 0.3},
    {"itc": 0.4, "itm": 0.5},
    {"itc": 0.5, "itm": 0.7},
    {"itc": -0.1, "itm": 0.6},
]


def test_top_k_by_itc_keeps_the_k_most_similar_and_breaks_ties_by_position():
    assert keep_captions(SCORES, KeepRule(rank_by="itc", top_k=2)) == [1, 3]
    assert keep_captions(SCORES, KeepRule(rank_by="itc", top_k=3)) == [1, 3, 2]
    # ITM is not read without a threshold: None scores are fine.
    without_itm = [{"itc": score["itc"], "itm": None} for score in SCORES]
    assert keep_captions(without_itm, KeepRule(rank_by="itc", top_k=1)) == [1]


def test_top_k_by_itm_keeps_the_k_most_probable_matches():
    assert keep_captions(SCORES, KeepRule(rank_by="itm", top_k=2)) == [0, 3]
    assert keep_captions(SCORES, KeepRule(rank_by="itm", top_k=10)) == [0, 3, 4, 2, 1]


def test_threshold_alone_keeps_every_caption_at_or_above_it_best_first():
    # itm >= 0.5: candidates 0 (0.9), 2 (0.5, the boundary), 3 (0.7), 4 (0.6); 1 (0.3) fails.
    assert keep_captions(SCORES, KeepRule(rank_by="itm", top_k=None, itm_threshold=0.5)) == [0, 3, 4, 2]
    assert keep_captions(SCORES, KeepRule(rank_by="itc", top_k=None, itm_threshold=0.5)) == [3, 2, 0, 4]


def test_threshold_applies_before_top_k():
    # Without the threshold the top two by itc are [1, 3]; 1 (itm 0.3) and 2 (itm 0.5) fail itm >= 0.6 first.
    assert keep_captions(SCORES, KeepRule(rank_by="itc", top_k=2, itm_threshold=0.6)) == [3, 0]


def test_synthetic_captions_can_have_their_own_threshold():
    sourced = [dict(score, source=source) for score, source in zip(SCORES, ["web"] + 4 * ["synthetic"])]
    # Web 0 (itm 0.9) passes 0.5; of the synthetic ones only 3 (0.7) reaches 0.65; 2 (0.5) and 4 (0.6) would pass 0.5.
    rule = KeepRule(rank_by="itc", top_k=None, itm_threshold=0.5, synthetic_itm_threshold=0.65)
    assert keep_captions(sourced, rule) == [3, 0]
    # A stricter web threshold leaves the synthetic one alone; with no web threshold every web caption passes.
    strict_web = KeepRule(rank_by="itc", top_k=1, itm_threshold=0.95, synthetic_itm_threshold=0.65)
    assert keep_captions(sourced, strict_web) == [3]
    assert keep_captions(sourced, KeepRule(rank_by="itm", top_k=None, synthetic_itm_threshold=0.8)) == [0]
    assert KeepRule(top_k=None, synthetic_itm_threshold=0.8).needs_itm


def test_ties_keep_the_earlier_candidate():
    tied = [{"itc": 0.1, "itm": 0.2}, {"itc": 0.3, "itm": 0.4}, {"itc": 0.3, "itm": 0.4}, {"itc": 0.3, "itm": 0.4}]
    assert keep_captions(tied, KeepRule(rank_by="itc", top_k=2)) == [1, 2]
    assert keep_captions(tied, KeepRule(rank_by="itm", top_k=1)) == [1]


def test_an_image_whose_captions_all_fail_the_threshold_keeps_none():
    assert keep_captions(SCORES, KeepRule(rank_by="itm", top_k=2, itm_threshold=0.95)) == []
    assert keep_captions(SCORES, KeepRule(rank_by="itc", top_k=None, itm_threshold=0.91)) == []
    assert keep_captions([], KeepRule()) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rank_by="clip"), "rank_by is 'clip'"),
        (dict(top_k=0), "top_k is 0"),
        (dict(itm_threshold=1.5), "itm_threshold is 1.5"),
        (dict(itm_threshold=-0.1), r"itm_threshold is -0\.1"),
        (dict(synthetic_itm_threshold=2.0), "synthetic_itm_threshold is 2.0"),
        (dict(top_k=None), "needs top_k, itm_threshold or both"),
    ],
)
def test_keep_rule_refuses_bad_options_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        KeepRule(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_p=0), "top_p is 0"),
        (dict(top_p=1.2), r"top_p is 1\.2"),
        (dict(num_captions=-1), "num_captions is -1"),
        (dict(max_new_tokens=-2), "max_new_tokens is -2"),
    ],
)
def test_captioner_settings_refuse_bad_options_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        CaptionerSettings(**options)


# ---- merging web and synthetic captions --------------------------------------------------------------------------


def test_merge_keeps_one_candidate_per_cleaned_caption_web_first():
    web = ["A Dog runs.", "  ", None, "a dog runs", "a cat sleeps"]
    synthetic = ["a dog runs", "a bird flies", "A bird flies!", "", ".", "A CAT (sleeps)", "  a fish swims  "]
    assert merge_candidates(web, synthetic) == [
        {"text": "A Dog runs.", "source": "web"},
        {"text": "a cat sleeps", "source": "web"},
        {"text": "a bird flies", "source": "synthetic"},
        {"text": "a fish swims", "source": "synthetic"},
    ]
    assert merge_candidates([], []) == []
    assert merge_candidates([], ["x", "X."]) == [{"text": "x", "source": "synthetic"}]


# ---- the whole corpus: sampling, scores, shards ------------------------------------------------------------------


def test_the_same_seed_samples_the_same_captions_and_another_seed_others(stage1, coco, tmp_path):
    _, model, processor = stage1
    dataset = coco[2]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        capfilt(dataset, tmp_path / name, model, processor, captioner_settings=FAST, batch_size=2, shard_size=3,
                seed=seed)
        runs[name] = synthetic_texts(read_capfilt_rows(tmp_path / name))
    assert len(runs["a"]) == 4  # the four readable images
    assert all(1 <= len(texts) <= 3 for texts in runs["a"])
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_scores_are_the_models_itc_similarity_and_itm_probability(stage1, coco, tmp_path):
    _, model, processor = stage1
    assert processor.image_processor.size == {"height": 28, "width": 28}
    first_image = [row for row in coco[2] if row["image_id"] == 100]
    rule = KeepRule(rank_by="itm", top_k=None, itm_threshold=0.0)
    capfilt(first_image, tmp_path, model, processor, captioner_settings=FAST, keep_rule=rule)
    (row,) = read_capfilt_rows(tmp_path)
    assert row["image_id"] == 100 and len(row["candidates"]) >= 3
    image = open_sample_image(first_image[0]["image"]).convert("RGB")
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values=pixel_values).pooler_output[0]  # (queries, dim)
        for candidate in row["candidates"]:
            # Each text alone, unpadded: the batch's padding must not change its score.
            tokens = processor.tokenizer(pre_caption(candidate["text"]), truncation=True, max_length=35,
                                         return_tensors="pt")
            text_feat = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output[0]
            itc = (image_feats @ text_feat).max().item()
            logits = model.get_itm_logits(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                          pixel_values=pixel_values)
            itm = logits.softmax(dim=-1)[0, 1].item()
            assert candidate["itc"] == pytest.approx(itc, abs=1e-5), candidate["text"]
            assert candidate["itm"] == pytest.approx(itm, abs=1e-5), candidate["text"]
    # The threshold 0 keeps every caption, best ITM first.
    by_itm = sorted(row["candidates"], key=lambda candidate: -candidate["itm"])
    assert row["caption"] == [candidate["text"] for candidate in by_itm]


def six_images(folder: Path) -> list[dict]:
    rows = []
    for index in range(6):
        write_image(folder / f"{index}.png", index)
        rows.append({"image": str(folder / f"{index}.png"), "caption": CAPTIONS[index], "image_id": index})
    rows.append({"image": str(folder / "0.png"), "caption": CAPTIONS[6], "image_id": 0})  # a second web caption
    return rows


def test_a_killed_run_resumes_by_shard_and_writes_the_same_output(stage1, tmp_path, monkeypatch):
    _, model, processor = stage1
    dataset = six_images(tmp_path / "images")
    output = tmp_path / "out"
    options = dict(captioner_settings=FAST, batch_size=2, shard_size=2, seed=0)
    capfilt(dataset, output, model, processor, **options)
    shards = sorted(path.name for path in (output / "shards").glob("shard-*.jsonl"))
    assert shards == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    annotations = (output / "annotations.json").read_bytes()
    second_shard = (output / "shards" / "shard-00001.jsonl").read_bytes()
    (output / "shards" / "shard-00001.jsonl").unlink()  # the run was killed during shard 1
    (output / "annotations.json").unlink()

    processed = []
    process_images = capfilt_module.process_images

    def recording(models, entries, timings):
        processed.extend(entry["image_id"] for entry in entries)
        return process_images(models, entries, timings)

    monkeypatch.setattr(capfilt_module, "process_images", recording)
    summary = capfilt(dataset, output, model, processor, **options)
    assert processed == [2, 3]
    assert (output / "shards" / "shard-00001.jsonl").read_bytes() == second_shard
    assert (output / "annotations.json").read_bytes() == annotations
    assert summary["images"] == 6

    processed.clear()
    with pytest.raises(ValueError, match=r"\(seed differ\)"):
        capfilt(dataset, output, model, processor, **dict(options, seed=1))
    with pytest.raises(ValueError, match=r"\(shard_size differ\)"):
        capfilt(dataset, output, model, processor, **dict(options, shard_size=3))
    assert processed == []


def test_annotations_hold_the_kept_captions_and_load_with_our_loader(stage1, coco, tmp_path):
    _, model, processor = stage1
    dataset = coco[2]
    every = KeepRule(rank_by="itm", top_k=None, itm_threshold=0.0)
    capfilt(dataset, tmp_path / "all", model, processor, captioner_settings=FAST, keep_rule=every, batch_size=2)
    scored = [row for row in read_capfilt_rows(tmp_path / "all") if "skipped" not in row]
    assert len(scored) == 4
    # A threshold between the lowest and the highest of the images' best ITM: some images keep nothing, some keep.
    best = sorted(max(c["itm"] for c in row["candidates"]) for row in scored)
    assert best[0] < best[-1]
    threshold = (best[0] + best[-1]) / 2
    rule = KeepRule(rank_by="itm", top_k=None, itm_threshold=threshold)
    summary = capfilt(dataset, tmp_path / "out", model, processor, captioner_settings=FAST, keep_rule=rule,
                      batch_size=2)

    expected = []  # (image path, image id, kept captions best first), from the first run's scores
    for row in scored:
        kept = sorted((c for c in row["candidates"] if c["itm"] >= threshold), key=lambda c: -c["itm"])
        expected.append((row["image"], row["image_id"], [c["text"] for c in kept]))
    rows = read_capfilt_rows(tmp_path / "out")
    assert [(row["image"], row["image_id"], row["caption"]) for row in rows if "skipped" not in row] == expected
    assert [row["skipped"] for row in rows if "skipped" in row] == ["corrupt image"]

    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    with_caption = [entry for entry in expected if entry[2]]
    assert 0 < len(with_caption) < 4
    assert [(entry["image"], entry["image_id"], entry["caption"]) for entry in annotations] == with_caption
    assert summary["images"] == 5 and summary["images_without_kept_caption"] == 4 - len(with_caption)
    assert summary["images_skipped"]["corrupt image"] == 1

    loaded = load_lavis_annotations(tmp_path / "out" / "annotations.json", image_root="")
    assert [(row["image"], row["caption"]) for row in loaded] == [
        (image, caption) for image, _, captions in with_caption for caption in captions
    ]
    assert all(Path(row["image"]).is_file() for row in loaded)


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def test_webdataset_output_streams_one_sample_per_kept_caption_with_the_input_image(stage1, tmp_path):
    _, model, processor = stage1
    inputs = write_shards(tmp_path)
    output = tmp_path / "out"
    summary = capfilt_webdataset(inputs, output, model, processor,
                                 captioner_settings=CaptionerSettings(num_captions=2, max_new_tokens=4,
                                                                      min_new_tokens=1),
                                 keep_rule=KeepRule(top_k=2), batch_size=3)
    assert sorted(path.name for path in (output / "webdataset").iterdir()) == ["00000.tar", "00001.tar"]

    input_images = {name.partition(".")[0]: data for shard in inputs for name, data in read_tar(shard).items()
                    if name.endswith(".jpg")}
    assert len(input_images) == 8
    reasons = {}
    for key, data in input_images.items():
        try:
            open_sample_image(data)
        except UnreadableSampleError as error:
            reasons[key] = error.reason
    assert reasons == {"s001": "corrupt image", "s003": "empty image", "s100": "corrupt image"}
    assert summary["images"] == 8
    assert summary["images_skipped"] == {"missing file": 0, "corrupt image": 2, "empty image": 1, "bad text": 0}

    rows = {row["__key__"]: row for row in read_capfilt_rows(output)}
    assert sorted(rows) == sorted(input_images)
    assert {key for key, row in rows.items() if "skipped" in row} == set(reasons)
    expected = {f"{key}_{rank}": (key, caption) for key, row in rows.items() for rank, caption in
                enumerate(row.get("caption", []))}
    assert all(len(rows[key]["caption"]) == 2 for key in input_images if key not in reasons)
    assert len(expected) == 10

    samples = list(load_webdataset(str(output / "webdataset" / "*.tar")))
    assert sorted(sample["__key__"] for sample in samples) == sorted(expected)
    for sample in samples:
        image_key, caption = expected[sample["__key__"]]
        assert sample["image"]["bytes"] == input_images[image_key]
        assert sample["caption"] == caption
    # Each sample's .json holds its source and scores, those of the row's candidate.
    members = {**read_tar(output / "webdataset" / "00000.tar"), **read_tar(output / "webdataset" / "00001.tar")}
    for key, (image_key, caption) in expected.items():
        metadata = json.loads(members[f"{key}.json"])
        candidate = next(c for c in rows[image_key]["candidates"] if c["text"] == caption)
        assert metadata == {"source": candidate["source"], "itc": candidate["itc"], "itm": None,
                            "image_key": image_key}
    # The CMYK sample is read as RGB and its bytes are kept as they were.
    assert Image.open(io.BytesIO(input_images["s101"])).mode == "CMYK"
    assert "s101_0" in expected


# ---- the command line --------------------------------------------------------------------------------------------


def test_command_line_keeps_the_top_caption_by_itc(stage1, coco, tmp_path, capsys):
    folder, _, _ = stage1
    annotation_file, image_root, _ = coco
    output = tmp_path / "out"
    code = main(["capfilt", "--model", str(folder), "--annotation-file", str(annotation_file), "--image-root",
                 str(image_root), "--output", str(output), "--num-captions", "2", "--max-new-tokens", "5",
                 "--top-k", "1", "--batch-size", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((output / "capfilt_summary.json").read_text())
    assert json.loads(printed[printed.index("{"):]) == summary
    annotations = json.loads((output / "annotations.json").read_text())
    assert [entry["image_id"] for entry in annotations] == [100, 101, 102, 103]
    for entry in annotations:
        assert len(entry["caption"]) == 1
        assert sum(c["source"] == "synthetic" for c in entry["candidates"]) <= 2
        best = max(entry["candidates"], key=lambda c: c["itc"])
        assert entry["caption"] == [best["text"]]
        assert [c["kept"] for c in entry["candidates"]] == [c is best for c in entry["candidates"]]
    arguments = json.loads((output / "capfilt_arguments.json").read_text())
    assert arguments["keep_rule"] == {
        "rank_by": "itc", "top_k": 1, "itm_threshold": None, "synthetic_itm_threshold": None
    }
    assert arguments["captioner_settings"]["num_captions"] == 2
    assert arguments["captioner_settings"]["max_new_tokens"] == 5
    assert arguments["source"] == str(annotation_file)
    assert summary["kept"]["web"] + summary["kept"]["synthetic"] == 4


def test_command_line_refuses_a_stage2_filter(coco, tmp_path, capsys):
    model, processor = tiny_stage2("opt")
    folder = tmp_path / "stage2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    annotation_file, image_root, _ = coco
    code = main(["capfilt", "--model", str(folder), "--annotation-file", str(annotation_file), "--image-root",
                 str(image_root), "--output", str(tmp_path / "out"), "--num-captions", "1"])
    assert code == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the loading's progress bars
    assert error.startswith("blip2-bridge capfilt: error: the filter is a Blip2BridgeForConditionalGeneration")
    assert "needs a stage-1 Blip2BridgeModel" in error
    assert not (tmp_path / "out" / "annotations.json").exists()


def test_command_line_top_k_0_needs_a_threshold(stage1, coco, tmp_path, capsys):
    folder, _, _ = stage1
    annotation_file, image_root, _ = coco
    code = main(["capfilt", "--model", str(folder), "--annotation-file", str(annotation_file), "--image-root",
                 str(image_root), "--output", str(tmp_path / "out"), "--top-k", "0"])
    assert code == 1
    assert "a keep rule needs top_k, itm_threshold or both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- a stage-2 captioner, and when image features are shared -----------------------------------------------------


def test_a_stage2_captioner_reads_images_with_its_own_tower(stage1, coco):
    _, filter_model, filter_processor = stage1
    model, processor = tiny_stage2("opt")
    assert processor.image_processor.size == {"height": 28, "width": 28}
    settings = CaptionerSettings(num_captions=2, max_new_tokens=4, min_new_tokens=1)
    models = CapFiltModels.build(filter_model, filter_processor, model, processor, settings, KeepRule())
    assert models.shares_image_embeds is False
    paths = dict.fromkeys(row["image"] for row in coco[2] if row["image_id"] in (100, 101, 102))
    images = [open_sample_image(path).convert("RGB") for path in paths]
    assert len(images) == 3
    torch.manual_seed(0)
    captions = models.captioner(images, None)
    assert len(captions) == 3
    assert all(len(texts) == 2 and all(isinstance(text, str) for text in texts) for texts in captions)
    # The filter's own decoder shares the filter's features.
    assert CapFiltModels.build(filter_model, filter_processor).shares_image_embeds is True


def test_same_vision_compares_the_towers_weights():
    model = tiny_model(seed=0)
    assert same_vision(model, model)
    assert same_vision(model, tiny_model(seed=0))  # another object with the same weights
    assert not same_vision(model, tiny_model(seed=1))
    stage2, _ = tiny_stage2("opt")
    assert not same_vision(model, stage2)
