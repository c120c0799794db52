"""Training augmentation of BLIP-2 without torchvision: random resized crop and horizontal flip on PIL images, and
BLIP's RandomAugment for Visual Genome.

LAVIS's `Blip2ImageTrainProcessor` applies torchvision's `RandomResizedCrop(size, scale=(0.5, 1.0),
interpolation=BICUBIC)` and `RandomHorizontalFlip()`, then `ToTensor` and the CLIP normalisation. Here the crop and the
flip are restated on PIL images, drawing their random numbers in torchvision's order and with the same torch calls (so
a seeded run draws the same crops), and the project's `Blip2BridgeImageProcessor` does the rest (RGB conversion,
rescale, normalisation) with its resize switched off: the crop is already resized to the processor's `size`.

The BLIP-2 pre-training configs (lavis/projects/blip2/train/pretrain_stage{1,2}.yaml) give COCO that processor and
Visual Genome BLIP's `BlipImageTrainProcessor` (lavis/processors/blip_processors.py), which adds
`RandomAugment(2, 5, isPIL=True, augs=[...])` (lavis/processors/randaugment.py) after the flip. `RandomAugment` below
restates those ops in numpy, including OpenCV's fixed-point bilinear warp that LAVIS's geometric ops go through.
"""

import math

import numpy as np
import PIL.Image
import torch

from ..processing import Blip2BridgeImageProcessor
from ..processing.image_processing_blip2_bridge import REDUCING_GAP


