"""Sanity tests of the LAVIS numerics oracle (tests/lavis_reference.py) itself."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from lavis_reference import (  # noqa: E402
    LavisBlip2Qformer,
    lavis_state_dict_keys,
    lavis_state_dict_random,
)

CFG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
           cross_attention_frequency=2, vocab_size=50, max_position_embeddings=16, vision_width=24,
           num_query_tokens=4, embed_dim=16, layer_norm_eps=1e-12, ln_vision_eps=1e-5)
PAD, CLS, SEP, BOS = 0, 1, 2, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops: intra-op threads only add OpenMP wake-up latency (seconds per forward on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _smoothed_ce(logits, target, eps=0.1):
    logp = logits.log_softmax(-1)
    return (-(1 - eps) * logp.gather(1, target[:, None])[:, 0] - eps * logp.mean(-1)).mean()


def test_state_dict_keys_and_loading():
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


def test_itc_equals_hand_computation_and_shapes():
    m = _model()
    raw, ids, mask = _batch()
    out = _run(m, raw, ids, mask)
    B, Q, E = 4, CFG["num_query_tokens"], CFG["embed_dim"]
    assert out["image_feats"].shape == (B, Q, E) and out["text_feat"].shape == (B, E)
    assert out["itm_logits"].shape == (3 * B, 2) and out["sim_i2t"].shape == (B, B)
    # sims: max over queries of cosine similarities, divided by temp
    cos = torch.einsum("iqe,te->itq", out["image_feats"], out["text_feat"])
    torch.testing.assert_close(out["sim_i2t"], cos.max(-1).values / 0.07, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sim_t2i"], cos.max(-1).values.t() / 0.07, rtol=1e-5, atol=1e-5)
    tgt = torch.arange(B)
    expected = (_smoothed_ce(out["sim_i2t"], tgt) + _smoothed_ce(out["sim_t2i"], tgt)) / 2
    torch.testing.assert_close(out["loss_itc"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])
    itm_labels = torch.tensor([1] * B + [0] * (2 * B))
    torch.testing.assert_close(out["loss_itm"], F.cross_entropy(out["itm_logits"], itm_labels))


def test_itc_with_image_ids():
    m = _model()
    raw, ids, mask = _batch()
    image_ids = torch.tensor([7, 3, 7, 5])
    raw[2] = raw[0]  # same image twice, as in COCO (5 captions per image)
    out = _run(m, raw, ids, mask, image_ids=image_ids)
    pos = (image_ids[:, None] == image_ids[None, :]).float()
    tgt = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / 4
    exp = (-(out["sim_i2t"].log_softmax(1) * tgt).sum(1).mean() - (out["sim_t2i"].log_softmax(1) * tgt).sum(1).mean()) / 2
    torch.testing.assert_close(out["loss_itc"], exp, rtol=1e-6, atol=1e-6)
    # hard negatives never pick an entry of the same image (masked to -10000 before the softmax)
    for _ in range(5):
        out = _run(m, raw, ids, mask, rng_seed=_, image_ids=image_ids)
        for b in range(4):
            assert image_ids[out["itm_neg_image_idx"][b]] != image_ids[b]
            assert image_ids[out["itm_neg_text_idx"][b]] != image_ids[b]


def test_itg_loss_by_hand_and_ignores_pads():
    m = _model()
    raw, ids, mask = _batch(lengths=[7, 5, 3, 6])
    out = _run(m, raw, ids, mask)
    logits = out["itg_logits"]  # (B, T, V) text positions only
    dec = ids.clone()
    dec[:, 0] = BOS
    labels = dec.masked_fill(dec == PAD, -100)[:, 1:]
    lp = logits[:, :-1].log_softmax(-1)
    keep = labels != -100
    nll = -lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    smooth = -lp.mean(-1)
    exp = ((0.9 * nll + 0.1 * smooth) * keep).sum() / keep.sum()  # token mean over the batch
    torch.testing.assert_close(out["loss_itg"], exp, rtol=1e-6, atol=1e-6)
    # appending extra pad columns changes nothing (same RNG -> same negatives)
    ids2 = torch.cat([ids, torch.full((4, 3), PAD)], 1)
    mask2 = torch.cat([mask, torch.zeros(4, 3, dtype=torch.long)], 1)
    out2 = _run(m, raw, ids2, mask2)
    for k in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(out2[k], out[k], rtol=1e-5, atol=1e-6)


def test_itg_past_key_values_equals_joint_multimodal_causal_pass():
    m = _model()
    raw, ids, mask = _batch()
    out = _run(m, raw, ids, mask)
    img = m._ln_vision(raw)
    dec = ids.clone()
    dec[:, 0] = BOS
    q = m.query_tokens.expand(4, -1, -1)
    full_mask = torch.cat([torch.ones(4, q.shape[1], dtype=torch.long), mask], 1)
    # one pass over [queries; text] with the UniLM mask (is_decoder + has_query), as LAVIS's generate() does
    _, logits = m.Qformer(dec, attention_mask=full_mask, query_embeds=q, encoder_hidden_states=img, use_cache=False)
    torch.testing.assert_close(logits, out["itg_logits"], rtol=1e-4, atol=1e-5)
    # and the joint-pass query outputs equal the query-only pass (queries never see text)
    hidden, _ = m.Qformer.bert(dec, attention_mask=full_mask, query_embeds=q, encoder_hidden_states=img, is_decoder=True)
    torch.testing.assert_close(hidden[:, : q.shape[1]], out["query_output"], rtol=1e-4, atol=1e-5)


def test_unilm_mask_layout():
    from lavis_reference import BertModel

    m = BertModel.get_extended_attention_mask(torch.tensor([[1, 1, 1, 1, 0]]), (1, 3), "cpu", True, has_query=True)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 0, 0, 0],  # queries: all queries, no text
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],  # text: all queries + causal text (pad column masked)
                       [1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 0]]
    assert set(m.unique().tolist()) == {0.0, -10000.0}


def test_hard_negatives_b2_deterministic():
    m = _model()
    raw, ids, mask = _batch(B=2, lengths=[7, 4])
    outs = [_run(m, raw, ids, mask, rng_seed=s) for s in range(4)]
    for o in outs:  # positives get exactly zero weight -> the other sample, whatever the seed
        assert o["itm_neg_image_idx"].tolist() == [1, 0]
        assert o["itm_neg_text_idx"].tolist() == [1, 0]
        torch.testing.assert_close(o["loss_itm"], outs[0]["loss_itm"], rtol=0, atol=0)
        torch.testing.assert_close(o["loss"], outs[0]["loss"], rtol=0, atol=0)


def test_itc_gradients_follow_detached_gather():
    m = _model()
    raw, ids, mask = _batch()
    out = _run(m, raw, ids, mask)
    tgt = torch.arange(4)
    # i2t term: text side enters only through the (detached) gathered copy -> no gradient to text_proj
    g = torch.autograd.grad(F.cross_entropy(out["sim_i2t"], tgt, label_smoothing=0.1),
                            [m.text_proj.weight, m.vision_proj.weight, m.temp], allow_unused=True,
                            retain_graph=True)
    assert g[0] is None and g[1].abs().sum() > 0 and g[2].abs() > 0
    g = torch.autograd.grad(F.cross_entropy(out["sim_t2i"], tgt, label_smoothing=0.1),
                            [m.text_proj.weight, m.vision_proj.weight], allow_unused=True,
                            retain_graph=True)
    assert g[1] is None and g[0].abs().sum() > 0
    # the full loss reaches every parameter (ITG through the query past key/values, ITM through the heads)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vectorised_multinomial_reproduces_lavis_loop_on_cpu():
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


def test_bert_passes_agree_with_transformers_blip2_qformer():
    """Cross-check of the shared Q-Former passes (query, unimodal text, ITM) against transformers'
    independent Blip2QFormerModel (eager attention) loaded with the same weights."""
    transformers = pytest.importorskip("transformers")
    from lavis_reference import BertModel

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
