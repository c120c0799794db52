"""Image-text retrieval with a stage-1 model: ITC ranks every pair, ITM re-ranks each query's top k.

The scores are the original implementation's (salesforce/LAVIS `compute_sim_matrix`): for image i and each of its k
most similar texts t (and for text t and each of its k most similar images i), score = ITM logit of "match" (the
2-way head averaged over the queries, column 1) + ITC similarity (cosine, max over the queries, not divided by the
temperature); every other entry is -100.

The original scores each image against its k texts and each text against its k images in separate ITM passes,
projecting the image's cross-attention keys/values again for every row. Here a pair chosen by both directions is
scored once, rows are batched, and each image's keys/values are projected once for all its candidate texts.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .losses import max_over_queries_similarity


# The original's score for pairs that ITC did not put in a query's top k.
UNRANKED_SCORE = -100.0


@dataclass
class RetrievalCandidates:
    """
    text_index: (num_images, k_texts) for each image its k most similar texts, most similar first.
    image_index: (num_texts, k_images) for each text its k most similar images, most similar first.
    pairs: (num_pairs, 2) the distinct (image, text) pairs either direction chose, sorted by image, then text.
    """

    text_index: torch.LongTensor
    image_index: torch.LongTensor
    pairs: torch.LongTensor


def select_candidates(similarity: torch.Tensor, k: int = 128) -> RetrievalCandidates:
    """The top-k texts of every image and top-k images of every text under `similarity` (num_images, num_texts).

    k larger than the number of texts (or images) keeps them all.
    """
    if k < 1:
        raise ValueError(f"k is {k}; expected at least 1 candidate per query")
    num_images, num_texts = similarity.shape
    text_index = similarity.topk(min(k, num_texts), dim=1).indices
    image_index = similarity.t().topk(min(k, num_images), dim=1).indices
    # A pair (i, t) is coded i * num_texts + t: unique() merges the two directions and sorts by image, then text.
    codes = torch.cat([
        (torch.arange(num_images, device=similarity.device)[:, None] * num_texts + text_index).flatten(),
        (image_index * num_texts + torch.arange(num_texts, device=similarity.device)[:, None]).flatten(),
    ]).unique()
    pairs = torch.stack([codes // num_texts, codes % num_texts], dim=1)
    return RetrievalCandidates(text_index=text_index, image_index=image_index, pairs=pairs)


def image_blocks(pairs: torch.LongTensor, images_per_block: int) -> Iterator[tuple[int, int, torch.LongTensor]]:
    """Yields (first image, end image, the pairs' row indices) for consecutive blocks of images.

    `pairs` must be sorted by image (as `select_candidates` returns them).
    """
    num_images = int(pairs[:, 0].max()) + 1 if len(pairs) else 0
    for start in range(0, num_images, images_per_block):
        end = min(start + images_per_block, num_images)
        rows = torch.searchsorted(pairs[:, 0].contiguous(), torch.tensor([start, end], device=pairs.device))
        yield start, end, torch.arange(int(rows[0]), int(rows[1]), device=pairs.device)


@torch.no_grad()
def image_text_matching_scores(
    model,
    image_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    image_index: torch.LongTensor,
    batch_size: int = 128,
) -> torch.Tensor:
    """(num_pairs,) ITM logit of "match" for pairs (image `image_index[p]`, text p).

    image_embeds: (num_images, image_length, vision_width) the images the pairs name; each one's cross-attention
    keys/values are projected once and shared by all its pairs. input_ids/attention_mask: one text per pair. Rows run in
    batches of `batch_size`, each cut to its longest text (padding changes no output).
    """
    device = model.query_tokens.device
    image_key_values = model.qformer.project_image(image_embeds.to(device, model.query_tokens.dtype))
    scores = []
    for start in range(0, len(image_index), batch_size):
        batch_mask = attention_mask[start : start + batch_size].to(device)
        text_length = int(batch_mask.sum(dim=1).max())
        logits = model.get_itm_logits(
            input_ids=input_ids[start : start + batch_size, :text_length].to(device),
            attention_mask=batch_mask[:, :text_length],
            image_index=image_index[start : start + batch_size].to(device),
            image_key_values=image_key_values,
        )
        scores.append(logits[:, 1].float())
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


def rerank_scores(
    similarity: torch.Tensor, candidates: RetrievalCandidates, pair_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_i2t (num_images, num_texts), scores_t2i (num_texts, num_images)) as the original fills them.

    pair_scores: the ITM score of each row of `candidates.pairs`. A query's top-k entries get ITM score + similarity,
    every other entry -100.
    """
    num_images, num_texts = similarity.shape
    pair_codes = candidates.pairs[:, 0] * num_texts + candidates.pairs[:, 1]
    pair_scores = pair_scores.to(similarity.device, similarity.dtype)

    def lookup(codes: torch.Tensor) -> torch.Tensor:
        return pair_scores[torch.searchsorted(pair_codes, codes.flatten())].view_as(codes)

    image_rows = torch.arange(num_images, device=similarity.device)[:, None]
    text_rows = torch.arange(num_texts, device=similarity.device)[:, None]
    text_index, image_index = candidates.text_index, candidates.image_index
    scores_i2t = torch.full_like(similarity, UNRANKED_SCORE)
    scores_i2t.scatter_(1, text_index, lookup(image_rows * num_texts + text_index) + similarity.gather(1, text_index))
    scores_t2i = torch.full_like(similarity.t(), UNRANKED_SCORE)
    similarity_t2i = similarity.t().gather(1, image_index)
    scores_t2i.scatter_(1, image_index, lookup(image_index * num_texts + text_rows) + similarity_t2i)
    return scores_i2t, scores_t2i


@torch.no_grad()
def compute_retrieval_scores(
    model,
    image_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    k: int = 128,
    image_feats: torch.Tensor | None = None,
    text_feats: torch.Tensor | None = None,
    batch_size: int = 128,
    images_per_block: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval score matrices (scores_i2t (num_images, num_texts), scores_t2i (num_texts, num_images)).

    model: a stage-1 `Blip2BridgeModel`. image_embeds: (num_images, image_length, vision_width) features after the
    vision LayerNorm (kept wherever they are, e.g. on CPU; moved to the model's device a block of images at a time).
    input_ids, attention_mask: (num_texts, text_length) Q-Former tokens of every text. image_feats/text_feats: the ITC
    features when already computed (`get_image_features`, `get_text_features`). k: candidates ITM re-ranks per query.
    """
    device = model.query_tokens.device
    if image_feats is None:
        image_feats = torch.cat([
            model.get_image_features(image_embeds=image_embeds[start : start + batch_size].to(device)).pooler_output
            for start in range(0, len(image_embeds), batch_size)
        ])
    if text_feats is None:
        text_feats = torch.cat([
            model.get_text_features(
                input_ids[start : start + batch_size].to(device), attention_mask[start : start + batch_size].to(device)
            ).pooler_output
            for start in range(0, len(input_ids), batch_size)
        ])
    similarity = max_over_queries_similarity(image_feats.float(), text_feats.float())
    candidates = select_candidates(similarity, k)
    pair_scores = torch.empty(len(candidates.pairs), device=similarity.device)
    for start, end, rows in image_blocks(candidates.pairs, images_per_block):
        image_index, text_index = candidates.pairs[rows, 0] - start, candidates.pairs[rows, 1].cpu()
        pair_scores[rows] = image_text_matching_scores(
            model,
            image_embeds[start:end],
            input_ids[text_index],
            attention_mask[text_index],
            image_index,
            batch_size=batch_size,
        ).to(pair_scores.device)
    return rerank_scores(similarity, candidates, pair_scores)


__all__ = [
    "RetrievalCandidates",
    "compute_retrieval_scores",
    "image_text_matching_scores",
    "rerank_scores",
    "select_candidates",
]
