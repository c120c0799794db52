"""Our stage-1 model against the LAVIS re-statement (tests/lavis_reference.py), which shares no code with it.

Each `test_product_*` runs the product and the re-statement on the same random weights (the LAVIS state dict, put
into our model by the converter) and compares them. The `test_oracle_self_check_*` tests guard the re-statement
itself (its loading, its masks, its RNG use, its agreement with transformers' independent Q-Former): they never call
the product, and say so in their names.
"""

from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F

from modeling_blip2 import modeling_stage1
from tests.lavis_reference import BertModel, LavisBlip2Qformer, lavis_state_dict_keys, lavis_state_dict_random
from tests.oracle_pairs import PRODUCT_DEC, oracle_and_product, product_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread

CFG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
           cross_attention_frequency=2, vocab_size=50, max_position_embeddings=16, vision_width=24,
           num_query_tokens=4, embed_dim=16, layer_norm_eps=1e-12, ln_vision_eps=1e-5)
PAD, CLS, SEP, BOS = 0, 1, 2, 3


def _batch(B=4, T=7, N=5, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(B, N, CFG["vision_width"], generator=g) * 2 + 0.5
    ids = torch.randint(4, CFG["vocab_size"], (B, T), generator=g)
    ids[:, 0] = CLS
    lengths = lengths or [T - (b % 3) for b in range(B)]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = SEP
        ids[b, n:] = PAD
        mask[b, :n] = 1
    return raw, ids, mask


def _model(seed=0):
    return LavisBlip2Qformer(CFG, lavis_state_dict_random(CFG, seed))


def _run(model, raw, ids, mask, rng_seed=0, **kw):
    torch.manual_seed(rng_seed)
    return model(image_embeds_raw=raw, input_ids=ids, attention_mask=mask, bos_token_id=BOS, pad_token_id=PAD, **kw)


def test_oracle_self_check_state_dict_keys_and_loading():
    sd = lavis_state_dict_random(CFG, 0)
    assert list(sd) == lavis_state_dict_keys(CFG)
    # cross-attention only in layers 0 and 2 (freq 2); query FFN in every layer
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in sd
    assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in sd
    assert "Qformer.bert.encoder.layer.2.crossattention.output.LayerNorm.bias" in sd
    assert "Qformer.bert.encoder.layer.1.output_query.dense.weight" in sd
    assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 24)
    assert torch.equal(sd["Qformer.cls.predictions.decoder.weight"], sd["Qformer.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd["Qformer.cls.predictions.decoder.bias"], sd["Qformer.cls.predictions.bias"])
    assert sd["temp"].shape == () and math.isclose(sd["temp"].item(), 0.07, rel_tol=1e-6)
    assert sd["Qformer.bert.embeddings.position_ids"].tolist() == [list(range(16))]
    m = LavisBlip2Qformer(CFG, sd)
    names = dict(m.named_parameters())
    # every parameter is a LAVIS key, and every LAVIS key except the tied aliases/buffer is a parameter
    assert set(names) == set(sd) - {"Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.decoder.bias",
                                    "Qformer.bert.embeddings.position_ids"}
    for k, p in names.items():
        assert torch.equal(p.detach(), sd[k]), k
    bad = dict(sd)
    bad["Qformer.cls.predictions.decoder.bias"] = bad["Qformer.cls.predictions.decoder.bias"] + 1
    with pytest.raises(ValueError):
        LavisBlip2Qformer(CFG, bad)


# ---- the product against the re-statement ---------------------------------------------------------------------------

def run_oracle(oracle, image_embeds, input_ids, attention_mask, rng_seed=0, **kwargs):
    torch.manual_seed(rng_seed)
    return oracle(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                  bos_token_id=PRODUCT_DEC, pad_token_id=PAD, **kwargs)


def test_product_itc_features_similarities_and_loss_equal_the_originals():
    oracle, product = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch()
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask)
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(output.image_feats, expected["image_feats"], rtol=0, atol=1e-5)
    torch.testing.assert_close(output.text_feats, expected["text_feat"], rtol=0, atol=1e-5)
    torch.testing.assert_close(output.logits_per_image, expected["sim_i2t"], rtol=0, atol=1e-4)
    torch.testing.assert_close(output.logits_per_text, expected["sim_t2i"], rtol=0, atol=1e-4)
    torch.testing.assert_close(output.loss_itc, expected["loss_itc"], rtol=0, atol=1e-5)
    # The similarities spread (a random model with LAVIS's own 0.02 weights gives near-equal ones).
    assert (expected["sim_i2t"].max() - expected["sim_i2t"].min()).item() > 1.0


def test_product_itc_with_image_ids_equals_the_originals_and_never_draws_a_same_image_negative(monkeypatch):
    oracle, product = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch()
    image_ids = torch.tensor([7, 3, 7, 5])
    image_embeds[2] = image_embeds[0]  # the same image twice, as in COCO (5 captions per image)
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask, image_ids=image_ids)
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, image_ids=image_ids)
    torch.testing.assert_close(output.loss_itc, expected["loss_itc"], rtol=0, atol=1e-5)
    draws = []
    sample = modeling_stage1.sample_hard_negatives
    monkeypatch.setattr(modeling_stage1, "sample_hard_negatives", lambda *a, **k: draws.append(sample(*a, **k)) or draws[-1])
    product.train()
    for seed in range(5):
        torch.manual_seed(seed)
        product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, image_ids=image_ids)
    assert len(draws) == 10
    for drawn in draws:
        assert not (image_ids[drawn] == image_ids).any(), drawn


