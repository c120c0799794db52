"""Image processor of blip2-bridge: any image in, the `pixel_values` BLIP-2's vision encoders expect out."""

import base64
import binascii
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    is_pil_image,
    load_image,
)
from transformers.utils import is_torch_tensor


# Grayscale, RGB and RGBA; anything else has no unambiguous meaning as a photograph.
SUPPORTED_CHANNEL_COUNTS = (1, 3, 4)
# PIL's own conversion to RGB clips these modes at 255 (and truncates F), which turns almost every 16-bit image white,
# so their pixels are scaled to 8 bits here instead.
SIXTEEN_BIT_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Mode "I" (32-bit integers) states no bit depth: Pillow < 11 opens 16-bit PNGs in it, `Image.convert("I")` and
# `Image.fromarray(int32 array)` give it 8-bit values. Its values are read as 8-bit when they fit, else as 16-bit.
INTEGER_PIL_MODE = "I"
FLOAT_PIL_MODE = "F"
# An image at least twice this many times the resize target along an axis is resized in `process_image` with PIL's
# `reducing_gap` (a box reduction by an integer factor, then the resampling filter on what is left): memory then
# follows the target, not the image (a 20000x20000 photo would otherwise be copied four times at full size), and PIL
# documents the result as indistinguishable from the plain resize. Smaller images, so every common photo size at
# 224x224, are resized as before.
REDUCING_GAP = 3