class RandomResizedCropAndFlip:
    r"""
    `transform(images) -> pixel_values` for training: each image is converted to RGB by the image processor's own
    rules (16-bit, transparency, CMYK, ...), cropped to a random area and aspect ratio, resized to the processor's
    `size` with bicubic resampling, flipped left-right with probability `flip_probability`, then rescaled and
    normalised by the image processor.

    Args:
        image_processor: a [`Blip2BridgeImageProcessor`]; its `size` is the output size.
        scale: the range of the crop's area as a fraction of the image's area (LAVIS: 0.5-1.0).
        ratio: the range of the crop's aspect ratio width / height, drawn log-uniformly (torchvision's 3/4-4/3).
        flip_probability: the chance of a horizontal flip.
        random_augment: a [`RandomAugment`] applied after the flip, as LAVIS does for Visual Genome; None (COCO and
            the web corpora in LAVIS's BLIP-2 configs) for none.
        generator: a `torch.Generator` for reproducible crops. Without one, torch's global generator is used, which
            DataLoader seeds differently in every worker; a generator passed in is copied into each worker as it is,
            so the workers would draw the same crops: pass one for single-process use (tests, previews).
    """

    def __init__(
        self,
        image_processor: Blip2BridgeImageProcessor,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
        random_augment: "RandomAugment | None" = None,
        generator: torch.Generator | None = None,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale is {scale}; expected 0 < min <= max <= 1 (fractions of the image's area)")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio is {ratio}; expected 0 < min <= max (width / height)")
        if not 0 <= flip_probability <= 1:
            raise ValueError(f"flip_probability is {flip_probability}; expected a probability in [0, 1]")
        self.image_processor = image_processor
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_probability = flip_probability
        self.random_augment = random_augment
        self.generator = generator

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of every augmented image: the image processor's `size`."""
        size = self.image_processor.size
        return size["width"], size["height"]

    def augment(self, image, image_name: str = "image") -> PIL.Image.Image:
        """One image (anything the image processor accepts) in, one cropped, resized, maybe flipped RGB image out."""
        if isinstance(image, PIL.Image.Image) and image.mode in ("RGB", "L"):
            # A huge image is first box-reduced by whole factors to no less than REDUCING_GAP times the output size,
            # as the image processor does, so that no full-size copy follows its decoding; a crop of the reduced
            # image still holds more pixels than the output.
            output_width, output_height = self.output_size
            factors = (max(1, image.width // (output_width * REDUCING_GAP)),
                       max(1, image.height // (output_height * REDUCING_GAP)))  # fmt: skip
            if factors != (1, 1):
                image = image.reduce(factors)
        pixels = self.image_processor.process_image(image, do_convert_rgb=True, image_name=image_name)
        image = PIL.Image.fromarray(np.moveaxis(pixels, 0, -1))
        left, top, width, height = random_resized_crop_box(
            image.width, image.height, self.scale, self.ratio, self.generator
        )
        # Crop, then resize (not PIL's resize with a box, which lets the filter read pixels outside the crop).
        image = image.crop((left, top, left + width, top + height))
        image = image.resize(self.output_size, PIL.Image.Resampling.BICUBIC)
        if torch.rand(1, generator=self.generator).item() < self.flip_probability:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        if self.random_augment is not None:
            image = self.random_augment(image)
        return image

    def __call__(self, images) -> torch.Tensor:
        """A list of images (or one image) in, (batch, 3, height, width) normalised `pixel_values` out."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        augmented = [self.augment(image, image_name=f"images[{index}]") for index, image in enumerate(images)]
        return self.image_processor(augmented, do_resize=False, return_tensors="pt")["pixel_values"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.output_size}, scale={self.scale}, "
            f"ratio={tuple(round(r, 4) for r in self.ratio)}, flip_probability={self.flip_probability}"
            + (f", random_augment={self.random_augment}" if self.random_augment is not None else "")
            + ")"
        )


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """
    (left, top, crop width, crop height) of a crop covering a random fraction `scale` of the image's area with a
    log-uniform aspect ratio in `ratio`, drawn as torchvision's `RandomResizedCrop.get_params`: ten tries, then a
    central crop with the aspect ratio clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item()
            return left, top, crop_width, crop_height

    # Fallback for extreme aspect ratios: the largest central crop whose ratio lies in `ratio`.
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


# ---------------------------------------------------------------------------------------------------------------------
# RandomAugment (lavis/processors/randaugment.py). Images are (height, width, 3) uint8 arrays, as LAVIS's ops take them.

# randaugment.py's constants: levels run to MAX_LEVEL; translations move up to 10 pixels (not a fraction of the size);
# geometric ops fill with grey.
MAX_LEVEL = 10
TRANSLATE_PIXELS = 10
FILL = (128, 128, 128)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """
    `autocontrast_func` (cutoff 0) as it runs: meant to stretch each channel from [min, max] to [0, 255], but its
    offset `-low * scale` negates `low` as a uint8, which wraps to 256 - low. So a channel whose minimum is 0 is
    stretched, and any other is shifted up by (256 - low) * scale and mostly saturates at 255.
    """
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        channel = image[..., c]
        low, high = int(channel.min()), int(channel.max())
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            table = (np.arange(256) * scale + ((256 - low) % 256) * scale).clip(0, 255)
        out[..., c] = table.astype(np.uint8)[channel]
    return out


def equalize(image: np.ndarray) -> np.ndarray:
    """`equalize_func`: PIL's histogram equalisation per channel (the last non-empty bin is left out of the step)."""
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        channel = image[..., c]
        histogram = np.bincount(channel.ravel(), minlength=256)
        step = histogram[histogram != 0][:-1].sum() // 255
        if step == 0:
            out[..., c] = channel
            continue
        shifted = np.concatenate([[step // 2], histogram[:-1]])
        out[..., c] = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)[channel]
    return out


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """`brightness_func`: every value times `factor`, truncated to uint8."""
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return table[image]


def _smooth(image: np.ndarray) -> np.ndarray:
    """cv2.filter2D(image, -1, kernel) with the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, mirrored borders
    (OpenCV's default BORDER_REFLECT_101) and rounding to the nearest integer (no value lands on a half)."""
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = image.shape[:2]
    total = np.zeros(image.shape, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            total += kernel[dy, dx] * padded[dy : dy + height, dx : dx + width]
    return np.rint(total).clip(0, 255).astype(np.uint8)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """`sharpness_func`: blend with the smoothed image inside a one-pixel frame, which keeps its values."""
    if factor == 0.0:
        return _smooth(image)
    if factor == 1.0:
        return image
    out = image.astype(np.float32)
    smoothed = _smooth(image).astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = smoothed + np.float32(factor) * (out[1:-1, 1:-1] - smoothed)
    return out.astype(np.uint8)


def warp_affine(image: np.ndarray, matrix, fill=FILL) -> np.ndarray:
    """
    cv2.warpAffine(image, matrix, (width, height), flags=INTER_LINEAR, borderValue=fill) on uint8, bit for bit: the
    inverse map is evaluated in OpenCV's fixed point (source positions in 1/32 pixel, weights in 1/32768) and pixels
    outside the image count as `fill`.
    """
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    determinant = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    d = 1.0 / determinant if determinant != 0 else 0.0
    a11, a12, a21, a22 = m[1, 1] * d, -m[0, 1] * d, -m[1, 0] * d, m[0, 0] * d
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    height, width = image.shape[:2]
    ab_scale, round_delta = 1 << 10, (1 << 10) // 32 // 2
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    # saturate_cast<int>(double) rounds half to even, as np.rint does.
    x_delta, y_delta = np.rint(a11 * xs * ab_scale).astype(np.int64), np.rint(a21 * xs * ab_scale).astype(np.int64)
    x_row = np.rint((a12 * ys + b1) * ab_scale).astype(np.int64) + round_delta
    y_row = np.rint((a22 * ys + b2) * ab_scale).astype(np.int64) + round_delta
    x = (x_row[:, None] + x_delta[None, :]) >> 5  # source positions in 1/32 pixel
    y = (y_row[:, None] + y_delta[None, :]) >> 5
    x0, y0, fx, fy = x >> 5, y >> 5, x & 31, y & 31
    # Pad with the fill far enough that every position read lies inside the padded array.
    pad = int(max(np.abs(x0).max(), np.abs(y0).max(), height, width)) + 2
    padded = np.empty((height + 2 * pad, width + 2 * pad, image.shape[2]), dtype=np.int64)
    padded[:] = np.asarray(fill, dtype=np.int64)
    padded[pad : pad + height, pad : pad + width] = image
    x0, y0 = x0 + pad, y0 + pad
    weights = [(32 - fy) * (32 - fx), (32 - fy) * fx, fy * (32 - fx), fy * fx]  # x 32 = the 1/32768 weights
    corners = [padded[y0, x0], padded[y0, x0 + 1], padded[y0 + 1, x0], padded[y0 + 1, x0 + 1]]
    total = sum(32 * w[..., None] * corner for w, corner in zip(weights, corners))
    return ((total + (1 << 14)) >> 15).astype(np.uint8)


def rotate(image: np.ndarray, degrees: float, fill=FILL) -> np.ndarray:
    """`rotate_func`: counter-clockwise by `degrees` about (width / 2, height / 2) (cv2.getRotationMatrix2D)."""
    height, width = image.shape[:2]
    angle = math.radians(degrees)
    alpha, beta = math.cos(angle), math.sin(angle)
    cx, cy = width / 2, height / 2
    matrix = [[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]]
    return warp_affine(image, matrix, fill)


def shear_x(image: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    return warp_affine(image, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(image: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    return warp_affine(image, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(image: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    """`translate_x_func`: content moves left by `offset` pixels."""
    return warp_affine(image, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(image: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    return warp_affine(image, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def _no_args(level, random_state):
    return ()


def _enhance_args(level, random_state):
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _signed(magnitude, random_state, negative_when_above):
    # LAVIS flips the sign of shears and translations when random() > 0.5, of rotations when random() < 0.5.
    draw = random_state.random()
    return -magnitude if (draw > 0.5 if negative_when_above else draw < 0.5) else magnitude


def _shear_args(level, random_state):
    return (_signed((level / MAX_LEVEL) * 0.3, random_state, True), FILL)


def _translate_args(level, random_state):
    return (_signed((level / MAX_LEVEL) * float(TRANSLATE_PIXELS), random_state, True), FILL)


def _rotate_args(level, random_state):
    return (_signed((level / MAX_LEVEL) * 30, random_state, False), FILL)


# name: (op, level -> arguments), as randaugment.py's func_dict and arg_dict. Solarize, Color, Contrast and Posterize,
# which BLIP's list leaves out, are not restated.
RANDOM_AUGMENT_OPS = {
    "Identity": (lambda image: image, _no_args),
    "AutoContrast": (autocontrast, _no_args),
    "Equalize": (equalize, _no_args),
    "Rotate": (rotate, _rotate_args),
    "Brightness": (brightness, _enhance_args),
    "Sharpness": (sharpness, _enhance_args),
    "ShearX": (shear_x, _shear_args),
    "ShearY": (shear_y, _shear_args),
    "TranslateX": (translate_x, _translate_args),
    "TranslateY": (translate_y, _translate_args),
}
# BlipImageTrainProcessor's list, in its order (the order matters: np.random.choice draws indices into it).
BLIP_RANDOM_AUGMENT_OPS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Rotate",
)  # fmt: skip


class RandomAugment:
    r"""
    LAVIS's `RandomAugment(num_ops, magnitude, isPIL=True, augs=ops)`: `num_ops` ops drawn uniformly with replacement
    from `ops`, each applied with probability 0.5 at level `magnitude` (of 10). BLIP's Visual Genome setting is the
    default: `RandomAugment(2, 5)` over `BLIP_RANDOM_AUGMENT_OPS`. At level 5 Brightness and Sharpness get factor 1.0
    and leave the image as it is, as in the original; shears are +-0.15, translations +-5 pixels, rotations +-15
    degrees, filled with grey (128).

    Randomness comes from `random_state` (a `numpy.random.RandomState`) or, without one, numpy's global generator as in
    LAVIS, with the same calls in the same order: `np.random.seed(s)` before either draws the same ops and signs.
    Transformers' Trainer seeds numpy in every DataLoader worker.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 5,
        ops: tuple = BLIP_RANDOM_AUGMENT_OPS,
        random_state: np.random.RandomState | None = None,
    ):
        unknown = [name for name in ops if name not in RANDOM_AUGMENT_OPS]
        if unknown:
            raise ValueError(f"Unknown RandomAugment ops {unknown}; expected names from {list(RANDOM_AUGMENT_OPS)}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"magnitude is {magnitude}; expected a level in [0, {MAX_LEVEL}]")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = tuple(ops)
        self.random_state = random_state

    def __call__(self, image):
        """A PIL image or (height, width, 3) uint8 array in, the same kind out."""
        random_state = self.random_state if self.random_state is not None else np.random
        is_pil = isinstance(image, PIL.Image.Image)
        pixels = np.array(image) if is_pil else image
        for name in random_state.choice(self.ops, self.num_ops):
            if random_state.random() > 0.5:
                continue
            op, level_to_args = RANDOM_AUGMENT_OPS[name]
            pixels = op(pixels, *level_to_args(self.magnitude, random_state))
        return PIL.Image.fromarray(pixels) if is_pil else pixels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, ops={list(self.ops)})"


__all__ = [
    "BLIP_RANDOM_AUGMENT_OPS",
    "RANDOM_AUGMENT_OPS",
    "RandomAugment",
    "RandomResizedCropAndFlip",
    "random_resized_crop_box",
]
