"""CapFilt: captions a corpus of images with our own captioner and keeps the captions the image-text filter trusts.

BLIP (Li et al. 2022) bootstraps its pre-training data this way and BLIP-2 trains on the result: a **captioner** writes
synthetic captions for every web image (BLIP-2: 10 per image, nucleus sampling), a **filter** scores them together with
the image's web caption, and only the best are kept (BLIP-2: the top two by image-text similarity; BLIP: those the ITM
head calls a match). Here the filter is a stage-1 model (ITC similarity and ITM probability) and the captioner a
stage-1 model's Q-Former decoder or a stage-2 model.

`capfilt(...)` runs over a map-style dataset (one row per caption, as `load_annotation_file` and `load_image_folder`
return) or streamed webdataset shards (`capfilt_webdataset`). Work is cut into shards split across the processes of
`accelerate launch`; each finished shard is kept on disk, so an interrupted run resumes where it stopped. Each image's
features are computed once, for the captioner and the filter both (when they share the vision tower). Output:

- `annotations.json`: LAVIS-style, one entry per image with at least one kept caption: `{"image", "image_id",
  "caption": [kept captions, best first], "candidates": [{"text", "source", "itc", "itm", "kept"}, ...]}`; it loads with
  `load_lavis_annotations(path, image_root="")` (image paths are stored as the input dataset held them);
- for webdataset input, tar shards under `webdataset/`, one sample per kept caption (`{key}_{rank}.jpg/.txt/.json`),
  which `load_webdataset` streams;
- `capfilt_summary.json`: counts (images, captions kept by source, images left without a caption, unreadable images
  skipped by reason) and images/s of captioning and filtering.
"""

import copy
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..evaluation.runner import default_generation_settings, model_files
from ..evaluation.shards import JSONL, check_resumable, map_shards, read_jsonl
from ..processing.end_of_text import end_of_text_ids
from .data import SkippedSamples, UnreadableSampleError, open_sample_image, pre_caption, sample_name
from .datasets import resolve_shards, shard_samples


logger = logging.getLogger(__name__)

SOURCES = ("web", "synthetic")
RANK_BY = ("itc", "itm")
# Q-Former tokens per scored caption: BLIP's ITM filter and LAVIS's retrieval both cut texts at 35.
FILTER_MAX_TEXT_LENGTH = 35
# Image-caption pairs per ITM pass.
ITM_BATCH_SIZE = 128
# Webdataset input: the sampling seed of a batch counts items from input shard i's first item, i times this.
WEBDATASET_SHARD_STRIDE = 1_000_000
# LAVIS's `Blip2Qformer.generate` counts its [DEC] prompt token in max_length=30 and min_length=10.
STAGE1_MAX_NEW_TOKENS = 29
STAGE1_MIN_NEW_TOKENS = 9


@dataclass(frozen=True)
class CaptionerSettings:
    """How the captioner samples. None takes the captioner's default: for a stage-1 Q-Former decoder LAVIS's
    `Blip2Qformer.generate` (no prompt after [DEC], 9 to 29 new tokens); for a stage-2 model the captioning settings of
    `blip2-bridge evaluate --task coco_caption` (e.g. "a photo of", 8 to 30 new tokens for OPT), without beams.

    num_captions: synthetic captions per image (BLIP-2: 10). top_p: nucleus sampling (BLIP and LAVIS: 0.9).
    prompt: text the captions continue; it is not part of the kept caption, as BLIP strips its "a picture of ".
    """

    num_captions: int = 10
    top_p: float = 0.9
    prompt: str | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None

    def __post_init__(self):
        if self.num_captions < 0:
            raise ValueError(f"num_captions is {self.num_captions}; expected 0 (filter only) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; expected a probability mass in (0, 1]")
        for name in ("max_new_tokens", "min_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} is {value}; expected 0 or more")