def test_product_itg_loss_equals_the_originals_and_ignores_pad_columns():
    oracle, product = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch(lengths=[7, 5, 3, 6])
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask)
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(output.loss_itg, expected["loss_itg"], rtol=0, atol=1e-5)
    # Extra pad columns change nothing.
    padded_ids = torch.cat([input_ids, torch.full((4, 3), PAD)], 1)
    padded_mask = torch.cat([attention_mask, torch.zeros(4, 3, dtype=torch.long)], 1)
    padded = product(image_embeds=image_embeds, input_ids=padded_ids, attention_mask=padded_mask)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(padded, name), getattr(output, name), rtol=0, atol=1e-5, msg=name)


def test_product_multimodal_causal_logits_equal_the_originals_joint_unilm_pass():
    # The first text token is [DEC]; the original's decoder (is_decoder, has_query) over [queries; text].
    oracle, product = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch(lengths=[7, 5, 3, 6])
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = PRODUCT_DEC
    queries = oracle.query_tokens.expand(4, -1, -1)
    full_mask = torch.cat([torch.ones(4, queries.shape[1], dtype=torch.long), attention_mask], 1)
    with torch.no_grad():
        _, expected = oracle.Qformer(decoder_ids, attention_mask=full_mask, query_embeds=queries,
                                     encoder_hidden_states=image_embeds, use_cache=False)
        hidden = product.qformer(input_ids=decoder_ids, attention_mask=attention_mask, query_embeds=product.query_tokens,
                                 image_embeds=image_embeds, is_causal=True).last_hidden_state
        logits = product.itg_head(hidden[:, queries.shape[1]:])
    keep = attention_mask.bool()  # padded rows' outputs are nobody's targets
    torch.testing.assert_close(logits[keep], expected[keep], rtol=0, atol=1e-4)


def attention_pattern(attentions) -> list:
    return (attentions[0][:, 0] > 0).int().tolist()


@pytest.mark.parametrize("causal", [True, False], ids=["multimodal_causal", "bidirectional"])
def test_product_attention_masks_allow_exactly_what_the_originals_masks_allow(causal):
    # ITG: queries see all queries and no text, text sees all queries and the text so far; ITM: everyone sees all
    # but padding. The original's masks are additive -10000 (exp(-10000) is exactly 0 in float32).
    _, product = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch(batch_size=2, text_length=5, lengths=[5, 3])
    num_queries = product.config.num_query_tokens
    full_mask = torch.cat([torch.ones(2, num_queries, dtype=torch.long), attention_mask], 1)
    original = BertModel.get_extended_attention_mask(full_mask, input_ids.shape, "cpu", causal, has_query=True)
    if not causal:
        original = original.expand(-1, -1, full_mask.shape[1], -1)
    allowed = (original[:, 0] == 0).int().tolist()
    with torch.no_grad():
        output = product.qformer(input_ids=input_ids, attention_mask=attention_mask, query_embeds=product.query_tokens,
                                 image_embeds=image_embeds, is_causal=causal, output_attentions=True)
    self_attentions = [a for a in output.attentions if a is not None and a.shape[-1] == full_mask.shape[1]]
    assert len(self_attentions) == product.config.qformer_config.num_hidden_layers
    for layer_attentions in self_attentions:
        assert attention_pattern([layer_attentions]) == allowed