class Blip2BridgeImageProcessor(PilBackend):
    r"""
    Turns images into the `pixel_values` of a BLIP-2 model: converted to RGB, resized to `size` (224x224 in the paper)
    with bicubic resampling, rescaled to [0, 1] and normalised with the CLIP mean and standard deviation, which both
    EVA-CLIP ViT-g and CLIP ViT-L use.

    It is transformers' PIL/NumPy backend (so it never needs torchvision) with stricter input handling. Every image is
    first brought to 8-bit RGB, the precision the vision encoders were trained at:

    - PIL images of any mode. Modes with transparency (RGBA, LA, PA, P with a transparent colour) are composited onto
      white, like transformers' `convert_to_rgb` (LAVIS's `convert("RGB")` keeps whatever colour the transparent
      pixels store instead; fully opaque images are identical either way). CMYK, YCbCr, LAB, HSV, 1-bit and palette
      images go through PIL's conversion. 16-bit modes (I;16*) are scaled by 255 / 65535, so 16-bit white stays
      white instead of PIL's clipping every value above 255 to white. Mode I (32-bit integers, no stated bit depth)
      is read by its values: 8-bit when they all lie in 0-255, 16-bit when in 0-65535, an error beyond. Mode F
      (32-bit float) must lie in [0, 1].
    - NumPy arrays and torch tensors, (height, width), (height, width, channels) or (channels, height, width) with 1, 3
      or 4 channels (4 = RGBA, composited onto white), or a batch of them with a leading batch axis. The channel axis
      is the one of size 1, 3 or 4; when both the first and the last axis could be it (e.g. (1, 1, 3) or (4, 20, 3)),
      pass `input_data_format` ("channels_first" or "channels_last"), which is otherwise an error rather than a guess.
      The dtype says the range: uint8 0-255, uint16 0-65535, float [0, 1], bool {0, 1}, other integers 0-255.
    - Paths to image files, opened with PIL in their own mode (so 16-bit and transparent files convert as above) and
      turned upright by their EXIF orientation; URLs and base64 strings go through transformers' `load_image`. A
      string that is none of these is reported as a file that does not exist.

    Values outside these ranges are an error, not clipped: a float image in [0, 255] or a normalised tensor would
    otherwise turn silently into a white or black picture. Zero-size images, unsupported channel counts and objects
    that are not images are errors that name the image (`images[i]`, its index in the flattened batch) and the value.

    Huge images: files are opened under PIL's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`, about 89
    megapixels; PIL warns above it and refuses above twice it), reported as a `ValueError` that names the file; raise
    the limit if the file is trusted. Images already in memory are processed whatever their size. An RGB or
    grayscale image 6 or more times `size` along an axis is resized as soon as it is decoded, exactly as PIL's
    `resize(reducing_gap=3)` (a box reduction by an integer factor before the bicubic filter; arrays in bands of rows),
    so that memory stays near one decoded copy: a 20000x20000 image in memory needs about 5 MB more (PIL image) or
    20 MB (uint8 array) instead of 5 GB, a 10000x10000 PNG file one decoded copy (380 MB) instead of 1.3 GB. Smaller
    images are resized with the plain bicubic filter as before.
    """

    # A saved image processor carries this file and its `auto_map` (it imports nothing from blip2-bridge).
    _auto_class = "AutoImageProcessor"
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    # One (batch, 3, height, width) float32 tensor rather than transformers' default list of arrays.
    return_tensors = "pt"

    def fetch_images(self, images):
        """Opens the paths, URLs and base64 strings in `images`; anything else is checked later, with its index."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(item) for item in images]
        if isinstance(images, (str, os.PathLike)):
            return open_image(images)
        return images

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        images = flatten_images(self.fetch_images(images))
        if not images:
            raise ValueError("images is empty; expected at least one image")
        return images

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        # The base class maps `process_image` over the batch without the index, which the errors need.
        images = self._prepare_images_structure(images, expected_ndims=expected_ndims)
        return [
            self.process_image(image, *args, image_name=f"images[{index}]", **kwargs)
            for index, image in enumerate(images)
        ]

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        image_name: str = "image",
        **kwargs,
    ) -> np.ndarray:
        """Turns one image into a (channels, height, width) uint8 array, RGB when `do_convert_rgb`."""
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image)
        shrink = EarlyResize(kwargs)
        if is_pil_image(image):
            if image.mode in ("RGB", "L"):  # resized before the copy into an array; other modes after conversion
                image = shrink.image(image, image_name)
            pixels = pil_image_to_array(image, do_convert_rgb, image_name)
            input_data_format = ChannelDimension.LAST
        elif is_torch_tensor(image):
            pixels = tensor_to_array(image)
        elif isinstance(image, np.ndarray):
            pixels = image
        else:
            raise TypeError(
                f"{image_name} is a {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor or "
                "a path to an image file"
            )

        pixels = to_channels_last(pixels, input_data_format, image_name)
        height, width = pixels.shape[:2]
        check_not_empty(width, height, image_name)
        pixels = to_uint8(pixels, image_name)
        if do_convert_rgb:
            pixels = convert_to_rgb(pixels, return_numpy=True, input_data_format=ChannelDimension.LAST)
        pixels = shrink.array(pixels)
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0))


class EarlyResize:
    """
    The resize to `size` done as soon as an image is decoded, for images far larger than `size` (see REDUCING_GAP),
    exactly as `PIL.Image.resize(size, resample, reducing_gap=REDUCING_GAP)`: a box reduction by an integer factor per
    axis, then the resampling filter over the reduced image, with the fractional box that keeps the geometry exact.
    PIL images and arrays give the same pixels; the image processor's own resize then finds them at their size.
    """

    def __init__(self, settings: dict):
        size, resample = settings.get("size"), settings.get("resample", PILImageResampling.BICUBIC)
        resample = PILImageResampling.BICUBIC if resample is None else resample
        early = settings.get("do_resize") and size and size.height and size.width and isinstance(resample, int)
        self.size = (size.width, size.height) if early else None  # else the processor's resize does it all
        self.resample = resample

    def factors(self, width: int, height: int) -> tuple[int, int]:
        if self.size is None:
            return 1, 1
        return max(1, width // (self.size[0] * REDUCING_GAP)), max(1, height // (self.size[1] * REDUCING_GAP))

    def image(self, image: PIL.Image.Image, image_name: str) -> PIL.Image.Image:
        factors = self.factors(*image.size)
        if factors == (1, 1):
            return image
        try:
            return self.resize_reduced(image.reduce(factors), factors, *image.size)
        except OSError as error:  # PIL decodes a file lazily, so corrupt or truncated data surfaces here
            message = f"{image_name} could not be decoded; the file is corrupt or truncated ({error})"
            raise ValueError(message) from error

    def array(self, pixels: np.ndarray) -> np.ndarray:
        """
        The same for a (height, width, channels) uint8 array (RGBA is left to the plain resize), reduced in bands of
        whole blocks of rows, which give the same pixels as the whole image, so that no full-size copy is made.
        """
        height, width, channels = pixels.shape
        factors = self.factors(width, height)
        if factors == (1, 1) or channels not in (1, 3):
            return pixels
        band_height = factors[1] * max(1, (1 << 22) // (width * factors[1]))  # about 4 megapixels a band
        bands = (pixels[top : top + band_height] for top in range(0, height, band_height))
        reduced = [
            np.asarray(PIL.Image.fromarray(band[..., 0] if channels == 1 else band).reduce(factors)) for band in bands
        ]
        resized = np.asarray(self.resize_reduced(PIL.Image.fromarray(np.concatenate(reduced)), factors, width, height))
        return resized.reshape(*resized.shape[:2], channels)

    def resize_reduced(self, reduced: PIL.Image.Image, factors, width: int, height: int) -> PIL.Image.Image:
        # The last reduced row and column may cover fewer pixels than the factors; the box says where the image ends.
        return reduced.resize(self.size, self.resample, box=(0, 0, width / factors[0], height / factors[1]))


def open_image(source: str | os.PathLike) -> PIL.Image.Image:
    """Opens an image file lazily, in its own mode, upright; refuses decompression bombs with a clear error."""
    try:
        if not os.path.isfile(source):
            return load_url_or_base64(source)
        image = PIL.Image.open(source)
        PIL.ImageOps.exif_transpose(image, in_place=True)  # in place: a returned copy would double the memory
        return image
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"image file {source!s} is too large to open safely: {error} If the file is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None)."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{source!s} is not an image file PIL can read") from error
    except OSError as error:  # reading the EXIF orientation decodes the file
        raise ValueError(f"{source!s} could not be decoded; the file is corrupt or truncated ({error})") from error


def load_url_or_base64(source: str | os.PathLike) -> PIL.Image.Image:
    """
    transformers' `load_image` for an http(s) URL, a data URL or a base64 string. Anything else was meant as a file
    (`load_image` would call it bad base64, "Incorrect padding"): it is reported as a file that does not exist.
    """
    missing = f"image file {source!s:.200} does not exist (nor is it a URL or a base64-encoded image)"
    if not isinstance(source, str) or not source:
        raise ValueError(missing)  # os.PathLike: always meant as a file
    if source.startswith(("http://", "https://")):
        return load_image(source)
    encoded = source.split(",", 1)[-1] if source.startswith("data:image/") else source
    try:
        base64.b64decode("".join(encoded.split()), validate=True)
    except binascii.Error:  # "cat.jpg" or "images/cat": the "." or the length rules base64 out
        raise ValueError(missing) from None
    try:
        return load_image(source)
    except ValueError as error:  # valid base64 but not an image, e.g. a file name like "dogs"
        raise ValueError(missing) from error


def flatten_images(images) -> list:
    """One entry per image: nested lists are flattened and 4-d arrays or tensors split along their first axis."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if (isinstance(images, np.ndarray) or is_torch_tensor(images)) and images.ndim == 4:
        return list(images)
    return [images]