@dataclass(frozen=True)
class KeepRule:
    """Which of an image's captions (web and synthetic, duplicates merged) survive the filter.

    itm_threshold: keep only captions whose ITM match probability is at least this (BLIP's filter keeps the pairs ITM
        calls a match: 0.5); None: no threshold.
    top_k: then keep the best `top_k` by `rank_by` (BLIP-2: the top two by similarity); None: keep every caption that
        passes the threshold.
    rank_by: "itc" (the cosine similarity, max over the queries) or "itm" (the match probability).
    synthetic_itm_threshold: the threshold of synthetic captions instead of `itm_threshold`; None: the same for both.
        A captioner's samples are near misses more often than web captions are (one colour or object off, the rest
        right), and a filter that is the captioner's own model rates its samples high: a stricter bar for them keeps
        fewer wrong captions (docs/capfilt.md has the measured rules).
    """

    rank_by: str = "itc"
    top_k: int | None = 2
    itm_threshold: float | None = None
    synthetic_itm_threshold: float | None = None

    def __post_init__(self):
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by is {self.rank_by!r}; expected one of {', '.join(RANK_BY)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k is {self.top_k}; expected at least 1, or None to keep all that pass")
        for name in ("itm_threshold", "synthetic_itm_threshold"):
            threshold = getattr(self, name)
            if threshold is not None and not 0 <= threshold <= 1:
                raise ValueError(f"{name} is {threshold}; expected a probability in [0, 1]")
        if self.top_k is None and self.itm_threshold is None and self.synthetic_itm_threshold is None:
            raise ValueError("a keep rule needs top_k, itm_threshold or both; with neither every caption is kept")

    @property
    def needs_itm(self) -> bool:
        return self.rank_by == "itm" or self.itm_threshold is not None or self.synthetic_itm_threshold is not None

    def itm_threshold_of(self, candidate: dict) -> float | None:
        if self.synthetic_itm_threshold is not None and candidate.get("source") == "synthetic":
            return self.synthetic_itm_threshold
        return self.itm_threshold


def keep_captions(candidates: Sequence[dict], rule: KeepRule) -> list[int]:
    """The indices of the kept candidates, best first. Each candidate has "itc" and "itm" scores (either may be None
    when the rule does not read it); ties keep the earlier candidate (web captions come first)."""
    passing = [
        index
        for index, candidate in enumerate(candidates)
        if (threshold := rule.itm_threshold_of(candidate)) is None or candidate["itm"] >= threshold
    ]
    ranked = sorted(passing, key=lambda index: -candidates[index][rule.rank_by])
    return ranked if rule.top_k is None else ranked[: rule.top_k]


def merge_candidates(web_captions: Iterable[str], synthetic_captions: Iterable[str]) -> list[dict]:
    """One candidate per distinct caption (compared as `pre_caption` cleans them), web captions first: a synthetic
    caption equal to the web caption or to an earlier sample adds nothing, and keeping both would count one text
    twice. Empty captions are dropped."""
    candidates, seen = [], set()
    for source, captions in (("web", web_captions), ("synthetic", synthetic_captions)):
        for text in captions:
            if not isinstance(text, str):
                continue
            cleaned = pre_caption(text)
            if cleaned and cleaned not in seen:
                seen.add(cleaned)
                candidates.append({"text": text.strip(), "source": source})
    return candidates


# ---- the models --------------------------------------------------------------------------------------------------


def is_stage1(model) -> bool:
    return getattr(model.config, "text_config", None) is None


def same_vision(first, second) -> bool:
    """Whether two models compute the same image embeddings: the same tower and vision LayerNorm, weights included."""
    if first is second:
        return True
    if first.config.vision_config.to_dict() != second.config.vision_config.to_dict():
        return False
    if first.config.vision_feature_layer != second.config.vision_feature_layer:
        return False
    parts = ("vision_model", "vision_layernorm")
    for part in parts:
        own, other = getattr(first, part).state_dict(), getattr(second, part).state_dict()
        if own.keys() != other.keys() or any(not torch.equal(own[k], other[k].to(own[k].device)) for k in own):
            return False
    return True


class Captioner:
    """Samples `settings.num_captions` captions per image with a stage-1 model's Q-Former decoder or a stage-2 model."""

    def __init__(self, model, processor, settings: CaptionerSettings):
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.stage1 = is_stage1(model)
        if self.stage1:
            self.prompt = settings.prompt or ""
            self.prompt_ids = self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"] if self.prompt else []
            max_new, min_new = STAGE1_MAX_NEW_TOKENS, STAGE1_MIN_NEW_TOKENS
            eos = model.config.qformer_config.sep_token_id
        else:
            defaults = default_generation_settings("coco_caption", model.config.text_config)
            self.prompt = defaults.prompt if settings.prompt is None else settings.prompt
            max_new, min_new = defaults.max_new_tokens, defaults.min_new_tokens
            eos = self.tokenizer.eos_token_id
            if defaults.end_of_text is not None:
                eos = end_of_text_ids(self.tokenizer, defaults.end_of_text)[0]
            if not model.config.text_config.is_encoder_decoder:
                # Every row's new tokens follow its prompt; a copy, so that the caller's processor stays as it was.
                self.processor = copy.deepcopy(processor)
                self.tokenizer = self.processor.tokenizer
                self.tokenizer.padding_side = "left"
        max_new = max_new if settings.max_new_tokens is None else settings.max_new_tokens
        min_new = min_new if settings.min_new_tokens is None else settings.min_new_tokens
        self.settings = replace(
            settings, prompt=self.prompt, max_new_tokens=max_new, min_new_tokens=min(min_new, max_new)
        )
        lengths = dict(max_new_tokens=self.settings.max_new_tokens, min_new_tokens=self.settings.min_new_tokens)
        if self.stage1:
            # The decoder's generation config sets max_length and min_length (LAVIS's); lengths given the same way
            # replace them instead of standing beside them (which transformers warns about).
            prompt_length = 1 + len(self.prompt_ids)
            lengths = dict(max_length=prompt_length + self.settings.max_new_tokens,
                           min_length=prompt_length + self.settings.min_new_tokens)
        self.generate_kwargs = dict(
            do_sample=True,
            top_p=settings.top_p,
            top_k=0,  # nucleus sampling alone, as BLIP and LAVIS (transformers' default would also keep only 50)
            num_beams=1,
            num_return_sequences=settings.num_captions,
            **lengths,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def __call__(self, images: list, image_embeds: torch.Tensor | None) -> list[list[str]]:
        """num_captions captions per image. image_embeds: the images' features when this captioner shares the filter's
        vision tower; otherwise it reads `images` with its own processor."""
        num_images, num = len(images), self.settings.num_captions
        if num == 0:
            return [[] for _ in range(num_images)]
        model, device = self.model, self.model.device
        if self.stage1:
            input_ids = torch.tensor([[model.config.qformer_config.bos_token_id] + self.prompt_ids], device=device)
            if image_embeds is None:
                pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
                image_inputs = {"pixel_values": pixel_values.to(device, model.dtype)}
            else:
                image_inputs = {"image_embeds": image_embeds}
            generated = model.generate(
                input_ids=input_ids.repeat(num_images, 1), **image_inputs, **self.generate_kwargs
            )
            new_tokens = generated[:, input_ids.shape[1] :]
        else:
            inputs = self.processor(images=images, text=[self.prompt] * num_images, padding=True, return_tensors="pt")
            inputs = inputs.to(device)
            if image_embeds is not None:
                inputs.pop("pixel_values")
                inputs["image_embeds"] = image_embeds
            else:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            generated = model.generate(**inputs, **self.generate_kwargs)
            is_decoder_only = not model.config.text_config.is_encoder_decoder
            new_tokens = generated[:, inputs["input_ids"].shape[1] :] if is_decoder_only else generated
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return [texts[row * num : (row + 1) * num] for row in range(num_images)]


class CaptionFilter:
    """ITC similarity (cosine, max over the queries) and ITM match probability of image-caption pairs, from a stage-1
    model, with each image's cross-attention keys/values projected once for all its captions."""

    def __init__(self, model, processor, rule: KeepRule):
        if not is_stage1(model):
            raise ValueError(
                f"the filter is a {type(model).__name__} with a language model; it needs a stage-1 Blip2BridgeModel "
                "(ITC and ITM heads)"
            )
        self.model, self.processor, self.rule = model, processor, rule

    @torch.no_grad()
    def score(self, image_embeds: torch.Tensor, texts: list[str], image_index: list[int]) -> list[dict]:
        """{"itc", "itm"} for each pair (image `image_index[p]`, text p); "itm" is None when the rule does not read
        it (ITM costs one Q-Former pass per pair)."""
        model, device = self.model, self.model.device
        tokens = self.processor(
            text=[pre_caption(text) for text in texts],
            padding="longest",
            truncation=True,
            max_length=FILTER_MAX_TEXT_LENGTH,
            return_tensors="pt",
        ).to(device)
        image_index = torch.tensor(image_index, device=device)
        image_feats = model.get_image_features(image_embeds=image_embeds).pooler_output
        text_feats = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output
        itc = torch.einsum("pqd,pd->pq", image_feats[image_index].float(), text_feats.float()).max(dim=1).values
        itm = [None] * len(texts)
        if self.rule.needs_itm:
            image_key_values = model.qformer.project_image(image_embeds)
            probabilities = []
            for start in range(0, len(texts), ITM_BATCH_SIZE):
                rows = slice(start, start + ITM_BATCH_SIZE)
                logits = model.get_itm_logits(
                    input_ids=tokens["input_ids"][rows],
                    attention_mask=tokens["attention_mask"][rows],
                    image_index=image_index[rows],
                    image_key_values=image_key_values,
                )
                probabilities.append(logits.float().softmax(dim=-1)[:, 1])
            itm = torch.cat(probabilities).tolist()
        return [{"itc": similarity, "itm": probability} for similarity, probability in zip(itc.tolist(), itm)]


# ---- one batch of images ------------------------------------------------------------------------------------------


@dataclass
class CapFiltModels:
    """The filter (a stage-1 model and its processor) and the captioner (default: the filter's own Q-Former decoder).
    `build` puts both models in eval mode."""

    filter: CaptionFilter
    captioner: Captioner
    shares_image_embeds: bool

    @classmethod
    def build(cls, filter_model, filter_processor, captioner_model=None, captioner_processor=None,
              captioner_settings: CaptionerSettings = CaptionerSettings(), keep_rule: KeepRule = KeepRule()):
        # Scores and samples must not change with dropout.
        filter_model.eval()
        if captioner_model is None:
            captioner_model, captioner_processor = filter_model, filter_processor
        elif captioner_processor is None:
            raise ValueError("captioner_model given without captioner_processor; pass the processor saved with it")
        captioner_model.eval()
        return cls(
            filter=CaptionFilter(filter_model, filter_processor, keep_rule),
            captioner=Captioner(captioner_model, captioner_processor, captioner_settings),
            shares_image_embeds=same_vision(filter_model, captioner_model),
        )


@dataclass
class Timings:
    captioning: float = 0.0
    filtering: float = 0.0
    images: int = 0


def process_images(models: CapFiltModels, entries: list[dict], timings: Timings) -> list[dict]:
    """Captions and filters one batch of images. An entry: {"image", "image_id", "web_captions", "name", ...}.
    Returns one row per entry, in order: the entry's fields, "candidates" with their scores and "kept" flags, and
    "caption" (the kept texts, best first); an unreadable image gives a row with "skipped" (the reason) instead."""
    rows, readable, images = [None] * len(entries), [], []
    for position, entry in enumerate(entries):
        try:
            image = open_sample_image(entry["image"], entry["name"])
            image = image.convert("RGB") if hasattr(image, "convert") else image
        except UnreadableSampleError as error:
            rows[position] = {**output_fields(entry), "skipped": error.reason, "error": str(error)}
            continue
        readable.append(position)
        images.append(image)
    if not readable:
        return rows
    readable_entries = [entries[position] for position in readable]
    filter_model = models.filter.model
    start = time.perf_counter()
    pixel_values = models.filter.processor(images=images, return_tensors="pt")["pixel_values"]
    image_embeds = filter_model.get_image_embeds(pixel_values.to(filter_model.device, filter_model.dtype))
    synthetic = models.captioner(images, image_embeds if models.shares_image_embeds else None)
    captioned = time.perf_counter()
    candidates = [
        merge_candidates(entry["web_captions"], captions) for entry, captions in zip(readable_entries, synthetic)
    ]
    pairs = [(image, candidate["text"]) for image, own in enumerate(candidates) for candidate in own]
    texts, image_index = [text for _, text in pairs], [image for image, _ in pairs]
    scores = models.filter.score(image_embeds, texts, image_index) if pairs else []
    timings.captioning += captioned - start
    timings.filtering += time.perf_counter() - captioned
    timings.images += len(readable)
    pair = 0
    for position, own in zip(readable, candidates):
        for candidate in own:
            candidate.update(scores[pair])
            pair += 1
        kept = keep_captions(own, models.filter.rule)
        for index, candidate in enumerate(own):
            candidate["kept"] = index in kept
        rows[position] = {
            **output_fields(entries[position]), "caption": [own[index]["text"] for index in kept], "candidates": own
        }
    return rows


def output_fields(entry: dict) -> dict:
    """What a row keeps of its input entry: its image path (bytes are written to the webdataset shards instead)."""
    row = {name: value for name, value in entry.items() if name not in ("image", "web_captions", "image_bytes")}
    if isinstance(entry["image"], (str, os.PathLike)):
        row["image"] = str(entry["image"])
    return row


# ---- the whole corpus ---------------------------------------------------------------------------------------------


def images_of(dataset, image_column: str = "image", caption_column: str = "caption",
              image_id_column: str = "image_id") -> list[dict]:
    """The images of a map-style dataset with one row per caption, each with its web captions, in order of first
    appearance. Rows belong to the same image when they share `image_id` (or, without one, the image path)."""
    entries, by_key = [], {}
    for index, row in enumerate(dataset):
        image = row.get(image_column)
        image_id = row.get(image_id_column)
        key = image_id if image_id is not None else (str(image) if isinstance(image, (str, os.PathLike)) else index)
        if key not in by_key:
            by_key[key] = len(entries)
            entries.append({
                "image": image,
                "image_id": image_id if image_id is not None else len(entries),
                "web_captions": [],
                "name": sample_name(row, index, image_column),
            })
        caption = row.get(caption_column)
        if isinstance(caption, str) and caption.strip():
            entries[by_key[key]]["web_captions"].append(caption)
    return entries


def run_arguments(models: CapFiltModels, captioner_settings, keep_rule, source, batch_size, shard_size, seed) -> dict:
    def describe(model):
        path = getattr(model, "name_or_path", "") or ""
        files = model_files(path) if path else None
        description = {"class": type(model).__name__, "name_or_path": path, "files": files}
        if description["files"] is None:
            # A model in memory or from the Hub: a checksum of its weights tells an earlier run's model from this one.
            with torch.no_grad():
                description["weights_checksum"] = sum(float(p.sum(dtype=torch.float64)) for p in model.parameters())
        return description

    return dict(
        source=source,
        filter=describe(models.filter.model),
        captioner=describe(models.captioner.model),
        captioner_settings=asdict(models.captioner.settings),
        keep_rule=asdict(keep_rule),
        batch_size=batch_size,
        shard_size=shard_size,
        seed=seed,
    )


def batch_seed(seed: int, first_item: int) -> int:
    """The sampling seed of the batch starting at `first_item`: the captions of an image do not depend on which
    process computes it or on whether the run was resumed."""
    return (seed * 1_000_003 + first_item) % 2**63


def caption_entries(models, entries: list[dict], first_item: int, batch_size: int, seed: int, timings: Timings,
                    progress) -> list[dict]:
    rows = []
    for start in range(0, len(entries), batch_size):
        torch.manual_seed(batch_seed(seed, first_item + start))
        batch = entries[start : start + batch_size]
        rows += process_images(models, batch, timings)
        progress.update(len(batch))
        if timings.images:
            progress.set_postfix(
                captioning=f"{timings.images / max(timings.captioning, 1e-9):.1f} img/s",
                filtering=f"{timings.images / max(timings.filtering, 1e-9):.1f} img/s",
                refresh=False,
            )
    return rows


def start_run(output_dir, filter_model, filter_processor, captioner_model, captioner_processor, captioner_settings,
              keep_rule, batch_size, accelerator) -> tuple[Accelerator, Path, CapFiltModels]:
    """What both entry points do first: check the batch size, take an accelerator, build the models."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; expected at least 1")
    models = CapFiltModels.build(filter_model, filter_processor, captioner_model, captioner_processor,
                                 captioner_settings, keep_rule)
    return accelerator or Accelerator(), Path(output_dir), models


def capfilt(
    dataset,
    output_dir: str | Path,
    filter_model,
    filter_processor,
    captioner_model=None,
    captioner_processor=None,
    captioner_settings: CaptionerSettings = CaptionerSettings(),
    keep_rule: KeepRule = KeepRule(),
    batch_size: int = 16,
    shard_size: int = 1024,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    source: str | None = None,
) -> dict | None:
    """Captions and filters a map-style dataset (one row per caption: `image`, `caption`, optional `image_id`, as our
    loaders return; images as paths, bytes or PIL images). Writes `annotations.json` and `capfilt_summary.json` to
    `output_dir` and returns the summary on the main process (None on the others).

    filter_model: a stage-1 `Blip2BridgeModel` (ITC, ITM) with its processor. captioner_model: a stage-1 model (its
    Q-Former decoder) or a stage-2 model, with its processor; default the filter model. Images given as paths are
    written to `annotations.json` as given; images given in memory (PIL images, bytes) have no path to write, so their
    rows carry only their `image_id` and `annotations.json` cannot name them. A run writes each shard of
    `shard_size` images under `output_dir/shards/` as it finishes; rerun with the same arguments to resume.
    source: how the run names its input in its saved arguments (default: the number of images).
    """
    accelerator, output_dir, models = start_run(
        output_dir, filter_model, filter_processor, captioner_model, captioner_processor, captioner_settings,
        keep_rule, batch_size, accelerator,
    )
    entries = images_of(dataset, image_column, caption_column)
    if not entries:
        raise ValueError("the dataset holds no images")
    arguments = run_arguments(models, captioner_settings, keep_rule, source or f"{len(entries)} images", batch_size,
                              shard_size, seed)
    check_resumable(output_dir, arguments, accelerator, "capfilt_arguments.json", "a CapFilt run")
    timings = Timings()
    with tqdm(total=len(entries), desc="CapFilt", unit="image", disable=not accelerator.is_local_main_process) as bar:
        shards = map_shards(
            accelerator, output_dir / "shards", len(entries), shard_size,
            lambda items: caption_entries(models, [entries[i] for i in items], items.start, batch_size, seed,
                                          timings, bar),
            JSONL,
        )
    rows = [row for shard in shards for row in shard]
    if not accelerator.is_main_process:
        return None
    kept_rows = [row for row in rows if row.get("caption")]
    annotations_file = output_dir / "annotations.json"
    annotations_file.write_text(json.dumps(kept_rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return write_summary(output_dir, rows, timings, {"annotations": str(annotations_file)})


def capfilt_webdataset(
    data_files: str | Sequence[str],
    output_dir: str | Path,
    filter_model,
    filter_processor,
    captioner_model=None,
    captioner_processor=None,
    captioner_settings: CaptionerSettings = CaptionerSettings(),
    keep_rule: KeepRule = KeepRule(),
    batch_size: int = 16,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    caption_column: str = "txt",
    image_column: str | None = None,
) -> dict | None:
    """`capfilt` over webdataset tar shards (paths or globs, as `load_webdataset` reads), one input shard per
    resumable shard of work. Each input shard becomes `output_dir/webdataset/{index:05d}.tar` holding one sample per
    kept caption (the image's bytes, the caption as .txt, its source and scores as .json); stream them with
    `load_webdataset(output_dir + "/webdataset/*.tar")`."""
    accelerator, output_dir, models = start_run(
        output_dir, filter_model, filter_processor, captioner_model, captioner_processor, captioner_settings,
        keep_rule, batch_size, accelerator,
    )
    patterns = [str(data_files)] if isinstance(data_files, (str, os.PathLike)) else [str(f) for f in data_files]
    shard_files = resolve_shards(patterns)
    arguments = run_arguments(models, captioner_settings, keep_rule, shard_files, batch_size, 1, seed)
    check_resumable(output_dir, arguments, accelerator, "capfilt_arguments.json", "a CapFilt run")
    tar_folder = output_dir / "webdataset"
    tar_folder.mkdir(parents=True, exist_ok=True)
    timings = Timings()

    def compute(items: range) -> list[dict]:
        (index,) = items
        entries = []
        for sample in shard_samples([shard_files[index]], caption_column, image_column):
            image = sample["image"]
            entries.append({
                "image": None if image is None else image["bytes"],
                "image_file": None if image is None else image["path"],
                "__key__": sample["__key__"],
                "image_id": sample["__key__"],
                "web_captions": [sample["caption"]] if sample["caption"] else [],
                "name": f"{shard_files[index]}:{sample['__key__']}",
            })
        rows = caption_entries(models, entries, index * WEBDATASET_SHARD_STRIDE, batch_size, seed, timings, bar)
        write_tar(tar_folder / f"{index:05d}.tar", entries, rows)
        return rows

    with tqdm(desc="CapFilt", unit="image", disable=not accelerator.is_local_main_process) as bar:
        shards = map_shards(accelerator, output_dir / "shards", len(shard_files), 1, compute, JSONL)
    if not accelerator.is_main_process:
        return None
    rows = [row for shard in shards for row in shard]
    return write_summary(output_dir, rows, timings, {"webdataset": str(tar_folder / "*.tar")})


def write_tar(path: Path, entries: list[dict], rows: list[dict]) -> None:
    """One sample per kept caption; written to a temporary name first, so an interrupted write leaves no shard."""
    partial = path.with_name(f".{path.name}.partial")
    with tarfile.open(partial, "w") as tar:
        for entry, row in zip(entries, rows):
            for rank, caption in enumerate(row.get("caption", [])):
                candidate = next(c for c in row["candidates"] if c["text"] == caption)
                extension = entry["image_file"].rpartition(".")[2]
                key = f"{entry['__key__']}_{rank}"
                files = {
                    extension: entry["image"],
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps({"source": candidate["source"], "itc": candidate["itc"],
                                        "itm": candidate["itm"], "image_key": entry["__key__"]}).encode("utf-8"),
                }
                for suffix, data in files.items():
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    os.replace(partial, path)


def summarise(rows: list[dict]) -> dict:
    """Counts over the output rows (one per input image)."""
    skipped = SkippedSamples.REASONS
    readable = [row for row in rows if "skipped" not in row]
    candidates = [candidate for row in readable for candidate in row["candidates"]]
    return {
        "images": len(rows),
        "images_skipped": {reason: sum(row.get("skipped") == reason for row in rows) for reason in skipped},
        "images_without_kept_caption": sum(not row["caption"] for row in readable),
        "candidates": {source: sum(c["source"] == source for c in candidates) for source in SOURCES},
        "kept": {source: sum(c["source"] == source and c["kept"] for c in candidates) for source in SOURCES},
    }


def write_summary(output_dir: Path, rows: list[dict], timings: Timings, files: dict) -> dict:
    summary = summarise(rows)
    if timings.images:
        # Of the shards computed in this run (resumed shards were read back, not timed).
        summary["images_per_second"] = {
            "captioning": timings.images / max(timings.captioning, 1e-9),
            "filtering": timings.images / max(timings.filtering, 1e-9),
        }
    summary["files"] = files
    skipped = sum(summary["images_skipped"].values())
    if skipped:
        logger.warning("CapFilt skipped %d unreadable images: %s", skipped, summary["images_skipped"])
    (output_dir / "capfilt_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_capfilt_rows(output_dir: str | Path) -> list[dict]:
    """Every output row of a finished or interrupted run, shard by shard (one row per image)."""
    return [row for path in sorted(Path(output_dir, "shards").glob("shard-*.jsonl")) for row in read_jsonl(path)]


__all__ = [
    "CaptionerSettings",
    "KeepRule",
    "capfilt",
    "capfilt_webdataset",
    "keep_captions",
    "merge_candidates",
    "read_capfilt_rows",
]
