"""Blip2BridgeImageProcessor and Blip2BridgeProcessor: the output for each kind of input; the inputs refused."""

import base64
import io
import re

import numpy as np
import PIL.Image
import pytest
import torch
from tests.helpers import make_bert_tokenizer
from transformers import AutoImageProcessor, AutoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SizeDict

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2.processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor


CLIP_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float64)
CLIP_STD = np.array(OPENAI_CLIP_STD, dtype=np.float64)
CAPTIONS = ["a cat on a sofa", "two dogs run across a green field", "a boat"]


@pytest.fixture(scope="module")
def image_processor():
    return Blip2BridgeImageProcessor()


@pytest.fixture(scope="module")
def processor():
    return Blip2BridgeProcessor(Blip2BridgeImageProcessor(), make_bert_tokenizer())


def expected_pixel_values(rgb) -> np.ndarray:
    """What the model should see for a solid image of 8-bit colour `rgb`: ((c / 255) - mean) / std per channel."""
    return (np.asarray(rgb, dtype=np.float64) / 255 - CLIP_MEAN) / CLIP_STD


def solid(image_processor, image, **kwargs) -> np.ndarray:
    """The single colour of a processed solid image, after checking that every pixel has it."""
    pixel_values = image_processor(image, **kwargs)["pixel_values"].numpy()
    colour = pixel_values[0, :, 0, 0]
    np.testing.assert_array_equal(pixel_values[0], np.broadcast_to(colour[:, None, None], pixel_values[0].shape))
    return colour


