"""Training augmentation of BLIP-2 without torchvision: random resized crop and horizontal flip on PIL images.

LAVIS's `Blip2ImageTrainProcessor` applies torchvision's `RandomResizedCrop(size, scale=(0.5, 1.0),
interpolation=BICUBIC)` and `RandomHorizontalFlip()`, then `ToTensor` and the CLIP normalisation. Here the crop and the
flip are restated on PIL images, drawing their random numbers in torchvision's order and with the same torch calls (so
a seeded run draws the same crops), and the project's `Blip2BridgeImageProcessor` does the rest (RGB conversion,
rescale, normalisation) with its resize switched off: the crop is already resized to the processor's `size`.
"""

import math

import numpy as np
import PIL.Image
import torch

from ..processing import Blip2BridgeImageProcessor


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
        self.generator = generator

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of every augmented image: the image processor's `size`."""
        size = self.image_processor.size
        return size["width"], size["height"]

    def augment(self, image, image_name: str = "image") -> PIL.Image.Image:
        """One image (anything the image processor accepts) in, one cropped, resized, maybe flipped RGB image out."""
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
            f"ratio={tuple(round(r, 4) for r in self.ratio)}, flip_probability={self.flip_probability})"
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


__all__ = ["RandomResizedCropAndFlip", "random_resized_crop_box"]
