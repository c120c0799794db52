"""The quickstart's CapFilt demonstration (`--caption-noise P --capfilt`): a corpus with a fraction of wrong captions,
cleaned by `blip2-bridge capfilt`'s own code with the stage-1 model trained on it, then trained on again.

The scenes' captions follow from their drawings, so every caption can be checked: a caption is right when it is the
scene's own caption, wrong otherwise. The corpus is written as a user's would be (PNG files and a LAVIS-style JSON),
and the filtered data is read back with `load_lavis_annotations`, as `blip2-bridge train` reads it.
"""

import json
import random
import shutil
from pathlib import Path

import torch

from ..training.capfilt import CaptionerSettings, KeepRule, capfilt, read_capfilt_rows
from ..training.datasets import load_lavis_annotations


# The captioner: the stage-1 model's Q-Former decoder, 10 nucleus samples per image as BLIP-2. The scenes' captions run
# from 7 to 27 words, so the lengths are the scenes' and not LAVIS's 9 to 29 tokens.
CAPTIONER = CaptionerSettings(num_captions=10, top_p=0.9, max_new_tokens=40, min_new_tokens=1)
# The filter: BLIP's ITM threshold for web captions and a stricter one for synthetic captions, then the best by
# similarity, as BLIP-2 ranks. A scene has exactly one right caption, so BLIP-2's top two would keep a wrong second
# caption for every image whose right one was found; ranking by ITM probability found the right caption less often than
# ITC here. The captioner's samples are mostly near misses, which ITM rates as high as the truth: at 0.5, two thirds of
# the kept synthetic captions were wrong, and 0.9 was chosen from a run's scores (docs/capfilt.md has the rules).
KEEP_RULE = KeepRule(rank_by="itc", top_k=1, itm_threshold=0.5, synthetic_itm_threshold=0.9)


def add_caption_noise(captions: list[str], fraction: float, seed: int) -> tuple[list[str], list[bool]]:
    """The captions with `fraction` of them (chosen at random) replaced by another scene's different caption, as web
    alt-texts that describe something else; and whether each caption is still right."""
    if not 0 <= fraction < 1:
        raise ValueError(f"caption noise is {fraction}; expected a fraction in [0, 1)")
    rng = random.Random(seed)
    noisy = list(captions)
    for index in rng.sample(range(len(captions)), round(fraction * len(captions))):
        while noisy[index] == captions[index]:
            noisy[index] = captions[rng.randrange(len(captions))]
    return noisy, [caption == right for caption, right in zip(noisy, captions)]


def write_corpus(folder: Path, images: list, captions: list[str]) -> Path:
    """The images as PNG files and a LAVIS-style annotation file naming them: the corpus as a user would hold it.
    The folder starts afresh."""
    shutil.rmtree(folder, ignore_errors=True)
    image_folder = folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        path = image_folder / f"{index:05d}.png"
        image.save(path)
        entries.append({"image": str(path), "caption": caption, "image_id": index})
    annotation_file = folder / "noisy_annotations.json"
    annotation_file.write_text(json.dumps(entries, indent=1) + "\n")
    return annotation_file


def image_index(path: str) -> int:
    return int(Path(path).stem)


def clean_corpus(stage1, processor, corpus_file: Path, true_captions: list[str], folder: Path,
                 seed: int) -> tuple[list[dict], dict]:
    """Runs CapFilt over the noisy corpus (`write_corpus`'s annotation file) with `stage1` as captioner and filter,
    writing to `folder`. Returns the filtered training rows
    ({"image_index", "caption"}, read back with `load_lavis_annotations`) and the percentages of results.json:

    wrong_before: of the corpus's captions, the percent that are wrong;
    wrong_after: of the kept captions (web and synthetic), the percent that are wrong;
    right_kept: of the corpus's right captions, the percent kept (a synthetic copy of one counts as it: CapFilt merges
        equal captions).
    """
    # A run always starts afresh: CapFilt would resume from shards an earlier run's model left here.
    shutil.rmtree(folder, ignore_errors=True)
    corpus = load_lavis_annotations(corpus_file, image_root="")
    noisy_captions = corpus["caption"]
    stage1.eval()
    with torch.no_grad():
        summary = capfilt(
            corpus,
            folder,
            stage1,
            processor,
            captioner_settings=CAPTIONER,
            keep_rule=KEEP_RULE,
            batch_size=64,
            seed=seed,
            source=str(corpus_file),
        )
    if not sum(summary["kept"].values()):
        raise ValueError(
            f"CapFilt kept no caption of the {len(noisy_captions)} images (keep rule {KEEP_RULE}); stage 1 has nothing "
            "to train on again"
        )
    rows = load_lavis_annotations(folder / "annotations.json", image_root="")
    kept = [
        {"image_index": image_index(path), "caption": caption} for path, caption in zip(rows["image"], rows["caption"])
    ]
    kept_right = [row["caption"] == true_captions[row["image_index"]] for row in kept]
    web_kept = {
        image_index(row["image"]): any(c["source"] == "web" and c["kept"] for c in row["candidates"])
        for row in read_capfilt_rows(folder)
    }
    right_web = [index for index, caption in enumerate(noisy_captions) if caption == true_captions[index]]
    statistics = {
        "wrong_before": 100 * (1 - len(right_web) / len(noisy_captions)),
        "wrong_after": 100 * (1 - sum(kept_right) / max(len(kept), 1)),
        "right_kept": 100 * sum(web_kept[index] for index in right_web) / max(len(right_web), 1),
        "captions_before": len(noisy_captions),
        "captions_after": len(kept),
        "synthetic_kept": summary["kept"]["synthetic"],
        "images_without_caption": summary["images_without_kept_caption"],
        "images_per_second": summary.get("images_per_second"),
    }
    return kept, statistics


@torch.no_grad()
def qformer_captions(stage1, tokenizer, image_embeds: torch.Tensor, batch_size: int = 100) -> list[str]:
    """Greedy captions of a stage-1 model's own decoder (ITG), the lengths of the scenes' captions."""
    stage1.eval()
    captions = []
    for batch in image_embeds.split(batch_size):
        generated = stage1.generate(image_embeds=batch, num_beams=1, do_sample=False, max_length=41, min_length=2)
        captions += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return captions