def random_rgb(height=40, width=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# --- the arithmetic ------------------------------------------------------------------------------------------------


def test_solid_colour_is_rescaled_and_normalised_with_clip_mean_and_std(image_processor):
    pixel_values = image_processor(PIL.Image.new("RGB", (50, 30), (10, 128, 250)))["pixel_values"]

    assert pixel_values.shape == (1, 3, 224, 224)
    assert pixel_values.dtype == torch.float32
    expected = np.broadcast_to(expected_pixel_values((10, 128, 250))[:, None, None], (3, 224, 224))
    np.testing.assert_allclose(pixel_values[0].numpy(), expected, rtol=0, atol=1e-6)


def test_resize_is_bicubic_to_the_size_in_the_config():
    image = PIL.Image.fromarray(random_rgb())
    image_processor = Blip2BridgeImageProcessor(size={"height": 64, "width": 96})

    pixel_values = image_processor([image, image])["pixel_values"]

    assert pixel_values.shape == (2, 3, 64, 96)
    resized = np.asarray(image.resize((96, 64), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
    expected = ((resized / 255 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(pixel_values[1].numpy(), expected, rtol=0, atol=1e-6)


def test_size_given_at_call_time_overrides_the_default(image_processor):
    pixel_values = image_processor(PIL.Image.new("RGB", (8, 8)), size={"height": 32, "width": 48})["pixel_values"]

    assert pixel_values.shape == (1, 3, 32, 48)


def test_defaults_are_blip2s_224_bicubic_clip_normalisation(image_processor):
    assert dict(image_processor.size) == {"height": 224, "width": 224}
    assert image_processor.resample == PIL.Image.Resampling.BICUBIC
    assert image_processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(image_processor.image_mean) == tuple(OPENAI_CLIP_MEAN)
    assert tuple(image_processor.image_std) == tuple(OPENAI_CLIP_STD)
    assert image_processor.backend == "pil"  # never needs torchvision


# --- PIL modes -----------------------------------------------------------------------------------------------------


def test_grayscale_image_gives_three_identical_channels(image_processor):
    gray = np.random.default_rng(1).integers(0, 256, size=(30, 40), dtype=np.uint8)

    pixel_values = image_processor(PIL.Image.fromarray(gray, mode="L"))["pixel_values"][0]
    as_rgb = image_processor(PIL.Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)))["pixel_values"][0]

    # Identical 8-bit values in each channel; they differ after normalisation only by each channel's mean and std.
    unnormalised = pixel_values.numpy() * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    np.testing.assert_allclose(unnormalised[0], unnormalised[1], atol=1e-6)
    np.testing.assert_allclose(unnormalised[0], unnormalised[2], atol=1e-6)
    torch.testing.assert_close(pixel_values, as_rgb, rtol=0, atol=0)


def test_transparent_pixels_are_composited_onto_white(image_processor):
    transparent = PIL.Image.new("RGBA", (16, 16), (200, 0, 0, 0))
    half = PIL.Image.new("RGBA", (16, 16), (200, 0, 0, 128))
    opaque = PIL.Image.new("RGBA", (16, 16), (200, 0, 0, 255))

    np.testing.assert_allclose(solid(image_processor, transparent), expected_pixel_values((255, 255, 255)), atol=1e-6)
    # alpha * colour + (1 - alpha) * white, rounded to 8 bits: 128/255 * 200 + 127/255 * 255 = 227.4; 0 -> 127
    np.testing.assert_allclose(solid(image_processor, half), expected_pixel_values((227, 127, 127)), atol=1e-6)
    np.testing.assert_allclose(solid(image_processor, opaque), expected_pixel_values((200, 0, 0)), atol=1e-6)


def test_gray_with_alpha_is_composited_onto_white(image_processor):
    transparent_black = PIL.Image.new("LA", (8, 8), (0, 0))

    np.testing.assert_allclose(solid(image_processor, transparent_black), expected_pixel_values((255,) * 3), atol=1e-6)


def test_palette_image_uses_its_palette_and_its_transparent_colour(image_processor):
    palette_image = PIL.Image.new("P", (8, 8), 0)
    palette_image.putpalette([30, 60, 90, 255, 0, 0])
    palette_image.info["transparency"] = 1
    transparent = palette_image.copy()
    transparent.info["transparency"] = 0

    np.testing.assert_allclose(solid(image_processor, palette_image), expected_pixel_values((30, 60, 90)), atol=1e-6)
    np.testing.assert_allclose(solid(image_processor, transparent), expected_pixel_values((255, 255, 255)), atol=1e-6)


def test_one_bit_image_is_black_and_white(image_processor):
    black, white = PIL.Image.new("1", (8, 8), 0), PIL.Image.new("1", (8, 8), 1)

    np.testing.assert_allclose(solid(image_processor, black), expected_pixel_values((0, 0, 0)), atol=1e-6)
    np.testing.assert_allclose(solid(image_processor, white), expected_pixel_values((255, 255, 255)), atol=1e-6)


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((0, 0, 0, 0), (255, 255, 255)),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 0, 0, 255), (0, 0, 0)),
        # PIL: 255 - min(255, c * (255 - k) / 255 + k), per channel
        ((128, 64, 32, 16), (119, 179, 209)),
    ],
)
def test_cmyk_converts_to_the_rgb_pil_gives(image_processor, cmyk, rgb):
    image = PIL.Image.new("CMYK", (8, 8), cmyk)

    np.testing.assert_allclose(solid(image_processor, image), expected_pixel_values(rgb), atol=1e-6)


