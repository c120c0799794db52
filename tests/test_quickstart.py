"""The quickstart: scenes whose texts follow from their pixels, and the whole run learning every task it reports."""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from modeling_blip2.quickstart.scenes import COLOURS, COUNT_WORDS, POSITIONS, SHAPES, make_scenes


IMAGE_SIZE = 256  # large enough for the outline probes to fall clear of anti-aliasing and rounding


def colour_at(pixels: np.ndarray, x: float, y: float) -> str | None:
    """The palette colour name of the pixel at (x, y) in image fractions, or None for the background."""
    rgb = pixels[int(y * IMAGE_SIZE), int(x * IMAGE_SIZE)]
    matches = [name for name, value in COLOURS.items() if tuple(rgb) == value]
    return matches[0] if matches else None


def shape_from_pixels(pixels: np.ndarray, x: float, y: float, r: float) -> str:
    """Which shape covers the probes near two corners of its bounding box: a square both, a triangle only the
    bottom-left one (its base spans the box), a circle neither (both lie 1.27 radii from its centre)."""
    top_left = colour_at(pixels, x - 0.9 * r, y - 0.9 * r) is not None
    bottom_left = colour_at(pixels, x - 0.9 * r, y + 0.9 * r) is not None
    return {(True, True): "square", (False, True): "triangle", (False, False): "circle"}[(top_left, bottom_left)]


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """(colour, shape, position) of each "a <colour> <shape> in the <position>" phrase."""
    pattern = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) in the ({'|'.join(POSITIONS)})"
    return re.findall(pattern, caption)


def test_captions_and_answers_match_the_drawn_pixels():
    train, test = make_scenes(num_train=60, num_test=20, seed=3)
    for scene in train + test:
        pixels = np.asarray(scene.draw(IMAGE_SIZE))
        described = parse_caption(scene.caption)
        # The caption names every object, in reading order, and nothing else.
        assert len(described) == len(scene.objects)
        assert [position for _, _, position in described] == sorted(
            (position for _, _, position in described), key=list(POSITIONS).index
        )
        occupied = set()
        for (colour, shape, position), item in zip(described, scene.objects):
            column, row = POSITIONS[position]
            # The object's centre lies in the stated cell, shows the stated colour, and has the stated outline.
            assert int(item.centre_x * 2) == column and int(item.centre_y * 2) == row
            assert colour_at(pixels, item.centre_x, item.centre_y) == colour
            assert shape_from_pixels(pixels, item.centre_x, item.centre_y, item.radius) == shape
            occupied.add(position)
        half = IMAGE_SIZE // 2
        for position in set(POSITIONS) - occupied:
            column, row = POSITIONS[position]
            cell = pixels[row * half : (row + 1) * half, column * half : (column + 1) * half]
            assert (cell == (245, 245, 240)).all(), f"{position} is said to be empty but is drawn on"

        answers = dict(scene.questions)
        assert answers["how many shapes are there?"] == COUNT_WORDS[len(described)]
        for question, answer in scene.questions:
            if match := re.fullmatch(r"what color is the (\w+) in the (.+)\?", question):
                assert (answer, match[1], match[2]) in described
            elif match := re.fullmatch(r"what shape is in the (.+)\?", question):
                assert [shape for _, shape, position in described if position == match[1]] == [answer]
            elif match := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
                assert answer == ("yes" if (match[1], match[2]) in [(c, s) for c, s, _ in described] else "no")
            elif match := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
                assert (match[1], match[2], answer) in described


def test_held_out_layouts_are_unique_and_unseen_in_training():
    train, test = make_scenes(num_train=2000, num_test=300, seed=0)
    test_layouts = [scene.layout for scene in test]
    assert len(set(test_layouts)) == 300
    assert not set(test_layouts) & {scene.layout for scene in train}
    # Both answers of the yes/no question occur, in roughly equal numbers.
    presence = [dict(scene.questions)[next(q for q, _ in scene.questions if q.startswith("is there"))] for scene in train]
    assert 0.4 < presence.count("yes") / len(presence) < 0.6