def pil_image_to_array(image: PIL.Image.Image, convert_rgb: bool, image_name: str) -> np.ndarray:
    """Decodes a PIL image into an array: RGB uint8 when converting, but 16-bit and float modes as stored."""
    width, height = image.size
    check_not_empty(width, height, image_name)
    try:
        if image.mode not in (*SIXTEEN_BIT_PIL_MODES, INTEGER_PIL_MODE, FLOAT_PIL_MODE):
            # convert_to_rgb composites transparency onto white
            return convert_to_rgb(image, return_numpy=True) if convert_rgb else np.asarray(image)
        pixels = np.asarray(image)
    except OSError as error:  # PIL decodes a file lazily, so corrupt or truncated data surfaces here
        raise ValueError(f"{image_name} could not be decoded; the file is corrupt or truncated ({error})") from error
    except ValueError as error:  # PIL has no conversion from this mode to RGB (e.g. "La")
        raise ValueError(f"{image_name} has PIL mode {image.mode!r}, which PIL cannot convert to RGB") from error
    if image.mode == FLOAT_PIL_MODE:
        return pixels  # float32, held to [0, 1] like any float image
    if image.mode == INTEGER_PIL_MODE and pixels.size and 0 <= pixels.min() and pixels.max() <= 255:
        return pixels.astype(np.uint8)
    check_range(pixels, 65535, f"{image_name} (PIL mode {image.mode!r})", "values", " (16-bit)")
    return pixels.astype(np.uint16)  # also drops the big-endian byte order of I;16B