def test_ycbcr_image_converts_to_its_rgb(image_processor):
    rgb_image = PIL.Image.fromarray(random_rgb(seed=3))
    ycbcr = rgb_image.convert("YCbCr")

    torch.testing.assert_close(
        image_processor(ycbcr)["pixel_values"],
        image_processor(ycbcr.convert("RGB"))["pixel_values"],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_white_is_white_not_clipped(image_processor, mode):
    # 65535 / 257 = 255: 16-bit white, mid grey and a dark grey land on the same 8-bit values as their 8-bit twins.
    sixteen_bit = np.array([[65535, 32896], [257 * 40, 0]], dtype=np.uint16)
    eight_bit = np.array([[255, 128], [40, 0]], dtype=np.uint8)
    if mode == "I":  # how Pillow < 11 opens 16-bit PNGs
        image = PIL.Image.fromarray(sixteen_bit.astype(np.int32))
    else:  # PIL's own conversion between 16-bit modes clips at 255, so build the bytes directly
        image = PIL.Image.frombytes(mode, (2, 2), sixteen_bit.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    assert image.mode == mode

    no_resize = {"do_resize": False, "do_normalize": False}
    pixel_values = image_processor(image, **no_resize)["pixel_values"]

    assert pixel_values[0, 0, 0, 0].item() == 1.0  # 65535 rescales to 1.0, as 255 does for 8-bit images
    eight_bit_pixel_values = image_processor(PIL.Image.fromarray(eight_bit), **no_resize)["pixel_values"]
    torch.testing.assert_close(pixel_values, eight_bit_pixel_values, rtol=0, atol=0)


def test_sixteen_bit_png_file_is_scaled_not_clipped(image_processor, tmp_path):
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(path)

    np.testing.assert_allclose(solid(image_processor, str(path)), expected_pixel_values((100,) * 3), atol=1e-6)


def test_32_bit_image_beyond_16_bits_is_refused_not_clipped(image_processor):
    image = PIL.Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))

    message = r"images\[0\] \(PIL mode 'I'\) has values in \[70000, 70000\]; expected \[0, 65535\] \(16-bit\)"
    with pytest.raises(ValueError, match=message):
        image_processor(image)


def test_mode_i_image_with_8_bit_values_is_read_as_8_bit(image_processor):
    # Image.convert("I") and Image.fromarray(int32) keep 8-bit values; reading them as 16-bit made them nearly black.
    eight_bit = np.array([[255, 128], [40, 0]], dtype=np.uint8)
    image = PIL.Image.fromarray(eight_bit).convert("I")
    assert image.mode == "I"

    no_resize = {"do_resize": False, "do_normalize": False}
    pixel_values = image_processor(image, **no_resize)["pixel_values"]

    assert pixel_values[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    eight_bit_pixel_values = image_processor(PIL.Image.fromarray(eight_bit), **no_resize)["pixel_values"]
    torch.testing.assert_close(pixel_values, eight_bit_pixel_values, rtol=0, atol=0)


def test_float_mode_image_in_unit_range_is_scaled_by_255(image_processor):
    image = PIL.Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))

    np.testing.assert_allclose(solid(image_processor, image), expected_pixel_values((128,) * 3), atol=1e-6)


# --- arrays and tensors --------------------------------------------------------------------------------------------


def test_numpy_and_torch_inputs_give_the_same_pixel_values_as_pil(image_processor):
    rgb = random_rgb()
    from_pil = image_processor(PIL.Image.fromarray(rgb))["pixel_values"]

    same_image = {
        "numpy HWC uint8": rgb,
        "numpy CHW uint8": rgb.transpose(2, 0, 1),
        "numpy HWC float in [0, 1]": rgb.astype(np.float32) / 255,
        "numpy HWC uint16": rgb.astype(np.uint16) * 257,
        "numpy HWC int64": rgb.astype(np.int64),
        "torch CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch CHW float in [0, 1]": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "torch CHW float16 in [0, 1]": torch.from_numpy(rgb).permute(2, 0, 1).half() / 255,
    }
    for name, image in same_image.items():
        torch.testing.assert_close(image_processor(image)["pixel_values"], from_pil, rtol=0, atol=0, msg=name)


def test_batched_arrays_and_tensors_are_split_into_images(image_processor):
    rgbs = [random_rgb(seed=seed) for seed in range(3)]
    from_pil = image_processor([PIL.Image.fromarray(rgb) for rgb in rgbs])["pixel_values"]

    numpy_batch = np.stack(rgbs)  # (batch, height, width, channels)
    torch_batch = torch.from_numpy(numpy_batch).permute(0, 3, 1, 2)  # (batch, channels, height, width)

    assert from_pil.shape == (3, 3, 224, 224)
    torch.testing.assert_close(image_processor(numpy_batch)["pixel_values"], from_pil, rtol=0, atol=0)
    torch.testing.assert_close(image_processor(torch_batch)["pixel_values"], from_pil, rtol=0, atol=0)


