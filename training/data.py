"""The bookkeeping of samples that cannot be read, and BLIP's text cleaning (`modeling_blip2.processing.text_cleaning`).

`SkippedSamples` counts the samples dropped because their image or text is unreadable. Its counts live in shared
memory, so that the samples skipped inside DataLoader worker processes reach the summary of the main process.
"""

import io
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Mapping

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..processing.text_cleaning import DEFAULT_MAX_WORDS, pre_caption, pre_question


logger = logging.getLogger(__name__)

# ---- unreadable samples -----------------------------------------------------------------------------------------


class UnreadableSampleError(ValueError):
    """A sample whose image or text cannot be used. `reason` is one of `SkippedSamples.REASONS`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class SkippedSamples:
    """
    Counts the samples skipped because they could not be read, by reason, and logs a warning naming each one (the
    first `max_warnings` of them; later ones only count, so that a corpus full of broken files does not flood the log).

    The counts are in shared memory: a counter created before the DataLoader starts its workers (as the collators and
    transforms of this package create theirs) sees the samples skipped in every worker.
    """

    REASONS = ("missing file", "corrupt image", "empty image", "bad text")

    def __init__(self, max_warnings: int = 20):
        # A fork-safe array of int64, one per reason, plus the number of samples that were used.
        self._counts = multiprocessing.Array("q", len(self.REASONS) + 1)
        self.max_warnings = max_warnings

    def skip(self, sample_name: str, error: Exception) -> None:
        reason = getattr(error, "reason", "corrupt image")
        index = self.REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += 1
            total = sum(self._counts[: len(self.REASONS)])
        if total <= self.max_warnings:
            logger.warning("skipped sample %s (%s): %s", sample_name, reason, error)
            if total == self.max_warnings:
                logger.warning("further skipped samples are counted without a warning each")

    def add_used(self, count: int) -> None:
        with self._counts.get_lock():
            self._counts[len(self.REASONS)] += count

    @property
    def counts(self) -> dict[str, int]:
        """The number of samples skipped for each reason."""
        return {reason: self._counts[index] for index, reason in enumerate(self.REASONS)}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def used(self) -> int:
        """The number of samples that went into a batch."""
        return self._counts[len(self.REASONS)]

    def summary(self) -> str:
        details = ", ".join(f"{count} {reason}" for reason, count in self.counts.items() if count)
        return f"{self.total} skipped" + (f" ({details})" if details else "") + f", {self.used} used"

    def __repr__(self) -> str:
        return f"SkippedSamples({self.summary()})"


def open_sample_image(image, sample_name: str = "image") -> PIL.Image.Image | np.ndarray:
    """
    Opens the image of a sample and decodes it fully, so that a truncated file fails here and not later inside a
    batch. Accepts a path, raw bytes, a `datasets` Image value left undecoded (`{"bytes": ..., "path": ...}`), a PIL
    image, a numpy array or a torch tensor; arrays and tensors are returned as they are (the image processor checks
    them). Raises `UnreadableSampleError` for a missing file, undecodable or truncated data and zero-size images.
    """
    if isinstance(image, Mapping):  # datasets.Image(decode=False)
        image = image["bytes"] if image.get("bytes") is not None else image.get("path")
    if image is None:
        raise UnreadableSampleError(f"{sample_name} has no image", "missing file")
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise UnreadableSampleError(f"{sample_name}: image file {image!s} does not exist", "missing file")
    is_empty_file = isinstance(image, (str, os.PathLike)) and os.path.getsize(image) == 0
    if is_empty_file or (isinstance(image, (bytes, bytearray)) and not image):
        raise UnreadableSampleError(f"{sample_name}: the image file is empty (0 bytes)", "empty image")
    try:
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            image = PIL.Image.open(image if isinstance(image, (str, os.PathLike)) else io.BytesIO(image))
            # Decodes the pixels, then turns them upright in place (a returned copy would double the memory).
            PIL.ImageOps.exif_transpose(image, in_place=True)
        elif isinstance(image, PIL.Image.Image):
            image = PIL.ImageOps.exif_transpose(image)  # a copy: the caller's image stays as it is
        if isinstance(image, PIL.Image.Image):
            image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        # PIL raises UnidentifiedImageError (an OSError) for unknown data, OSError for truncated data and SyntaxError
        # for some malformed headers.
        raise UnreadableSampleError(f"{sample_name} could not be decoded: {error}", "corrupt image") from error
    size = image.size if isinstance(image, PIL.Image.Image) else getattr(image, "shape", (1,))
    if 0 in tuple(size):
        raise UnreadableSampleError(f"{sample_name} has zero size {tuple(size)}", "empty image")
    return image


def sample_name(sample: Mapping, index: int, image_column: str = "image") -> str:
    """How a warning names a sample: its file, webdataset key or image id, else its position in the batch."""
    image = sample.get(image_column)
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Mapping) and image.get("path"):
        return str(image["path"])
    for key in ("__key__", "image_id", "id"):
        if sample.get(key) is not None:
            return f"{key}={sample[key]}"
    return f"batch[{index}]"


__all__ = [
    "DEFAULT_MAX_WORDS",
    "SkippedSamples",
    "UnreadableSampleError",
    "open_sample_image",
    "pre_caption",
    "pre_question",
    "sample_name",
]


def text_or_most_frequent(sample: Mapping, column: str) -> str:
    """The sample's text in `column`; for a list (VQAv2's ten annotators' answers), its most frequent entry, the first
    of equals. Anything else, or only blanks, is an `UnreadableSampleError` ("bad text") naming the column."""
    value = sample.get(column)
    if isinstance(value, (list, tuple)) and value:
        value = Counter(value).most_common(1)[0][0]
    if not isinstance(value, str) or not value.strip():
        raise UnreadableSampleError(
            f"column {column!r} holds {sample.get(column)!r}; expected a non-empty string or a list of them", "bad text"
        )
    return value.strip()
