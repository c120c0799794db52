"""Random resized crop + horizontal flip without torchvision: bounds, determinism, mirroring and output size."""

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_blip2 import Blip2BridgeImageProcessor
from modeling_blip2.training.augmentation import RandomResizedCropAndFlip, random_resized_crop_box


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