def test_two_dimensional_array_is_a_grayscale_image(image_processor):
    gray = np.random.default_rng(2).integers(0, 256, size=(30, 40), dtype=np.uint8)

    torch.testing.assert_close(
        image_processor(gray)["pixel_values"],
        image_processor(PIL.Image.fromarray(gray, mode="L"))["pixel_values"],
        rtol=0,
        atol=0,
    )


def test_rgba_array_is_composited_onto_white_like_pil(image_processor):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128

    torch.testing.assert_close(
        image_processor(rgba)["pixel_values"],
        image_processor(PIL.Image.fromarray(rgba, mode="RGBA"))["pixel_values"],
        rtol=0,
        atol=0,
    )


def test_large_image_in_memory_is_resized_to_the_model_size(image_processor):
    image = PIL.Image.new("RGB", (6000, 4000), (10, 20, 30))

    np.testing.assert_allclose(solid(image_processor, image), expected_pixel_values((10, 20, 30)), atol=1e-6)


def smooth_rgb(height, width) -> np.ndarray:
    """A photo-like image: smooth gradients with some texture, so that resampling differences show but stay small."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x + 2 * y), np.cos(4 * y - 3 * x), np.sin(9 * x * y + 1)]
    return np.rint(np.stack(channels, axis=-1) * 100 + 127).astype(np.uint8)


def test_image_far_larger_than_the_target_is_resized_as_pil_does_with_reducing_gap_3():
    # 8x8 target: from 48 pixels up (2 x 3 x 8), an axis is box-reduced before the bicubic filter.
    image_processor = Blip2BridgeImageProcessor(size={"height": 8, "width": 8}, do_normalize=False)
    pixels = smooth_rgb(150, 200)  # reduced by 200 // 24 = 8 across and 150 // 24 = 6 down
    expected = np.asarray(PIL.Image.fromarray(pixels).resize((8, 8), PIL.Image.BICUBIC, reducing_gap=3))
    plain_resize = np.asarray(PIL.Image.fromarray(pixels).resize((8, 8), PIL.Image.BICUBIC))

    for image in (PIL.Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1)):
        pixel_values = image_processor(image)["pixel_values"][0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(pixel_values * 255, expected, atol=1e-3)
    difference = np.abs(expected.astype(int) - plain_resize)
    assert difference.max() <= 2 and difference.mean() < 0.5  # 8-bit levels away from the plain resize


def test_array_reduced_in_bands_gives_the_pixels_of_the_whole_image():
    from modeling_blip2.processing.image_processing_blip2_bridge import EarlyResize

    pixels = smooth_rgb(900, 10000)  # factors (416, 37): bands of 37 x 11 rows, the last one partial
    early_resize = EarlyResize({"do_resize": True, "size": SizeDict(height=8, width=8)})
    expected = np.asarray(PIL.Image.fromarray(pixels).resize((8, 8), PIL.Image.BICUBIC, reducing_gap=3))

    np.testing.assert_array_equal(early_resize.array(pixels), expected)
    gray = np.asarray(PIL.Image.fromarray(pixels[..., 0]).resize((8, 8), PIL.Image.BICUBIC, reducing_gap=3))
    np.testing.assert_array_equal(early_resize.array(pixels[..., :1])[..., 0], gray)


def test_image_below_three_times_the_target_is_resized_exactly_as_before(image_processor):
    pixels = smooth_rgb(480, 640)  # 640 // 672 = 0: no reduction at the default 224x224
    no_normalize = {"do_normalize": False}
    plain_resize = np.asarray(PIL.Image.fromarray(pixels).resize((224, 224), PIL.Image.BICUBIC))

    pixel_values = image_processor(PIL.Image.fromarray(pixels), **no_normalize)["pixel_values"][0]
    np.testing.assert_allclose(pixel_values.permute(1, 2, 0).numpy() * 255, plain_resize, atol=1e-3)


# --- refused inputs ------------------------------------------------------------------------------------------------


def test_zero_size_image_is_refused_naming_its_index_and_size(image_processor):
    good = PIL.Image.new("RGB", (8, 8))

    with pytest.raises(ValueError, match=r"images\[1\] has size 0x7 \(width x height\); expected at least 1x1"):
        image_processor([good, PIL.Image.new("RGB", (0, 7))])
    with pytest.raises(ValueError, match=r"images\[0\] has size 5x0"):
        image_processor(np.zeros((0, 5, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("shape", "channels"),
    [((8, 8, 2), 2), ((8, 8, 5), 5), ((6, 8, 8), 6), ((8, 8, 0), 0)],
)
def test_unsupported_channel_count_is_refused_naming_it(image_processor, shape, channels):
    message = rf"images\[0\] has {channels} channels .*expected 1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\)"
    with pytest.raises(ValueError, match=message):
        image_processor(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(1, 1, 3), (4, 20, 3), (3, 30, 4), (1, 8, 1)])
def test_shape_with_two_possible_channel_axes_is_refused_asking_for_input_data_format(image_processor, shape):
    message = (
        re.escape(f"images[0] has shape {shape}, whose first and last axes could both be the channels; ")
        + r'pass input_data_format="channels_last" \(height, width, channels\) or "channels_first"'
    )
    with pytest.raises(ValueError, match=message):
        image_processor(np.zeros(shape, dtype=np.uint8))


def test_red_pixel_and_red_image_stay_red_with_input_data_format(image_processor):
    no_normalize = {"do_normalize": False, "size": {"height": 2, "width": 2}}
    red_pixel = np.zeros((1, 1, 3), dtype=np.uint8)
    red_pixel[..., 0] = 255
    red_image = np.zeros((4, 20, 3), dtype=np.uint8)
    red_image[..., 0] = 255

    for image in (red_pixel, red_image, torch.from_numpy(red_image)):
        pixel_values = image_processor(image, input_data_format="channels_last", **no_normalize)["pixel_values"]
        assert pixel_values[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    # The same image channels first, named as such.
    first = image_processor(np.moveaxis(red_image, -1, 0), input_data_format="channels_first", **no_normalize)
    assert first["pixel_values"][0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_unambiguous_shapes_still_need_no_input_data_format(image_processor):
    no_normalize = {"do_normalize": False, "size": {"height": 2, "width": 2}}
    red_last = np.zeros((5, 20, 3), dtype=np.uint8)
    red_last[..., 0] = 255
    red_first = np.ascontiguousarray(np.moveaxis(red_last, -1, 0))  # (3, 5, 20)

    for image in (red_last, red_first):
        assert image_processor(image, **no_normalize)["pixel_values"][0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_array_of_wrong_rank_is_refused_naming_its_shape(image_processor):
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(8,\); expected \(height, width\)"):
        image_processor(np.zeros(8, dtype=np.uint8))


def test_float_image_outside_unit_range_is_refused_not_clipped(image_processor):
    with pytest.raises(ValueError, match=r"images\[0\] has float32 values in \[0, 200\]; expected \[0, 1\]"):
        image_processor(np.linspace(0, 200, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3))
    with pytest.raises(ValueError, match=r"images\[0\] has NaN or infinite float64 values"):
        image_processor(np.full((8, 8, 3), np.nan))


def test_integer_image_outside_8_bits_is_refused(image_processor):
    with pytest.raises(ValueError, match=r"images\[0\] has int64 values in \[-1, 300\]; expected \[0, 255\]"):
        image_processor(np.array([[-1, 300], [0, 0]], dtype=np.int64))


def test_object_that_is_no_image_is_refused_naming_its_type(image_processor):
    with pytest.raises(TypeError, match=r"images\[1\] is a dict; expected a PIL image, a numpy array, a torch tensor"):
        image_processor([PIL.Image.new("RGB", (8, 8)), {"pixels": 1}])


def test_empty_list_of_images_is_refused(image_processor):
    with pytest.raises(ValueError, match="images is empty; expected at least one image"):
        image_processor([])


def test_truncated_image_file_is_refused_naming_the_image(image_processor, tmp_path):
    buffer = io.BytesIO()
    PIL.Image.fromarray(random_rgb(height=64, width=64)).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[:200])

    with pytest.raises(ValueError, match=r"truncated\.png could not be decoded; the file is corrupt or truncated"):
        image_processor(str(path))
    # A file opened by the caller decodes only when processed: the error names its place in the batch.
    with pytest.raises(ValueError, match=r"images\[1\] could not be decoded; the file is corrupt or truncated"):
        image_processor([PIL.Image.new("RGB", (8, 8)), PIL.Image.open(path)])


def test_missing_image_file_is_reported_as_missing_not_as_bad_base64(image_processor, tmp_path):
    for path in (str(tmp_path / "cat.jpg"), tmp_path / "cat.jpg", "images/cat", "cats"):  # "cats" is valid base64
        message = r"image file \S*cats?(\.jpg)? does not exist \(nor is it a URL or a base64"
        with pytest.raises(ValueError, match=message):
            image_processor(path)
    # A base64 string still goes through transformers' load_image.
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    pixel_values = image_processor(encoded, do_normalize=False, size={"height": 2, "width": 2})["pixel_values"]
    assert pixel_values[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_file_that_is_no_image_is_refused_naming_the_path(image_processor, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")

    with pytest.raises(ValueError, match=r"notes\.png is not an image file PIL can read"):
        image_processor(str(path))


def test_decompression_bomb_file_is_refused_with_a_clear_error(image_processor, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    PIL.Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is over twice the limit: PIL refuses

    with pytest.raises(ValueError, match=r"big\.png is too large to open safely.*raise PIL\.Image\.MAX_IMAGE_PIXELS"):
        image_processor(str(path))


# --- saving and loading --------------------------------------------------------------------------------------------


def test_image_processor_round_trip_keeps_settings_and_outputs(tmp_path):
    image_processor = Blip2BridgeImageProcessor(size={"height": 364, "width": 364})
    image = PIL.Image.fromarray(random_rgb())
    image_processor.save_pretrained(tmp_path)

    for loaded in (Blip2BridgeImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Blip2BridgeImageProcessor
        assert dict(loaded.size) == {"height": 364, "width": 364}
        expected = image_processor(image)["pixel_values"]
        torch.testing.assert_close(loaded(image)["pixel_values"], expected, rtol=0, atol=0)


# --- Blip2BridgeProcessor ------------------------------------------------------------------------------------------


def test_processor_returns_pixel_values_and_q_former_tokens(processor):
    images = [PIL.Image.fromarray(random_rgb(seed=seed)) for seed in range(3)]

    inputs = processor(images=images, text=CAPTIONS)

    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}  # the Q-Former has no token types
    assert processor.model_input_names == ["pixel_values", "input_ids", "attention_mask"]
    torch.testing.assert_close(inputs["pixel_values"], processor.image_processor(images)["pixel_values"])
    tokenizer = processor.tokenizer
    expected_ids = [tokenizer(caption)["input_ids"] for caption in CAPTIONS]
    longest = max(len(ids) for ids in expected_ids)
    assert inputs["input_ids"].shape == (3, longest)  # padded to the longest text
    for row, ids in enumerate(expected_ids):
        assert inputs["input_ids"][row].tolist() == ids + [tokenizer.pad_token_id] * (longest - len(ids))
        assert inputs["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (longest - len(ids))
    assert (inputs["input_ids"][:, 0] == tokenizer.cls_token_id).all()


def test_processor_passes_image_settings_to_the_image_processor(processor):
    inputs = processor(images=PIL.Image.new("RGB", (8, 8)), text="a cat", size={"height": 32, "width": 32})

    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_processor_takes_images_or_text_alone(processor):
    assert set(processor(images=PIL.Image.new("RGB", (8, 8)))) == {"pixel_values"}
    assert set(processor(text=CAPTIONS)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="needs images, text or both; got neither"):
        processor()


def test_a_single_string_goes_with_every_image(processor):
    images = [PIL.Image.new("RGB", (8, 8), (value, 0, 0)) for value in (0, 100, 200)]

    inputs = processor(images=images, text="a photo of")

    assert inputs["input_ids"].shape[0] == 3
    assert (inputs["input_ids"] == inputs["input_ids"][0]).all()


def test_batch_size_mismatch_is_refused_naming_both_sizes(processor):
    images = [PIL.Image.new("RGB", (8, 8))] * 3

    with pytest.raises(ValueError, match="got 3 images and 2 texts; expected one text per image"):
        processor(images=images, text=CAPTIONS[:2])


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("", ValueError, r"text is ''; expected a non-empty string"),
        ([], ValueError, r"text is an empty list; expected at least one string"),
        (["a cat", "   "], ValueError, r"text\[1\] is '   '; expected a non-empty string"),
        (["a cat", 7], TypeError, r"text\[1\] is a int; expected a string"),
        (7, TypeError, r"text is a int; expected a string or a list of strings"),
    ],
)
def test_empty_or_non_string_text_is_refused_naming_it(processor, text, error, message):
    with pytest.raises(error, match=message):
        processor(text=text)


def test_long_text_is_truncated_to_max_length_keeping_sep_last(processor):
    long_caption = "a cat sitting on a red sofa " * 20
    sep = processor.tokenizer.sep_token_id

    # BLIP-2's max_txt_len of 32 applies (tests/test_recipe_training.py: also with a 512-token tokenizer).
    assert processor.max_text_length == 32
    default = processor(text=long_caption)["input_ids"]
    short = processor(text=[long_caption, "a cat"], max_length=8)["input_ids"]

    assert default.shape == (1, 32) and default[0, -1] == sep
    assert short.shape == (2, 8) and short[0, -1] == sep
    assert short[0].tolist() == default[0, :7].tolist() + [sep]


def test_tokenizer_model_max_length_below_32_caps_the_stage1_length():
    tokenizer = make_bert_tokenizer()
    tokenizer.model_max_length = 12
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer)

    assert processor.max_text_length == 12
    assert processor(text="a cat sitting on a red sofa " * 20)["input_ids"].shape == (1, 12)


def test_decode_and_batch_decode_use_the_tokenizer(processor):
    input_ids = processor(text=CAPTIONS)["input_ids"]

    assert processor.batch_decode(input_ids, skip_special_tokens=True) == CAPTIONS
    assert processor.decode(input_ids[1], skip_special_tokens=True) == CAPTIONS[1]


def test_processor_without_cls_token_is_refused():
    tokenizer = make_bert_tokenizer()
    tokenizer.cls_token = None

    with pytest.raises(ValueError, match=r"tokenizer BertTokenizer has no \[CLS\] token"):
        Blip2BridgeProcessor(Blip2BridgeImageProcessor(), tokenizer)


def test_processor_round_trip_gives_identical_outputs(tmp_path):
    image_processor = Blip2BridgeImageProcessor(size={"height": 96, "width": 96})
    processor = Blip2BridgeProcessor(image_processor, make_bert_tokenizer())
    images = [PIL.Image.fromarray(random_rgb(seed=seed)) for seed in range(3)]
    expected = processor(images=images, text=CAPTIONS)
    processor.save_pretrained(tmp_path)

    for loaded in (Blip2BridgeProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Blip2BridgeProcessor
        assert type(loaded.image_processor) is Blip2BridgeImageProcessor
        assert loaded.tokenizer.bos_token == "[DEC]"
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        outputs = loaded(images=images, text=CAPTIONS)
        assert set(outputs) == set(expected)
        for name in expected:
            torch.testing.assert_close(outputs[name], expected[name], rtol=0, atol=0)
