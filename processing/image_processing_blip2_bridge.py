"""Image processor of blip2-bridge: any image in, the `pixel_values` BLIP-2's vision encoders expect out."""

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
    infer_channel_dimension_format,
    is_pil_image,
    load_image,
)
from transformers.utils import is_torch_tensor


# Grayscale, RGB and RGBA; anything else has no unambiguous meaning as a photograph.
SUPPORTED_CHANNEL_COUNTS = (1, 3, 4)
# PIL's own conversion to RGB clips these modes at 255 (and truncates F), which turns almost every 16-bit image white,
# so their pixels are scaled to 8 bits here instead. Mode "I" is how Pillow < 11 opens 16-bit PNGs: read as 16-bit.
SIXTEEN_BIT_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
FLOAT_PIL_MODE = "F"


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
      images go through PIL's conversion. 16-bit modes (I;16*, and I) are scaled by 255 / 65535, so 16-bit white
      stays white instead of PIL's clipping every value above 255 to white; mode F (32-bit float) must lie in [0, 1].
    - NumPy arrays and torch tensors, (height, width), (height, width, channels) or (channels, height, width) with 1, 3
      or 4 channels (4 = RGBA, composited onto white), or a batch of them with a leading batch axis. The dtype says the
      range: uint8 0-255, uint16 0-65535, float [0, 1], bool {0, 1}, other integers 0-255.
    - Paths to image files, opened with PIL in their own mode (so 16-bit and transparent files convert as above) and
      turned upright by their EXIF orientation; URLs and base64 strings go through transformers' `load_image`.

    Values outside these ranges are an error, not clipped: a float image in [0, 255] or a normalised tensor would
    otherwise turn silently into a white or black picture. Zero-size images, unsupported channel counts and objects
    that are not images are errors that name the image (`images[i]`, its index in the flattened batch) and the value.

    Huge images: files are opened under PIL's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`, about 89
    megapixels; PIL warns above it and refuses above twice it), reported as a `ValueError` that names the file; raise
    the limit if the file is trusted. Images already in memory are processed whatever their size, since the resize
    to `size` bounds everything after it.
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
        if is_pil_image(image):
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
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0))


def open_image(source: str | os.PathLike) -> PIL.Image.Image:
    """Opens an image file lazily, in its own mode, upright; refuses decompression bombs with a clear error."""
    try:
        if not os.path.isfile(source):
            return load_image(str(source))  # URLs and base64 strings
        image = PIL.Image.open(source)
        return PIL.ImageOps.exif_transpose(image)
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"image file {source!s} is too large to open safely: {error} If the file is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None)."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{source!s} is not an image file PIL can read") from error
    except OSError as error:  # reading the EXIF orientation decodes the file
        raise ValueError(f"{source!s} could not be decoded; the file is corrupt or truncated ({error})") from error


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
        if image.mode not in (*SIXTEEN_BIT_PIL_MODES, FLOAT_PIL_MODE):
            # convert_to_rgb composites transparency onto white
            return convert_to_rgb(image, return_numpy=True) if convert_rgb else np.asarray(image)
        pixels = np.asarray(image)
    except OSError as error:  # PIL decodes a file lazily, so corrupt or truncated data surfaces here
        raise ValueError(f"{image_name} could not be decoded; the file is corrupt or truncated ({error})") from error
    except ValueError as error:  # PIL has no conversion from this mode to RGB (e.g. "La")
        raise ValueError(f"{image_name} has PIL mode {image.mode!r}, which PIL cannot convert to RGB") from error
    if image.mode == FLOAT_PIL_MODE:
        return pixels  # float32, held to [0, 1] like any float image
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
        if pixels.shape[0] not in SUPPORTED_CHANNEL_COUNTS and pixels.shape[-1] not in SUPPORTED_CHANNEL_COUNTS:
            raise_channel_count_error(pixels, min(pixels.shape[0], pixels.shape[-1]), image_name)
        input_data_format = infer_channel_dimension_format(pixels, num_channels=SUPPORTED_CHANNEL_COUNTS)
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