def test_scenes_are_a_function_of_the_seed():
    first_train, first_test = make_scenes(num_train=20, num_test=5, seed=7)
    again_train, again_test = make_scenes(num_train=20, num_test=5, seed=7)
    other_train, _ = make_scenes(num_train=20, num_test=5, seed=8)
    assert first_train + first_test == again_train + again_test
    assert [scene.caption for scene in first_train] != [scene.caption for scene in other_train]
    assert np.array_equal(np.asarray(first_train[0].draw(64)), np.asarray(again_train[0].draw(64)))


def test_too_many_held_out_scenes_is_refused_with_the_limit():
    with pytest.raises(ValueError, match=r"num_test=5000; at most \d+ distinct held-out layouts"):
        make_scenes(num_train=10, num_test=5000)


@pytest.mark.slow
def test_quickstart_small_run_beats_the_untrained_model_and_reloads(tmp_path):
    from modeling_blip2.cli import main

    start = time.perf_counter()
    assert main(["quickstart", "--size", "small", "--output-dir", str(tmp_path)]) == 0
    print(f"quickstart --size small: {time.perf_counter() - start:.0f} s")

    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["metrics"]
    # Gains (in points) well clear of noise: about half or less of what a run of the preset measures (seed 0: R@1 +71
    # and +70, R@5 +97 and +94, caption exact match +25, Bleu_4 +72, CIDEr +655, VQA +44), so that another CPU's
    # last-bit differences cannot flip them.
    minimum_gains = {
        "retrieval txt_r1": 30, "retrieval img_r1": 30, "retrieval txt_r5": 45, "retrieval img_r5": 45,
        "caption exact match": 8, "caption Bleu_4": 25, "caption CIDEr": 200, "VQA accuracy": 15,
    }
    assert set(metrics) == set(minimum_gains)
    for name, gain in minimum_gains.items():
        assert metrics[name]["trained"] >= metrics[name]["untrained"] + gain, (name, metrics[name])
    # Counting is learned first: every count question of the preset is answered right.
    assert results["vqa_by_question_type"]["count"]["trained"] >= 90
    assert set(results["timings"]) >= {
        "stage 1: ITC + ITM + ITG", "stage 2: Q-Former -> frozen LLM", "VQA fine-tuning"
    }
    for picture in ("loss_curves.png", "samples.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.width > 400 and image.height > 200
    # Only what the run reports is left behind: no empty folders of the Trainer phases.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loss_curves.png", "model", "results.json", "samples.png"]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_the_image_encoder_heads_name_each_cell_and_each_patch_position():
    """The position head's targets: patch p (raster order) lies in cell `cell_of_patch[p]` of POSITIONS, and the cell
    pooling averages exactly that cell's patches; the loss is the sum of both cross-entropies."""
    import torch

    from modeling_blip2.quickstart.vision import CELL_CLASSES, CellClassifier, make_vision_config
    from transformers import Blip2VisionModel

    torch.manual_seed(0)
    classifier = CellClassifier(Blip2VisionModel(make_vision_config(64, patch_size=16))).eval()
    # 4x4 patches; the top-left cell is patches 0, 1, 4, 5 and the bottom-right one 10, 11, 14, 15.
    assert classifier.cell_of_patch.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[0, 1, 2, 3], [4, 0, 0, 5]])
    cell_logits, position_logits = classifier(pixels)
    assert cell_logits.shape == (2, 4, len(CELL_CLASSES)) and position_logits.shape == (2, 16, 4)
    tokens = classifier.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    top_left = tokens[:, [0, 1, 4, 5]].mean(1)
    torch.testing.assert_close(cell_logits[:, 0], classifier.classifier(top_left), rtol=1e-5, atol=1e-5)
    expected_loss = torch.nn.functional.cross_entropy(cell_logits.flatten(0, 1), labels.flatten()) + (
        torch.nn.functional.cross_entropy(position_logits.flatten(0, 1), classifier.cell_of_patch.repeat(2))
    )
    torch.testing.assert_close(classifier.loss(pixels, labels), expected_loss)