def tensor_to_array(tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize < 4:
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


def to_channels_last(pixels: np.ndarray, input_data_format: str | ChannelDimension | None, image_name: str):
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(
            f"{image_name} has shape {tuple(pixels.shape)}; expected (height, width), (height, width, channels) or "
            "(channels, height, width), or a batch of those with a leading batch axis"
        )
    if input_data_format is None:
        first_fits, last_fits = (pixels.shape[axis] in SUPPORTED_CHANNEL_COUNTS for axis in (0, -1))
        if not first_fits and not last_fits:
            raise_channel_count_error(pixels, min(pixels.shape[0], pixels.shape[-1]), image_name)
        if first_fits and last_fits:
            # transformers guesses channels first here, which reads a (1, 1, 3) red pixel as a grey 1x3 image
            raise ValueError(
                f"{image_name} has shape {tuple(pixels.shape)}, whose first and last axes could both be the channels; "
                'pass input_data_format="channels_last" (height, width, channels) or "channels_first" '
                "(channels, height, width)"
            )
        input_data_format = ChannelDimension.FIRST if first_fits else ChannelDimension.LAST
    if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.shape[-1] not in SUPPORTED_CHANNEL_COUNTS:
        raise_channel_count_error(pixels, pixels.shape[-1], image_name)
    return pixels


def raise_channel_count_error(pixels: np.ndarray, channels: int, image_name: str):
    raise ValueError(
        f"{image_name} has {channels} channels (shape {tuple(pixels.shape)}); expected 1 (grayscale), 3 (RGB) or "
        "4 (RGBA) channels on the first or last axis"
    )


def check_not_empty(width: int, height: int, image_name: str):
    if width == 0 or height == 0:
        raise ValueError(f"{image_name} has size {width}x{height} (width x height); expected at least 1x1 pixels")


def check_range(pixels: np.ndarray, white: int, image_name: str, kind: str, hint: str = ""):
    """Refuses values outside [0, white] rather than clipping them, which would lose the picture silently."""
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise ValueError(f"{image_name} has NaN or infinite {kind}; expected [0, {white}]{hint}")
    smallest, largest = pixels.min(), pixels.max()
    if smallest < 0 or largest > white:
        raise ValueError(f"{image_name} has {kind} in [{smallest:.6g}, {largest:.6g}]; expected [0, {white}]{hint}")


def to_uint8(pixels: np.ndarray, image_name: str) -> np.ndarray:
    """Maps the full range of the dtype onto 0-255, so that white stays white whatever the bit depth."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint16:
        white, hint = 65535, " (16-bit)"
    elif np.issubdtype(pixels.dtype, np.floating):
        white, hint = 1, " (pass 0-255 data as uint8)"
    elif np.issubdtype(pixels.dtype, np.integer):
        white, hint = 255, " (pass 16-bit data as uint16)"
    else:
        raise TypeError(f"{image_name} has dtype {pixels.dtype}; expected uint8, uint16, bool, other integer or float")
    check_range(pixels, white, image_name, f"{pixels.dtype} values", hint)
    return np.rint(pixels.astype(np.float32) * np.float32(255 / white)).astype(np.uint8)


__all__ = ["Blip2BridgeImageProcessor"]