@pytest.mark.parametrize("seed", [0, 1])
def test_product_itm_logits_and_loss_equal_the_originals_with_deterministic_negatives(seed):
    # With two pairs each row's only non-positive is drawn with probability 1: both draw the same negatives.
    oracle, product = oracle_and_product(seed=seed)
    image_embeds, input_ids, attention_mask = product_batch(batch_size=2, lengths=[7, 4], seed=seed)
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask)
    assert expected["itm_neg_image_idx"].tolist() == [1, 0] and expected["itm_neg_text_idx"].tolist() == [1, 0]
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(output.itm_logits, expected["itm_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(output.loss_itm, expected["loss_itm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss, expected["loss"], rtol=0, atol=1e-4)
    # The head's two logits differ between the pairs by more than the tolerance: a wrong pairing would show.
    assert (expected["itm_logits"] - expected["itm_logits"][:1]).abs().max() > 0.05


def test_product_hard_negatives_equal_the_originals_draws_under_one_seed():
    oracle, product = oracle_and_product()
    product.train()  # training draws from torch's global generator, as the original
    image_embeds, input_ids, attention_mask = product_batch(batch_size=6, seed=3)
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask, rng_seed=7)
    torch.manual_seed(7)
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(output.itm_logits, expected["itm_logits"], rtol=0, atol=1e-4)


def test_product_gradients_equal_the_originals_with_its_detached_itc_gather():
    # float64: the gradients of a few heads are small differences of large terms.
    oracle, product = oracle_and_product(dtype=torch.float64)
    image_embeds, input_ids, attention_mask = product_batch(batch_size=2, lengths=[7, 4], dtype=torch.float64)
    expected = run_oracle(oracle, image_embeds, input_ids, attention_mask)
    output = product(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    # The image-to-text ITC term reaches the text side only through the detached gathered copy, and vice versa.
    targets = torch.arange(2)
    for term, untouched, touched in (("logits_per_image", "text_proj.weight", "vision_proj.weight"),
                                     ("logits_per_text", "vision_proj.weight", "text_proj.weight")):
        gradients = torch.autograd.grad(F.cross_entropy(getattr(output, term), targets, label_smoothing=0.1),
                                        [product.get_parameter(untouched), product.get_parameter(touched)],
                                        allow_unused=True, retain_graph=True)
        assert gradients[0] is None or gradients[0].abs().sum() == 0, term
        assert gradients[1].abs().sum() > 0, term
    expected["loss"].backward()
    output.loss.backward()
    oracle_parameters = dict(oracle.named_parameters())
    for ours, theirs in (("query_tokens", "query_tokens"), ("temp", "temp"), ("vision_proj.weight", "vision_proj.weight"),
                         ("text_proj.weight", "text_proj.weight"), ("itm_head.weight", "itm_head.weight"),
                         ("qformer.layer.0.crossattention.key.weight",
                          "Qformer.bert.encoder.layer.0.crossattention.self.key.weight")):
        ours_grad, their_grad = product.get_parameter(ours).grad, oracle_parameters[theirs].grad
        relative_error = ((ours_grad - their_grad).norm() / their_grad.norm()).item()
        assert relative_error < 1e-6, f"{ours}: relative gradient error {relative_error:.2e}"


def test_oracle_self_check_itg_past_key_values_equal_its_joint_pass():
    """The re-statement's ITG (text over the query pass's keys/values) equals its one joint UniLM pass, which the
    product tests above use as the reference for our multimodal-causal pass and cached decoding."""
    m = _model()
    raw, ids, mask = _batch()
    out = _run(m, raw, ids, mask)
    img = m._ln_vision(raw)
    dec = ids.clone()
    dec[:, 0] = BOS
    q = m.query_tokens.expand(4, -1, -1)
    full_mask = torch.cat([torch.ones(4, q.shape[1], dtype=torch.long), mask], 1)
    _, logits = m.Qformer(dec, attention_mask=full_mask, query_embeds=q, encoder_hidden_states=img, use_cache=False)
    torch.testing.assert_close(logits, out["itg_logits"], rtol=1e-4, atol=1e-5)
    hidden, _ = m.Qformer.bert(dec, attention_mask=full_mask, query_embeds=q, encoder_hidden_states=img, is_decoder=True)
    torch.testing.assert_close(hidden[:, : q.shape[1]], out["query_output"], rtol=1e-4, atol=1e-5)


def test_oracle_self_check_unilm_mask_layout():
    m = BertModel.get_extended_attention_mask(torch.tensor([[1, 1, 1, 1, 0]]), (1, 3), "cpu", True, has_query=True)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 0, 0, 0],  # queries: all queries, no text
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],  # text: all queries + causal text (pad column masked)
                       [1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 0]]
    assert set(m.unique().tolist()) == {0.0, -10000.0}

