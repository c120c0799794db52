"""Retrieval re-ranking (ITC top-k, then ITM): ours against the original per-query loop, same model, same data.

The original is salesforce/LAVIS `compute_sim_matrix`, restated below: for every image, one ITM pass over its k most
similar texts with the image repeated k times; then for every text, one ITM pass over its k most similar images; every
pass projects the images' cross-attention keys/values again. Ours (`modeling_blip2.retrieval`) scores each distinct
pair once, in batches, projecting each image's keys/values once. Both start from the same image_embeds (the frozen
vision pass is excluded) and texts tokenised as the original does (padded to 35 tokens).

    python benchmarks/retrieval.py [--images 64] [--texts 320] [--k 16] [--threads 2] [--rounds 1]
"""

import argparse
import statistics
import time

import torch

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeModel
from modeling_blip2.retrieval import compute_retrieval_scores


# A BERT-mini-sized Q-Former (4 layers x 256) over ViT-L-sized image features (257 tokens x 1024).
QFORMER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=30524)
NUM_IMAGE_TOKENS, VISION_WIDTH, NUM_QUERY_TOKENS, TEXT_LENGTH = 257, 1024, 32, 35


def build_model() -> Blip2BridgeModel:
    torch.manual_seed(0)
    config = Blip2BridgeConfig(
        vision_config=dict(model_type="blip_2_vision_model", hidden_size=VISION_WIDTH, num_hidden_layers=1,
                           num_attention_heads=8, intermediate_size=4),
        qformer_config=dict(QFORMER, bos_token_id=QFORMER["vocab_size"] - 1, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, initializer_range=0.1),
        num_query_tokens=NUM_QUERY_TOKENS,
        embed_dim=256,
    )
    return Blip2BridgeModel(config).eval()


def make_data(num_images: int, num_texts: int):
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(num_images, NUM_IMAGE_TOKENS, VISION_WIDTH, generator=generator)
    # Caption-length texts (8-20 tokens) padded to the original's max_length=35.
    lengths = torch.randint(8, 21, (num_texts,), generator=generator)
    attention_mask = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1000, QFORMER["vocab_size"] - 1, (num_texts, TEXT_LENGTH), generator=generator)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    input_ids[:, 0] = 101  # [CLS]
    input_ids[torch.arange(num_texts), lengths - 1] = 102  # [SEP]
    return image_embeds, input_ids, attention_mask


@torch.no_grad()
def original_compute_sim_matrix(model, image_embeds, input_ids, attention_mask, k: int, batch_size: int = 256):
    """LAVIS compute_sim_matrix with its compute_itm (ITM logit 1 averaged over the queries), one process."""
    text_embeds = torch.cat([
        model.get_text_features(input_ids[i : i + batch_size], attention_mask[i : i + batch_size]).pooler_output
        for i in range(0, len(input_ids), batch_size)
    ])
    image_feats = torch.cat([
        model.get_image_features(image_embeds=image_embeds[i : i + batch_size]).pooler_output
        for i in range(0, len(image_embeds), batch_size)
    ])
    sims_matrix = torch.stack([(image_feat @ text_embeds.t()).max(0).values for image_feat in image_feats])

    score_matrix_i2t = torch.full((len(image_embeds), len(input_ids)), -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        image_inputs = image_embeds[i].repeat(k, 1, 1)
        score = model.get_itm_logits(input_ids[topk_idx], attention_mask[topk_idx], image_embeds=image_inputs)[:, 1]
        score_matrix_i2t[i, topk_idx] = score + topk_sim

    score_matrix_t2i = torch.full((len(input_ids), len(image_embeds)), -100.0)
    for i, sims in enumerate(sims_matrix.t()):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        image_inputs = image_embeds[topk_idx]
        score = model.get_itm_logits(
            input_ids[i].repeat(k, 1), attention_mask[i].repeat(k, 1), image_embeds=image_inputs
        )[:, 1]
        score_matrix_t2i[i, topk_idx] = score + topk_sim
    return score_matrix_i2t, score_matrix_t2i


def rankings(scores: torch.Tensor) -> torch.Tensor:
    return scores.argsort(dim=1, descending=True, stable=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternating timed runs of each implementation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    image_embeds, input_ids, attention_mask = make_data(args.images, args.texts)
    implementations = {
        "original": lambda: original_compute_sim_matrix(model, image_embeds, input_ids, attention_mask, args.k),
        "ours": lambda: compute_retrieval_scores(model, image_embeds, input_ids, attention_mask, k=args.k),
    }
    seconds, results = {name: [] for name in implementations}, {}
    for _ in range(args.rounds):
        for name, run in implementations.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)

    print(f"retrieval re-ranking: {args.images} images x {args.texts} texts, k={args.k}, Q-Former "
          f"{QFORMER['num_hidden_layers']}x{QFORMER['hidden_size']}, {NUM_QUERY_TOKENS} queries, image "
          f"{NUM_IMAGE_TOKENS}x{VISION_WIDTH}, text {TEXT_LENGTH}, {args.threads} threads, {args.rounds} round(s)")
    original_rows = (args.images + args.texts) * args.k
    num_pairs = int(((results["ours"][0] != -100).sum() + (results["ours"][1] != -100).sum()).item())
    distinct_pairs = int(((results["ours"][0] != -100) | (results["ours"][1] != -100).t()).sum())
    print(f"ITM rows: original {original_rows}, ours {distinct_pairs} ({num_pairs - distinct_pairs} chosen by both "
          "directions scored once)")
    for name, times in seconds.items():
        print(f"{name:<10}{statistics.median(times):>9.2f} s")
    speedup = statistics.median(seconds["original"]) / statistics.median(seconds["ours"])
    print(f"ours is {speedup:.2f}x faster than the original")

    for direction, ours, original in zip(("i2t", "t2i"), results["ours"], results["original"]):
        identical = torch.equal(rankings(ours), rankings(original))
        difference = (ours - original).abs().max().item()
        print(f"{direction}: rankings identical: {identical}; max |score difference| {difference:.2e}")
        if not identical:
            raise SystemExit(f"{direction} rankings differ from the original")


if __name__ == "__main__":
    main()
