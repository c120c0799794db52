"""Retrieval: ITC top-k then ITM re-ranking, batched and deduplicated, against the original's per-query loops."""

import pytest
import torch
import torch.nn.functional as F

from modeling_blip2.retrieval import UNRANKED_SCORE, compute_retrieval_scores, select_candidates
from tests.oracle_pairs import PRODUCT_DEC, oracle_and_product, oracle_itm_logits
from tests.tiny_models import CLS_ID, DEC_ID, PAD_ID, SEP_ID, tiny_model


def retrieval_data(num_images=6, num_texts=15, text_length=9, seed=0, vocab_end=DEC_ID):
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(num_images, 5, 24, generator=generator)
    input_ids = torch.randint(5, vocab_end, (num_texts, text_length), generator=generator)
    lengths = torch.randint(3, text_length + 1, (num_texts,), generator=generator)
    attention_mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    input_ids[:, 0] = CLS_ID
    input_ids[torch.arange(num_texts), lengths - 1] = SEP_ID
    return image_embeds, input_ids, attention_mask


def original_score_matrices(oracle, image_embeds, input_ids, attention_mask, k):
    """LAVIS compute_sim_matrix, restated on the original's own passes (tests/lavis_reference.py, which shares no code
    with the product): per image ITM on its top-k texts, per text ITM on its top-k images."""
    queries = oracle.query_tokens.expand(len(image_embeds), -1, -1)
    query_output, _ = oracle.Qformer.bert(query_embeds=queries, encoder_hidden_states=image_embeds)
    image_feats = F.normalize(oracle.vision_proj(query_output), dim=-1)
    text_output, _ = oracle.Qformer.bert(input_ids, attention_mask=attention_mask)
    text_feats = F.normalize(oracle.text_proj(text_output[:, 0]), dim=-1)
    sims_matrix = torch.stack([(image_embed @ text_feats.t()).max(0).values for image_embed in image_feats])
    score_matrix_i2t = torch.full((len(image_embeds), len(input_ids)), -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score = oracle_itm_logits(oracle, input_ids[topk_idx], attention_mask[topk_idx], image_embeds[i].repeat(k, 1, 1))
        score_matrix_i2t[i, topk_idx] = score[:, 1] + topk_sim
    score_matrix_t2i = torch.full((len(input_ids), len(image_embeds)), -100.0)
    for i, sims in enumerate(sims_matrix.t()):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score = oracle_itm_logits(oracle, input_ids[i].repeat(k, 1), attention_mask[i].repeat(k, 1), image_embeds[topk_idx])
        score_matrix_t2i[i, topk_idx] = score[:, 1] + topk_sim
    return score_matrix_i2t, score_matrix_t2i


@pytest.fixture(scope="module")
def oracle_and_model():
    return oracle_and_product()


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 4])
def test_scores_equal_the_original_per_query_loops(oracle_and_model, k):
    oracle, model = oracle_and_model
    image_embeds, input_ids, attention_mask = retrieval_data(vocab_end=PRODUCT_DEC)
    expected_i2t, expected_t2i = original_score_matrices(oracle, image_embeds, input_ids, attention_mask, k)
    # Small batches and image blocks so that batching, block boundaries and text trimming all take part.
    scores_i2t, scores_t2i = compute_retrieval_scores(
        model, image_embeds, input_ids, attention_mask, k=k, batch_size=5, images_per_block=4
    )
    assert (expected_i2t != UNRANKED_SCORE).sum(dim=1).tolist() == [k] * 6
    for actual, expected in ((scores_i2t, expected_i2t), (scores_t2i, expected_t2i)):
        assert torch.equal(actual == UNRANKED_SCORE, expected == UNRANKED_SCORE)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
        assert torch.equal(actual.argsort(dim=1, descending=True), expected.argsort(dim=1, descending=True))
    # The ITM scores spread visibly, so the comparison is not between near-constant matrices.
    ranked = expected_i2t[expected_i2t != UNRANKED_SCORE]
    assert ranked.max() - ranked.min() > 0.1


@torch.no_grad()
def test_each_pair_is_scored_once_and_each_image_projected_once(model):
    image_embeds, input_ids, attention_mask = retrieval_data()
    k = 4
    sims = model.get_image_features(image_embeds=image_embeds).pooler_output.float()
    similarity = torch.einsum("iqd,td->itq", sims, model.get_text_features(input_ids, attention_mask).pooler_output).amax(-1)
    chosen = torch.zeros_like(similarity, dtype=torch.bool)
    chosen.scatter_(1, similarity.topk(k, dim=1).indices, True)
    chosen.t().scatter_(1, similarity.t().topk(k, dim=1).indices, True)
    # Both directions pick some of the same pairs, so deduplication has something to do.
    assert chosen.sum() < 6 * k + 15 * k

    itm_rows, projected_images = [], []
    first_cross_attention = model.qformer.layer[0].crossattention
    project_key_value = first_cross_attention.project_key_value

    def counting_projection(states):
        projected_images.append(states.shape[0])
        return project_key_value(states)

    hook = model.itm_head.register_forward_hook(lambda module, args, output: itm_rows.append(args[0].shape[0]))
    first_cross_attention.project_key_value = counting_projection
    try:
        compute_retrieval_scores(model, image_embeds, input_ids, attention_mask, k=k, batch_size=7, images_per_block=4)
    finally:
        hook.remove()
        del first_cross_attention.project_key_value
    assert sum(itm_rows) == int(chosen.sum())
    assert max(itm_rows) <= 7
    # get_image_features projects all 6 images once (the query pass); ITM projects each image once more, per block.
    assert projected_images == [6, 4, 2]


def test_candidates_merge_both_directions_sorted_by_image():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    candidates = select_candidates(similarity, k=1)
    assert candidates.text_index.tolist() == [[0], [1]]
    assert candidates.image_index.tolist() == [[0], [1], [1]]
    assert candidates.pairs.tolist() == [[0, 0], [1, 1], [1, 2]]
    with pytest.raises(ValueError, match="k is 0"):
        select_candidates(similarity, k=0)
