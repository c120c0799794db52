"""CapFilt throughput: images/s of captioning and of filtering, and what computing each image's features once saves.

A stage-1 model with a ViT-S/16-sized tower (224 px, 197 tokens x 384, 6 layers) and a BERT-mini-sized Q-Former
(4 layers x 256, 32 queries) captions random images with its Q-Former decoder (nucleus sampling, `--captions` per
image, `--new-tokens` tokens each) and filters the captions with the web caption (ITC and ITM, BLIP's 0.5 threshold,
then the top two by similarity), batch by batch through `training.capfilt.process_images`, as `blip2-bridge capfilt`
runs. Two ways, alternating, side by side:
- shared: the tower runs once per image; the captioner and the filter both read its features (what CapFilt does when
  they share the tower, e.g. a stage-1 model that captions and filters, or a stage-2 model built from it);
- separate: the captioner runs the tower again, as two independent tools (a captioning script, then a filter) would.

    python benchmarks/capfilt.py [--images 32] [--batch-size 16] [--captions 10] [--new-tokens 20] [--threads 2]
"""

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import PIL.Image
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeImageProcessor, Blip2BridgeModel, Blip2BridgeProcessor
from modeling_blip2.training.capfilt import CapFiltModels, CaptionerSettings, KeepRule, Timings, process_images


WORDS = [f"word{index}" for index in range(2000)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer over a generated vocabulary, with [DEC] as BOS (no download)."""
    vocabulary = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")


def build_model(tokenizer) -> Blip2BridgeModel:
    torch.manual_seed(0)
    config = Blip2BridgeConfig(
        vision_config=dict(model_type="blip_2_vision_model", hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=6, intermediate_size=1536, image_size=224, patch_size=16),
        qformer_config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        num_query_tokens=32,
        embed_dim=256,
    )
    return Blip2BridgeModel(config).eval()


def make_entries(num_images: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "image": PIL.Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
            "image_id": index,
            "web_captions": [" ".join(rng.choice(WORDS, 12))],
            "name": f"image {index}",
        }
        for index in range(num_images)
    ]


def run(models: CapFiltModels, entries: list[dict], batch_size: int) -> tuple[float, Timings]:
    timings = Timings()
    torch.manual_seed(0)
    start = time.perf_counter()
    for first in range(0, len(entries), batch_size):
        process_images(models, entries[first : first + batch_size], timings)
    return time.perf_counter() - start, timings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--captions", type=int, default=10, help="synthetic captions per image (BLIP-2: 10)")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens per caption (min and max)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed runs of each way")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": 224, "width": 224}), tokenizer)
    settings = CaptionerSettings(num_captions=args.captions, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens)
    shared = CapFiltModels.build(model, processor, captioner_settings=settings,
                                 keep_rule=KeepRule(rank_by="itc", top_k=2, itm_threshold=0.5))
    ways = {"shared": shared, "separate": replace(shared, shares_image_embeds=False)}
    entries = make_entries(args.images)
    run(shared, entries[: args.batch_size], args.batch_size)  # warm-up

    seconds = {name: [] for name in ways}
    timings = {}
    for _ in range(args.rounds):
        for name, models in ways.items():
            total, timings[name] = run(models, entries, args.batch_size)
            seconds[name].append(total)

    print(f"{args.images} images of 224 px, batch {args.batch_size}, {args.captions} captions x {args.new_tokens} "
          f"tokens each, {args.threads} threads, torch {torch.__version__}")
    for name in ways:
        timing = timings[name]
        print(f"  {name:<9} {args.images / statistics.median(seconds[name]):7.2f} images/s overall; captioning "
              f"(tower + sampling) {timing.images / timing.captioning:7.2f} images/s, filtering (ITC + ITM of "
              f"{1 + args.captions} candidates) {timing.images / timing.filtering:7.2f} images/s")
    ratio = statistics.median(seconds["separate"]) / statistics.median(seconds["shared"])
    print(f"shared features: {ratio:.2f}x the images/s of the separate tower passes")


if __name__ == "__main__":
    main()