def test_sample_sheet_frames_right_captions_green_and_wrong_ones_red(tmp_path):
    from modeling_blip2.quickstart.report import draw_sample_grid

    _, scenes = make_scenes(num_train=1, num_test=2, seed=0)
    images = [scene.draw(128) for scene in scenes]
    references = [scene.caption for scene in scenes]
    path = draw_sample_grid(images, references, [references[0], "a wrong caption"], tmp_path / "samples.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    green, red = np.array([44, 160, 44]), np.array([214, 39, 40])  # matplotlib's tab:green and tab:red

    def frame_pixels(colour, columns):
        return (np.abs(pixels[:, columns] - colour).sum(-1) < 30).sum()

    half = pixels.shape[1] // 4  # four columns of tiles; the first two hold the two samples
    assert frame_pixels(green, slice(0, half)) > 200 and frame_pixels(red, slice(0, half)) < 20
    assert frame_pixels(red, slice(half, 2 * half)) > 200 and frame_pixels(green, slice(half, 2 * half)) < 20


def test_loss_curves_have_one_panel_per_phase_with_each_loss_named(tmp_path):
    from modeling_blip2.quickstart.report import draw_loss_curves, loss_curves_figure

    curves = {
        "LLM": {"loss": [(1, 5.0), (2, 1.0)]},
        "stage 1": {name: [(1, 3.0), (2, 0.5), (3, 0.0)] for name in ("loss", "loss_itc", "loss_itm", "loss_itg")},
    }
    axes = [axis for axis in loss_curves_figure(curves).axes if axis.get_visible()]
    assert [axis.get_title() for axis in axes] == ["LLM", "stage 1"]
    assert [line.get_label() for line in axes[1].get_lines()] == ["loss", "loss_itc", "loss_itm", "loss_itg"]
    assert all(axis.get_yscale() == "log" and axis.get_xlabel() == "step" for axis in axes)
    # The zero loss cannot sit on a log scale and is left out, not drawn at the bottom.
    assert list(axes[1].get_lines()[0].get_xdata()) == [1, 2]
    with Image.open(draw_loss_curves(curves, tmp_path / "curves.png")) as image:
        assert image.size == (1200, 360)  # two panels of 6 x 3.6 inches at 100 dpi


def test_quickstart_switches_read_as_switches():
    import argparse

    from modeling_blip2.quickstart.command import add_quickstart_arguments, settings_from_arguments

    parser = argparse.ArgumentParser()
    add_quickstart_arguments(parser)
    assert settings_from_arguments(parser.parse_args([])).instruction_aware is True
    assert settings_from_arguments(parser.parse_args(["--no-instruction-aware"])).instruction_aware is False
    assert settings_from_arguments(parser.parse_args(["--instruction-aware"])).instruction_aware is True
    assert settings_from_arguments(parser.parse_args(["--lora-rank", "4"])).lora_rank == 4
    assert settings_from_arguments(parser.parse_args(["--vqa-steps", "0"])).vqa_steps == 0


def test_capfilt_switches_read_as_switches():
    import argparse

    from modeling_blip2.quickstart.command import add_quickstart_arguments, settings_from_arguments

    parser = argparse.ArgumentParser()
    add_quickstart_arguments(parser)
    default = settings_from_arguments(parser.parse_args([]))
    assert (default.caption_noise, default.capfilt) == (0.0, False)
    settings = settings_from_arguments(parser.parse_args(["--caption-noise", "0.3", "--capfilt"]))
    assert (settings.caption_noise, settings.capfilt) == (0.3, True)


def test_the_qformer_vocabulary_is_the_same_in_every_process_and_holds_every_corpus_word():
    # The tokenizers WordPiece trainer broke ties between equally frequent merges differently in each process (its
    # hash maps are seeded per process), so one seed trained three different Q-Formers in three runs.
    script = (
        "import json\n"
        "from modeling_blip2.quickstart.scenes import make_scenes\n"
        "from modeling_blip2.quickstart.language import language_texts\n"
        "from modeling_blip2.quickstart.tokenization import train_qformer_tokenizer\n"
        "train, _ = make_scenes(300, 10, seed=0)\n"
        "texts = language_texts([s.caption for s in train], [p for s in train for p in s.questions])\n"
        "print(json.dumps(train_qformer_tokenizer(texts).get_vocab(), sort_keys=True))\n"
    )
    vocabularies = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert vocabularies[0] == vocabularies[1]
    vocabulary = json.loads(vocabularies[0])
    train, _ = make_scenes(num_train=300, num_test=10, seed=0)
    for word in re.findall(r"[a-z]+", " ".join(scene.caption for scene in train)):
        assert word in vocabulary, word
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "z", "##z"} <= set(vocabulary)