def test_oracle_self_check_vectorised_multinomial_reproduces_lavis_loop_on_cpu():
    """Documents the RNG finding: on CPU, torch.multinomial(W, 1) over a (B, N) matrix draws the same
    indices as LAVIS's per-row loop, and leaves the generator in the same state (so the second, text,
    draw continues identically)."""
    for B, N, seed in [(2, 2, 0), (3, 7, 1), (8, 8, 2), (16, 40, 3), (64, 64, 4)]:
        g = torch.Generator().manual_seed(seed)
        W1 = torch.softmax(3 * torch.randn(B, N, generator=g), 1)
        W2 = torch.softmax(3 * torch.randn(B, N, generator=g), 1)
        torch.manual_seed(seed)
        a = [torch.multinomial(W1[b], 1).item() for b in range(B)]
        b_ = [torch.multinomial(W2[b], 1).item() for b in range(B)]
        after = torch.rand(3)
        torch.manual_seed(seed)
        va = torch.multinomial(W1, 1)[:, 0].tolist()
        vb = torch.multinomial(W2, 1)[:, 0].tolist()
        vafter = torch.rand(3)
        assert (va, vb) == (a, b_)
        assert torch.equal(after, vafter)
        # the same draw written out: argmax(W / Exp(1)) with one exponential_ over the whole matrix
        torch.manual_seed(seed)
        ea = (W1 / torch.empty_like(W1).exponential_(1)).argmax(-1).tolist()
        eb = (W2 / torch.empty_like(W2).exponential_(1)).argmax(-1).tolist()
        assert (ea, eb) == (a, b_)


def test_oracle_self_check_bert_passes_agree_with_transformers_blip2_qformer():
    """Cross-check of the shared Q-Former passes (query, unimodal text, ITM) against transformers'
    independent Blip2QFormerModel (eager attention) loaded with the same weights."""
    transformers = pytest.importorskip("transformers")
    sd = lavis_state_dict_random(CFG, 1)
    m = LavisBlip2Qformer(CFG, sd)
    qcfg = transformers.Blip2QFormerConfig(
        vocab_size=CFG["vocab_size"], hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16, layer_norm_eps=1e-12, cross_attention_frequency=2,
        encoder_hidden_size=24, use_qformer_text_input=True, pad_token_id=PAD)
    qcfg._attn_implementation = "eager"
    hf = transformers.Blip2QFormerModel(qcfg).eval()
    emb = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(qcfg)
    pre = "Qformer.bert."
    hf_sd = {}
    for k, v in sd.items():
        if not k.startswith(pre + "encoder."):
            continue
        k = k[len(pre):].replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention.")
        hf_sd[k] = v
    hf_sd["layernorm.weight"] = sd[pre + "embeddings.LayerNorm.weight"]
    hf_sd["layernorm.bias"] = sd[pre + "embeddings.LayerNorm.bias"]
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    emb.load_state_dict({"word_embeddings.weight": sd[pre + "embeddings.word_embeddings.weight"],
                         "position_embeddings.weight": sd[pre + "embeddings.position_embeddings.weight"]},
                        strict=False)

    raw, ids, mask = _batch()
    img = m._ln_vision(raw)
    q = m.query_tokens.expand(4, -1, -1)
    img_mask = torch.ones(img.shape[:2], dtype=torch.long)
    with torch.no_grad():
        ours_q, _ = m.Qformer.bert(query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=img_mask)
        theirs_q = hf(query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=img_mask).last_hidden_state
        torch.testing.assert_close(ours_q, theirs_q, rtol=1e-5, atol=1e-5)
        ours_t, _ = m.Qformer.bert(ids, attention_mask=mask)
        theirs_t = hf(query_embeds=emb(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        keep = mask.bool()  # pad rows are irrelevant (masks differ: -10000 vs finfo.min)
        torch.testing.assert_close(ours_t[keep], theirs_t[keep], rtol=1e-5, atol=1e-5)
        full = torch.cat([torch.ones(4, q.shape[1], dtype=torch.long), mask], 1)
        ours_m, _ = m.Qformer.bert(ids, attention_mask=full, query_embeds=q, encoder_hidden_states=img,
                                   encoder_attention_mask=img_mask)
        theirs_m = hf(query_embeds=emb(input_ids=ids, query_embeds=q), query_length=q.shape[1], attention_mask=full,
                      encoder_hidden_states=img, encoder_attention_mask=img_mask).last_hidden_state
        torch.testing.assert_close(ours_m[:, : q.shape[1]], theirs_m[:, : q.shape[1]], rtol=1e-5, atol=1e-5)
    assert BertModel.get_extended_attention_mask(mask, mask.shape, "cpu", False).shape == (4, 1, 1, 7)
