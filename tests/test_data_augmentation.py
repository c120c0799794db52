"""Random resized crop + horizontal flip without torchvision: bounds, determinism, mirroring and output size; and
BLIP's RandomAugment (Visual Genome) against LAVIS's own OpenCV-based ops (tests/fixtures/randaugment_lavis.json)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_blip2 import Blip2BridgeImageProcessor
from modeling_blip2.training.augmentation import (
    BLIP_RANDOM_AUGMENT_OPS,
    RANDOM_AUGMENT_OPS,
    RandomAugment,
    RandomResizedCropAndFlip,
    brightness,
    random_resized_crop_box,
    translate_x,
    translate_y,
)


def random_image(width, height, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels).convert(mode)


def test_crop_boxes_cover_the_scale_range_and_stay_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    width, height = 1000, 800
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, crop_width, crop_height = random_resized_crop_box(
            width, height, (0.5, 1.0), (3 / 4, 4 / 3), generator
        )
        assert 0 <= left and left + crop_width <= width and 0 <= top and top + crop_height <= height
        fractions.append(crop_width * crop_height / (width * height))
        ratios.append(crop_width / crop_height)
    fractions, ratios = np.array(fractions), np.array(ratios)
    # rounding the sides to whole pixels moves the area by less than 0.3 % at this size
    assert ((fractions < 0.497) | (fractions > 1.0)).sum() == 0
    assert ((ratios < 0.75 * 0.997) | (ratios > 4 / 3 * 1.003)).sum() == 0
    # the whole range is drawn: small and large crops, wide and tall ones
    assert fractions.min() < 0.52 and fractions.max() > 0.97
    assert (fractions < 0.75).sum() > 400 and (fractions >= 0.75).sum() > 400
    assert (ratios < 1).sum() > 400 and (ratios > 1).sum() > 400


def test_crop_box_falls_back_to_a_central_crop_for_extreme_aspect_ratios():
    # 400x10: no crop of half the area with ratio <= 4/3 fits in 10 rows, so the central 13x10 crop (ratio 4/3) is used
    assert random_resized_crop_box(400, 10, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator()) == (193, 0, 13, 10)
    # 10x400: the central 10x13 crop (ratio 3/4, rounded)
    assert random_resized_crop_box(10, 400, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator()) == (0, 193, 10, 13)


@pytest.mark.parametrize("input_size", [(224, 224), (3, 5), (640, 480), (500, 20)])
def test_output_has_exactly_the_processor_size(input_size):
    processor = Blip2BridgeImageProcessor(size={"height": 24, "width": 32})
    transform = RandomResizedCropAndFlip(processor, generator=torch.Generator().manual_seed(1))
    pixel_values = transform([random_image(*input_size), random_image(*input_size, seed=1)])
    assert pixel_values.shape == (2, 3, 24, 32)
    assert pixel_values.dtype == torch.float32


def test_same_seed_same_augmentation_other_seed_other_augmentation():
    processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    images = [random_image(64, 48, seed) for seed in range(4)]

    def augment(seed):
        return RandomResizedCropAndFlip(processor, generator=torch.Generator().manual_seed(seed))(images)

    assert torch.equal(augment(0), augment(0))
    assert not torch.allclose(augment(0), augment(1))


def test_flip_mirrors_the_pixels():
    processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    image = random_image(28, 28)
    # the full image, so that the crop and resize are the identity and only the flip acts
    whole_image = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = RandomResizedCropAndFlip(processor, flip_probability=1.0, **whole_image)(image)
    kept = RandomResizedCropAndFlip(processor, flip_probability=0.0, **whole_image)(image)

    assert torch.equal(kept, processor(image)["pixel_values"])
    assert torch.equal(flipped, torch.flip(kept, dims=[-1]))
    assert torch.equal(flipped[0, :, :, 0], kept[0, :, :, 27])
    assert not torch.equal(flipped, kept)


def test_flip_happens_about_half_the_time():
    processor = Blip2BridgeImageProcessor(size={"height": 8, "width": 8})
    transform = RandomResizedCropAndFlip(
        processor, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0)
    )
    image = random_image(8, 8)
    kept = processor(image)["pixel_values"]
    flips = sum(not torch.equal(transform(image), kept) for _ in range(400))
    assert 160 < flips < 240  # binomial(400, 0.5): mean 200, standard deviation 10


def test_image_modes_are_converted_before_the_crop():
    processor = Blip2BridgeImageProcessor(size={"height": 16, "width": 16})
    transform = RandomResizedCropAndFlip(processor, generator=torch.Generator().manual_seed(0))
    white = torch.tensor([(1 - mean) / std for mean, std in zip(processor.image_mean, processor.image_std)])
    sixteen_bit_white = PIL.Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    transparent = PIL.Image.new("RGBA", (30, 20), (255, 0, 0, 0))  # composited onto white
    cmyk_white = PIL.Image.new("CMYK", (30, 20), (0, 0, 0, 0))
    for image in (sixteen_bit_white, transparent, cmyk_white):
        pixel_values = transform(image)
        assert pixel_values.shape == (1, 3, 16, 16)
        torch.testing.assert_close(pixel_values[0], white[:, None, None].expand(3, 16, 16))


def test_bad_settings_are_refused():
    processor = Blip2BridgeImageProcessor()
    with pytest.raises(ValueError, match=r"scale is \(0.0, 1.0\)"):
        RandomResizedCropAndFlip(processor, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_probability is 2"):
        RandomResizedCropAndFlip(processor, flip_probability=2)


RANDAUGMENT = json.loads((Path(__file__).parent / "fixtures" / "randaugment_lavis.json").read_text(encoding="utf-8"))


def _fixture_array(hex_pixels, shape):
    return np.frombuffer(bytes.fromhex(hex_pixels), dtype=np.uint8).reshape(shape).copy()


FIXTURE_IMAGES = {name: _fixture_array(v["pixels"], v["shape"]) for name, v in RANDAUGMENT["images"].items()}


def test_random_augment_ops_equal_lavis_opencv_ops_bit_for_bit():
    # Every op of BLIP's list at BLIP's level-5 arguments and at others (fractional shifts, odd angles, factors that
    # blend), on a random and a low-contrast image, as randaugment.py computes them with cv2.
    checked = set()
    for case in RANDAUGMENT["ops"]:
        image = FIXTURE_IMAGES[case["image"]]
        op = RANDOM_AUGMENT_OPS[case["op"]][0]
        args = [tuple(a) if isinstance(a, list) else a for a in case["args"]]
        expected = _fixture_array(case["output"], image.shape)
        np.testing.assert_array_equal(op(image.copy(), *args), expected, err_msg=f"{case['op']}{case['args']}")
        checked.add(case["op"])
    assert checked == set(BLIP_RANDOM_AUGMENT_OPS) and len(RANDAUGMENT["ops"]) == 52


def test_random_augment_draws_ops_and_signs_as_lavis_under_the_same_numpy_seed():
    augment = RandomAugment()  # BLIP's RandomAugment(2, 5) over its ten ops, numpy's global generator
    image = PIL.Image.fromarray(FIXTURE_IMAGES["random"])
    changed = 0
    for case in RANDAUGMENT["random_augment"]:
        np.random.seed(case["seed"])
        out = augment(image)
        assert isinstance(out, PIL.Image.Image)
        np.testing.assert_array_equal(np.asarray(out), _fixture_array(case["output"], (12, 10, 3)), str(case["seed"]))
        changed += not np.array_equal(np.asarray(out), FIXTURE_IMAGES["random"])
    assert 15 < changed < 40  # some seeds apply no op (or Identity, Brightness 1.0, Sharpness 1.0), most change it


def test_random_augment_ops_by_hand():
    image = FIXTURE_IMAGES["random"]
    # Brightness: values times the factor, truncated.
    expected = (image.astype(np.float32) * np.float32(0.64)).astype(np.uint8)
    np.testing.assert_array_equal(brightness(image, 0.64), expected)
    # A whole-pixel translation moves the content and fills with grey 128; positive offsets move it left / up.
    shifted = translate_x(image, 3.0)
    np.testing.assert_array_equal(shifted[:, :7], image[:, 3:])
    assert (shifted[:, 7:] == 128).all()
    shifted = translate_y(image, -2.0)
    np.testing.assert_array_equal(shifted[2:], image[:-2])
    assert (shifted[:2] == 128).all()
    # Half a pixel: each value is the mean of two neighbours, rounded half up (OpenCV's fixed point).
    half = translate_x(image, 0.5).astype(int)
    np.testing.assert_array_equal(half[:, :9], (image[:, :9].astype(int) + image[:, 1:] + 1) // 2)


def test_random_augment_levels_match_lavis_magnitudes():
    class Draws:  # a stand-in generator returning fixed draws
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value

    level = 5
    assert RANDOM_AUGMENT_OPS["Brightness"][1](level, Draws(0.0)) == (1.0,)  # 5 / 10 * 1.8 + 0.1
    assert RANDOM_AUGMENT_OPS["Sharpness"][1](level, Draws(0.0)) == (1.0,)
    assert RANDOM_AUGMENT_OPS["ShearX"][1](level, Draws(0.4))[0] == pytest.approx(0.15)
    assert RANDOM_AUGMENT_OPS["ShearY"][1](level, Draws(0.6))[0] == pytest.approx(-0.15)  # negative when > 0.5
    assert RANDOM_AUGMENT_OPS["TranslateX"][1](level, Draws(0.6)) == (-5.0, (128, 128, 128))
    assert RANDOM_AUGMENT_OPS["Rotate"][1](level, Draws(0.4)) == (-15.0, (128, 128, 128))  # negative when < 0.5
    assert RANDOM_AUGMENT_OPS["Rotate"][1](10, Draws(0.6)) == (30.0, (128, 128, 128))


def test_crop_and_flip_applies_random_augment_after_the_flip():
    processor = Blip2BridgeImageProcessor(size={"height": 12, "width": 10})
    image = PIL.Image.fromarray(FIXTURE_IMAGES["random"])
    whole_image = dict(scale=(1.0, 1.0), ratio=(10 / 12, 10 / 12), flip_probability=1.0)
    # One op, always TranslateX at level 5; its 0.5 application draw and sign come from the seeded RandomState.
    augment = RandomAugment(num_ops=1, ops=("TranslateX",), random_state=np.random.RandomState(1))
    transform = RandomResizedCropAndFlip(processor, random_augment=augment, **whole_image)
    draws = np.random.RandomState(1)
    draws.choice(["TranslateX"], 1)
    applied = draws.random() <= 0.5
    offset = -5.0 if draws.random() > 0.5 else 5.0
    flipped = np.asarray(image)[:, ::-1]
    expected = translate_x(flipped, offset) if applied else flipped
    assert applied
    torch.testing.assert_close(transform(image), processor(PIL.Image.fromarray(expected))["pixel_values"])
    assert "random_augment=RandomAugment(num_ops=1, magnitude=5, ops=['TranslateX'])" in repr(transform)


def test_random_augment_refuses_unknown_ops_and_levels():
    with pytest.raises(ValueError, match=r"Unknown RandomAugment ops \['Solarize'\]"):
        RandomAugment(ops=("Rotate", "Solarize"))
    with pytest.raises(ValueError, match="magnitude is 11"):
        RandomAugment(magnitude=11)


def test_a_huge_image_is_reduced_before_cropping_to_one_decoded_copy_of_memory():
    import tracemalloc

    processor = Blip2BridgeImageProcessor(size={"height": 28, "width": 28})
    augmentation = RandomResizedCropAndFlip(processor, generator=torch.Generator().manual_seed(0))
    huge = PIL.Image.new("RGB", (3000, 2000), "red")  # 6 MB decoded; at least 3x28 px is kept per axis
    tracemalloc.start()
    pixel_values = augmentation([huge])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pixel_values.shape == (1, 3, 28, 28)
    assert peak < 2_000_000  # numpy copies of the full image would take 6 MB each
    red = processor(PIL.Image.new("RGB", (28, 28), "red"))["pixel_values"]
    torch.testing.assert_close(pixel_values, red, rtol=0, atol=1e-6)
