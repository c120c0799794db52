import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForPreTraining

from modeling_blip2 import Blip2BridgeModel
from modeling_blip2.compat import CACHE_KEYWORD
from modeling_blip2.losses import sample_hard_negatives
from modeling_blip2.modeling_qformer import QFormerRows
from modeling_blip2.modeling_stage1 import Blip2BridgeCaptionDecoder
from tests.oracle_pairs import PRODUCT_DEC, oracle_and_product, oracle_itm_logits, product_batch
from tests.transformers_versions import enable_activation_checkpointing
from tests.tiny_models import CLS_ID, DEC_ID, SEP_ID, VOCAB_SIZE, tiny_batch, tiny_model


def query_embeds_for(model, batch_size):
    return model.query_tokens.expand(batch_size, -1, -1)


def product_causal_pass(model, image_embeds, decoder_input_ids, attention_mask=None):
    """The product's own [queries; text] multimodal-causal pass (no cache): for tests of the product's properties."""
    return model.qformer(
        input_ids=decoder_input_ids,
        attention_mask=attention_mask,
        query_embeds=query_embeds_for(model, image_embeds.shape[0]),
        image_embeds=image_embeds,
        is_causal=True,
    ).last_hidden_state


@torch.no_grad()
def oracle_causal_logits(oracle, image_embeds, decoder_input_ids, attention_mask=None):
    """ITG logits at the text positions from the original's one joint pass over [queries; text] with its UniLM mask
    (tests/lavis_reference.py, which shares no code with the product): the reference for the product's ITG."""
    batch_size, text_length = decoder_input_ids.shape
    queries = oracle.query_tokens.expand(batch_size, -1, -1)
    if attention_mask is None:
        attention_mask = torch.ones_like(decoder_input_ids)
    full_mask = torch.cat([torch.ones(batch_size, queries.shape[1], dtype=torch.long), attention_mask], 1)
    _, logits = oracle.Qformer(decoder_input_ids, attention_mask=full_mask, query_embeds=queries,
                               encoder_hidden_states=image_embeds, use_cache=False)
    return logits


def test_an_attention_mask_longer_than_the_text_is_refused_with_both_lengths():
    model = tiny_model().eval()
    _, input_ids, _ = tiny_batch(batch_size=2, text_length=5)
    with pytest.raises(ValueError, match=r"^attention_mask covers 7 text tokens but only 5 positions exist$"):
        model.qformer(input_ids=input_ids, attention_mask=torch.ones(2, 7, dtype=torch.long))


# ---- the three losses against hand computations --------------------------------------------------------------------


def test_itc_loss_equals_hand_computed_label_smoothed_cross_entropy():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    image_feats, text_feats, temp = out.image_feats.tolist(), out.text_feats.tolist(), model.temp.item()
    batch = len(image_feats)

    def sim(i, t):
        return max(sum(a * b for a, b in zip(query, text_feats[t])) for query in image_feats[i]) / temp

    def smoothed_ce(row_logits, target):
        log_z = math.log(sum(math.exp(x) for x in row_logits))
        log_p = [x - log_z for x in row_logits]
        return -sum((0.9 * (j == target) + 0.1 / batch) * lp for j, lp in enumerate(log_p))

    loss_i2t = sum(smoothed_ce([sim(i, t) for t in range(batch)], i) for i in range(batch)) / batch
    loss_t2i = sum(smoothed_ce([sim(i, t) for i in range(batch)], t) for t in range(batch)) / batch
    assert out.loss_itc.item() == pytest.approx((loss_i2t + loss_t2i) / 2, abs=1e-5)
    assert out.logits_per_image[1, 2].item() == pytest.approx(sim(1, 2), abs=1e-5)
    assert out.logits_per_text[1, 2].item() == pytest.approx(sim(2, 1), abs=1e-5)


def test_itc_with_image_ids_treats_all_captions_of_an_image_as_positives():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    image_ids = torch.tensor([7, 7, 3, 5])
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, image_ids=image_ids)
    positives = (image_ids[:, None] == image_ids[None, :]).float()
    targets = 0.9 * positives / positives.sum(1, keepdim=True) + 0.1 / 4
    expected = (
        -(F.log_softmax(out.logits_per_image, 1) * targets).sum(1).mean()
        - (F.log_softmax(out.logits_per_text, 1) * targets).sum(1).mean()
    ) / 2
    assert out.loss_itc.item() == pytest.approx(expected.item(), abs=1e-6)
    # Row 0 has two positives, so its targets differ from plain label smoothing: the loss must differ too.
    plain = (F.cross_entropy(out.logits_per_image, torch.arange(4), label_smoothing=0.1)
             + F.cross_entropy(out.logits_per_text, torch.arange(4), label_smoothing=0.1)) / 2
    assert abs(plain.item() - out.loss_itc.item()) > 1e-4


def test_itm_pairs_are_positives_then_negative_images_then_negative_texts_scored_as_the_original():
    # With two pairs, the only non-positive candidate of each row is drawn with probability 1. The expected logits
    # come from the original's ITM pass (mean of the head over the queries), not from the product's get_itm_logits.
    oracle, model = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch(batch_size=2, lengths=[7, 4])
    out = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    labels = [1, 1, 0, 0, 0, 0]
    log_probs = F.log_softmax(out.itm_logits, dim=1)
    expected = -sum(log_probs[row, label].item() for row, label in enumerate(labels)) / 6
    assert out.loss_itm.item() == pytest.approx(expected, abs=1e-6)

    swapped = torch.tensor([1, 0])
    pair_logits = torch.cat(
        [
            oracle_itm_logits(oracle, input_ids, attention_mask, image_embeds),
            oracle_itm_logits(oracle, input_ids, attention_mask, image_embeds[swapped]),
            oracle_itm_logits(oracle, input_ids[swapped], attention_mask[swapped], image_embeds),
        ]
    )
    torch.testing.assert_close(out.itm_logits, pair_logits, atol=1e-4, rtol=0)
    # get_itm_logits (retrieval's scorer) scores any pairing as the original does.
    with torch.no_grad():
        scored = model.get_itm_logits(input_ids, attention_mask, image_embeds=image_embeds[swapped])
    torch.testing.assert_close(scored, pair_logits[2:4], atol=1e-4, rtol=0)


def test_itg_loss_equals_hand_computation_from_the_originals_joint_causal_pass():
    oracle, model = oracle_and_product()
    image_embeds, input_ids, attention_mask = product_batch(lengths=[7, 5, 3, 6])
    out = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)

    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = PRODUCT_DEC
    log_probs = F.log_softmax(oracle_causal_logits(oracle, image_embeds, decoder_input_ids, attention_mask), dim=-1)
    token_losses = []
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            if attention_mask[b, t + 1]:
                target = decoder_input_ids[b, t + 1]
                nll = -log_probs[b, t, target].item()
                uniform = -log_probs[b, t].mean().item()
                token_losses.append(0.9 * nll + 0.1 * uniform)
    assert out.loss_itg.item() == pytest.approx(sum(token_losses) / len(token_losses), abs=1e-5)
    assert out.loss.item() == pytest.approx((out.loss_itc + out.loss_itm + out.loss_itg).item(), abs=1e-6)


def test_itg_head_is_tied_to_the_qformer_word_embeddings():
    model = tiny_model()
    assert model.itg_head.decoder.weight.data_ptr() == model.qformer.word_embeddings.weight.data_ptr()


# ---- attention masks and routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 5])
def test_itg_mask_queries_never_see_text_and_text_is_causal(position):
    # Position 0 is the first text token ([DEC]): the queries must not see even that one.
    model = tiny_model().eval()
    pixel_values, input_ids, _ = tiny_batch(batch_size=2)
    image_embeds = model.get_image_embeds(pixel_values)
    changed = input_ids.clone()
    changed[:, position] = (changed[:, position] + 7) % DEC_ID
    with torch.no_grad():
        before = product_causal_pass(model, image_embeds, input_ids)
        after = product_causal_pass(model, image_embeds, changed)
    num_queries = model.config.num_query_tokens
    text_change = (after - before).abs().amax(dim=(0, 2))
    assert text_change[: num_queries + position].max() == 0  # queries and text before the changed token: untouched
    assert text_change[num_queries + position :].min() > 1e-4  # the changed token and everything after it: changed


def test_itm_mask_lets_queries_see_text():
    model = tiny_model().eval()
    pixel_values, input_ids, _ = tiny_batch(batch_size=2)
    image_embeds = model.get_image_embeds(pixel_values)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % DEC_ID
    queries = query_embeds_for(model, 2)
    with torch.no_grad():
        before = model.qformer(input_ids=input_ids, query_embeds=queries, image_embeds=image_embeds).last_hidden_state
        after = model.qformer(input_ids=changed, query_embeds=queries, image_embeds=image_embeds).last_hidden_state
    assert (after - before)[:, : model.config.num_query_tokens].abs().min() > 0


def test_padded_text_tokens_are_invisible():
    model = tiny_model().eval()
    _, input_ids, attention_mask = tiny_batch()
    changed = input_ids.clone()
    changed[attention_mask == 0] = 42
    with torch.no_grad():
        before = model.get_text_features(input_ids, attention_mask).pooler_output
        after = model.get_text_features(changed, attention_mask).pooler_output
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_queries_use_the_query_ffn_and_text_the_text_ffn():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values).pooler_output
        text_feats = model.get_text_features(input_ids, attention_mask).pooler_output
        for layer in model.qformer.layer:
            layer.text_feed_forward.output.weight.mul_(2.0)
        assert torch.equal(model.get_image_features(pixel_values).pooler_output, image_feats)
        assert not torch.allclose(model.get_text_features(input_ids, attention_mask).pooler_output, text_feats)
        for layer in model.qformer.layer:
            layer.query_feed_forward.output.weight.mul_(2.0)
        assert not torch.allclose(model.get_image_features(pixel_values).pooler_output, image_feats)


def test_cross_attention_only_every_cross_attention_frequency_layers():
    model = tiny_model(qformer_config=dict(tiny_model().config.qformer_config.to_dict(), cross_attention_frequency=2))
    assert [layer.has_cross_attention for layer in model.qformer.layer] == [True, False, True, False]
    assert [hasattr(layer, "crossattention") for layer in model.qformer.layer] == [True, False, True, False]


def test_rows_fanned_out_from_shared_inputs_equal_rows_given_one_by_one():
    # ITM pairs each caption with two images: the first layer's self-attention runs once per distinct text, and the
    # outputs and gradients must equal those of every row given in full.
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    image_embeds = model.get_image_embeds(pixel_values).detach()
    input_index = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    image_index = torch.tensor([0, 1, 2, 2, 0, 1, 0, 1])
    outputs, gradients = [], []
    for fanned_out in (True, False):
        model.zero_grad()
        rows = slice(None) if fanned_out else input_index
        output = model.qformer(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            query_embeds=model.query_tokens.expand(input_ids[rows].shape[0], -1, -1),
            image_embeds=image_embeds,
            rows=QFormerRows(input_index=input_index if fanned_out else None, image_index=image_index),
        ).last_hidden_state
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        outputs.append(output.detach())
        gradients.append([model.query_tokens.grad.clone(), model.qformer.layer[0].attention.query.weight.grad.clone(),
                          model.qformer.layer[0].text_feed_forward.output.weight.grad.clone()])
    assert outputs[0].shape == (8, 4 + input_ids.shape[1], 32)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for fanned_out, one_by_one in zip(*gradients):
        torch.testing.assert_close(fanned_out, one_by_one, atol=1e-5, rtol=1e-5)


def test_query_pass_runs_the_first_layer_once_and_caches_every_image():
    model = tiny_model().eval()
    pixel_values, _, _ = tiny_batch(batch_size=3)
    image_embeds = model.get_image_embeds(pixel_values)
    with torch.no_grad():
        shared = model.get_query_output(image_embeds, use_cache=True)
        separate = model.qformer(query_embeds=query_embeds_for(model, 3), image_embeds=image_embeds, use_cache=True)
    torch.testing.assert_close(shared.last_hidden_state, separate.last_hidden_state, atol=1e-6, rtol=1e-6)
    for shared_layer, separate_layer in zip(shared.cache.layers, separate.cache.layers):
        assert shared_layer.keys.shape == separate_layer.keys.shape == (3, 4, 4, 8)
        torch.testing.assert_close(shared_layer.keys, separate_layer.keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shared_layer.values, separate_layer.values, atol=1e-6, rtol=1e-6)


def test_rows_share_the_first_layer_only_while_it_is_deterministic():
    # Dropout draws its masks per row (as the original): in training with dropout, each row gets its own copy.
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=1)
    rows_seen = {}
    for dropout, training in ((0.5, True), (0.5, False), (0.0, True)):
        model = tiny_model(qformer_config=dict(tiny_model().config.qformer_config.to_dict(), hidden_dropout_prob=dropout))
        model.train(training)
        first_attention = model.qformer.layer[0].attention
        first_attention.register_forward_hook(lambda module, args, output: rows_seen.update(rows=args[0].shape[0]))
        with torch.no_grad():
            output = model.qformer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                query_embeds=model.query_tokens,
                image_embeds=model.get_image_embeds(pixel_values),
                rows=QFormerRows(input_index=torch.tensor([0, 0, 0]), image_index=torch.tensor([0, 0, 0])),
            ).last_hidden_state
        assert output.shape[0] == 3
        assert rows_seen["rows"] == (3 if dropout and training else 1), (dropout, training)
        if dropout and training:
            assert (output[0] - output[1]).abs().max() > 0.1
        else:
            assert torch.equal(output[0], output[1])


def test_input_index_without_queries_is_refused():
    model = tiny_model().eval()
    _, input_ids, attention_mask = tiny_batch()
    with pytest.raises(ValueError, match="input_index needs query_embeds"):
        model.qformer(
            input_ids=input_ids, attention_mask=attention_mask, rows=QFormerRows(input_index=torch.tensor([0, 0]))
        )


# ---- gradients -----------------------------------------------------------------------------------------------------


def test_frozen_vision_encoder_gets_no_gradient_and_stays_in_eval_mode():
    model = tiny_model().train()
    assert model.training and not model.vision_model.training
    pixel_values, input_ids, attention_mask = tiny_batch()
    model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    for name in ["query_tokens", "temp", "vision_layernorm.weight", "vision_proj.weight", "text_proj.weight",
                 "itm_head.weight", "itg_head.dense.weight", "qformer.layer.0.crossattention.key.weight",
                 "qformer.layer.0.query_feed_forward.output.weight", "qformer.layer.3.text_feed_forward.output.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_tower_unfrozen_by_requires_grad_trains_in_train_mode():
    # Unfreezing is the user's call (e.g. the paper's fine-tuning at 364 px): requires_grad_(True) alone must do it.
    model = tiny_model()
    model.vision_model.requires_grad_(True)
    model.train()
    assert model.vision_model.training
    pixel_values, input_ids, attention_mask = tiny_batch()
    model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).loss.backward()
    first_block = next(name for name, _ in model.vision_model.named_parameters() if "layers.0." in name)
    assert model.vision_model.get_parameter(first_block).grad.abs().sum() > 0
    model.vision_model.requires_grad_(False)
    assert not model.train().vision_model.training


def test_itc_image_to_text_term_trains_only_the_image_side():
    # The gathered copies carry no gradient, as the original's concat_all_gather.
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    loss_i2t = F.cross_entropy(out.logits_per_image, torch.arange(4), label_smoothing=0.1)
    loss_i2t.backward()
    assert model.text_proj.weight.grad is None or model.text_proj.weight.grad.abs().sum() == 0
    assert model.vision_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("image_input", ["pixel_values", "image_embeds"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant, image_input):
    # Reentrant checkpointing sees only tensors passed positionally: the images' keys/values and the queries' cache
    # (read by the ITG pass) must reach each layer as single tensors for their gradients to flow back once. Given as
    # image_embeds, the features need no gradient: their projection must still train.
    pixel_values, input_ids, attention_mask = tiny_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=use_reentrant)
        with torch.no_grad():
            images = {"pixel_values": pixel_values} if image_input == "pixel_values" else {
                "image_embeds": model.get_image_embeds(pixel_values)}
        torch.manual_seed(3)
        out = model(**images, input_ids=input_ids, attention_mask=attention_mask)
        out.loss.backward()
        results.append((out.loss.detach(), model.query_tokens.grad.clone(), model.text_proj.weight.grad.clone(),
                        model.qformer.layer[0].crossattention.value.weight.grad.clone(),
                        model.qformer.layer[-1].attention.key.weight.grad.clone()))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


class ShardedLayerStandIn(torch.nn.Module):
    """What a sharder makes of a Q-Former layer (FSDP's wrapper module): the layer is only reached through this
    module's call, and attributes are read through it."""

    def __init__(self, layer):
        super().__init__()
        self.wrapped = layer

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped, name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_wrapped_layers_project_the_images_through_their_own_call_with_the_same_gradients(use_reentrant):
    pixel_values, input_ids, attention_mask = tiny_batch()
    results = []
    for wrapped in (False, True):
        model = tiny_model().train()
        enable_activation_checkpointing(model, use_reentrant=use_reentrant)
        calls = []
        if wrapped:
            for index, layer in enumerate(model.qformer.layer):
                model.qformer.layer[index] = ShardedLayerStandIn(layer)
                model.qformer.layer[index].register_forward_pre_hook(
                    lambda module, args, kwargs: calls.append(kwargs.get("project_image", False)), with_kwargs=True
                )
        with torch.no_grad():
            image_embeds = model.get_image_embeds(pixel_values)  # needs no gradient
        torch.manual_seed(3)
        out = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
        out.loss.backward()
        if wrapped:  # every cross-attention projection went through a wrapper's call
            cross_layers = sum(layer.has_cross_attention for layer in model.qformer.layer)
            assert calls.count(True) >= cross_layers > 0
        results.append((out.loss.detach(), model.qformer.layer[0].crossattention.key.weight.grad.clone(),
                        model.qformer.layer[0].crossattention.value.weight.grad.clone()))
    for plain, wrapped in zip(*results):
        torch.testing.assert_close(plain, wrapped, atol=1e-6, rtol=1e-5)


def test_sdpa_and_eager_attention_agree():
    pixel_values, input_ids, attention_mask = tiny_batch()
    losses = []
    for implementation in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=implementation).eval()
        torch.manual_seed(5)
        losses.append(model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask))
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        assert losses[0][key].item() == pytest.approx(losses[1][key].item(), abs=1e-5)


# ---- hard negative sampling ----------------------------------------------------------------------------------------


def test_hard_negatives_never_draw_a_positive_and_follow_softmax_of_similarity():
    torch.manual_seed(0)
    similarity = torch.tensor([[5.0, 1.0, 0.0, 2.0]]).repeat(20000, 1)
    positive_mask = torch.zeros_like(similarity, dtype=torch.bool)
    positive_mask[:, 0] = True
    drawn = sample_hard_negatives(similarity, positive_mask)
    counts = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    expected = F.softmax(torch.tensor([1.0, 0.0, 2.0]), dim=0)
    assert counts[0] == 0
    torch.testing.assert_close(counts[1:], expected, atol=0.015, rtol=0)


def test_hard_negatives_mask_positives_with_the_originals_additive_minus_10000_not_minus_inf():
    # The original adds -10000 to the positives: a positive keeps exp(-10000 - s) of weight, which only shows where
    # every negative is far below it. There it is drawn (with -inf it never would be).
    similarity = torch.tensor([[0.0, -20000.0, -20000.0], [-20000.0, 1.0, 0.0]]).repeat(500, 1)
    positive_mask = torch.zeros_like(similarity, dtype=torch.bool)
    positive_mask[0::2, 0] = True
    positive_mask[1::2, 1] = True
    drawn = sample_hard_negatives(similarity, positive_mask, torch.Generator().manual_seed(0))
    assert (drawn[0::2] == 0).all()
    assert (drawn[1::2] == 2).all()


# ---- caption generation --------------------------------------------------------------------------------------------


def test_cached_decoding_matches_the_originals_full_pass():
    oracle, model = oracle_and_product()
    image_embeds, input_ids, _ = product_batch(batch_size=2)
    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = PRODUCT_DEC
    decoder = Blip2BridgeCaptionDecoder(model)
    full = oracle_causal_logits(oracle, image_embeds, decoder_input_ids)
    with torch.no_grad():
        first = decoder(decoder_input_ids[:, :3], query_embeds=query_embeds_for(model, 2), image_embeds=image_embeds)
        steps = [first.logits]
        cache = getattr(first, CACHE_KEYWORD)  # the output field has the installed transformers' name
        for t in range(3, decoder_input_ids.shape[1]):
            step = decoder(decoder_input_ids[:, t : t + 1], cache=cache, position_ids=torch.tensor([[t]]))
            steps.append(step.logits)
            cache = getattr(step, CACHE_KEYWORD)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_greedy_generate_equals_the_originals_argmax_loop_without_cache():
    oracle, model = oracle_and_product()
    image_embeds, _, _ = product_batch(batch_size=2)
    generated = model.generate(image_embeds=image_embeds, num_beams=1, do_sample=False, max_length=6, min_length=0)
    tokens = torch.full((2, 1), PRODUCT_DEC)
    for _ in range(5):
        next_token = oracle_causal_logits(oracle, image_embeds, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def oracle_beam_search(oracle, image_embeds, num_beams, length):
    """Plain beam search on the original's joint pass: no end token is reachable (the converted model's [SEP] id is
    past its vocabulary), so every beam runs to `length` and the best is the highest sum of log-probabilities."""
    best = []
    for image in image_embeds:
        beams, scores = torch.full((1, 1), PRODUCT_DEC), torch.zeros(1)
        while beams.shape[1] < length:
            log_probs = oracle_causal_logits(oracle, image[None].expand(len(beams), -1, -1), beams)[:, -1]
            candidates = (scores[:, None] + F.log_softmax(log_probs, dim=-1)).flatten()
            scores, flat = candidates.topk(num_beams)
            vocab_size = log_probs.shape[-1]
            beams = torch.cat([beams[flat // vocab_size], (flat % vocab_size)[:, None]], dim=1)
        best.append(beams[scores.argmax()])
    return torch.stack(best)


def test_beam_search_returns_the_originals_best_beam_starting_with_dec():
    oracle, model = oracle_and_product()
    image_embeds, _, _ = product_batch(batch_size=3)
    generated = model.generate(image_embeds=image_embeds, num_beams=3, max_length=5, min_length=0)
    expected = oracle_beam_search(oracle, image_embeds, num_beams=3, length=5)
    assert (generated[:, 0] == PRODUCT_DEC).all()
    assert torch.equal(generated, expected)
    greedy = model.generate(image_embeds=image_embeds, num_beams=1, max_length=5, min_length=0)
    assert not torch.equal(greedy, generated)  # the beams matter for these images


def test_caption_defaults_are_the_originals_three_beams_and_10_to_30_tokens():
    # LAVIS Blip2Qformer.generate: num_beams=3, max_length=30, min_length=10 (the [DEC] prompt counted).
    model = tiny_model(qformer_config=dict(tiny_model().config.qformer_config.to_dict(), max_position_embeddings=32))
    model.eval()
    config = Blip2BridgeCaptionDecoder(model).generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (3, 30, 10)
    assert config.eos_token_id == SEP_ID and config.bos_token_id == DEC_ID
    pixel_values, _, _ = tiny_batch(batch_size=2)
    rows = []
    hook = model.itg_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model.itg_head.decoder.bias[SEP_ID] = 100.0  # [SEP] wins as soon as it is allowed: at min_length
            shortest = model.generate(pixel_values=pixel_values)
            model.itg_head.decoder.bias[SEP_ID] = -100.0  # [SEP] never wins: the caption runs to max_length
            longest = model.generate(pixel_values=pixel_values)
    finally:
        hook.remove()
    assert rows[0] == 2 * 3  # every image decoded with 3 beams
    assert shortest.shape[1] == 11 and (shortest[:, 10] == SEP_ID).all() and not (shortest[:, :10] == SEP_ID).any()
    assert longest.shape[1] == 30


# ---- persistence ---------------------------------------------------------------------------------------------------


def test_automodel_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for auto_class in (AutoModel, AutoModelForPreTraining):
        loaded = auto_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert type(loaded) is Blip2BridgeModel
        outputs = []
        for candidate in (model, loaded):
            torch.manual_seed(11)
            outputs.append(candidate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask))
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "logits_per_image", "itm_logits"):
            assert torch.equal(outputs[0][key], outputs[1][key]), key
        assert loaded.itg_head.decoder.weight.data_ptr() == loaded.qformer.word_embeddings.weight.data_ptr()


def test_image_embeds_input_equals_pixel_values_input():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    torch.manual_seed(0)
    from_pixels = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    torch.manual_seed(0)
    from_embeds = model(image_embeds=from_pixels.image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        assert from_pixels[key].item() == from_embeds[key].item()


def test_return_loss_false_stops_after_the_similarities():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
    assert out.loss is None and out.itm_logits is None
    assert out.logits_per_image.shape == (4, 4)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_errors_that_name_the_value():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with pytest.raises(ValueError, match=r"4 channels\); expected \(batch, 3, height, width\) \(RGB\)"):
        model(pixel_values=torch.randn(2, 4, 28, 28), input_ids=input_ids[:2])
    with pytest.raises(ValueError, match="input_ids has batch size 4 but there are 3 images"):
        model(pixel_values=pixel_values[:3], input_ids=input_ids, attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"input_ids has shape \(4, 0\)"):
        model(pixel_values=pixel_values, input_ids=input_ids[:, :0])
    too_long = torch.full((4, 17), 7)
    with pytest.raises(ValueError, match="17 tokens is longer than the Q-Former's position table"):
        model(pixel_values=pixel_values, input_ids=too_long)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeds"):
        model(pixel_values=pixel_values, image_embeds=torch.randn(4, 5, 24), input_ids=input_ids)
    with pytest.raises(ValueError, match=r"image_embeds has shape \(4, 5, 9\); expected \(batch, image_length, 24\)"):
        model(image_embeds=torch.randn(4, 5, 9), input_ids=input_ids)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 3\)"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask[:, :3])


def test_images_of_another_size_than_the_tower_takes_are_refused_naming_both_sizes():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=2, image_size=42)
    with pytest.raises(ValueError, match=r"pixel_values are 42x42 pixels .* expects 28x28 .*interpolate_pos_encoding"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)


def test_interpolated_position_table_reads_larger_images_through_the_towers_own_interpolation():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=2, image_size=42)
    with torch.no_grad():
        image_embeds = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True)
        tower = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        features = tower.hidden_states[model.config.vision_feature_layer]
        outputs = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    assert image_embeds.shape[1] == 1 + (42 // 14) ** 2  # [CLS] + a 3x3 grid of patches instead of 2x2
    torch.testing.assert_close(image_embeds, model.vision_layernorm(features), rtol=0, atol=0)
    assert torch.isfinite(outputs.loss)


def test_vision_feature_layer_minus_2_reads_the_towers_penultimate_hidden_state():
    model = tiny_model(vision_feature_layer=-2).eval()
    pixel_values, _, _ = tiny_batch(batch_size=2)
    with torch.no_grad():
        image_embeds = model.get_image_embeds(pixel_values)
        hidden_states = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        penultimate, last = (F.layer_norm(hidden_states[i], (24,), model.vision_layernorm.weight,
                                          model.vision_layernorm.bias, model.vision_layernorm.eps) for i in (-2, -1))
    torch.testing.assert_close(image_embeds, penultimate, rtol=0, atol=1e-6)
    assert (image_embeds - last).abs().max() > 0.1


def test_captioning_past_the_position_table_is_refused_naming_the_limit():
    model = tiny_model().eval()
    pixel_values, _, _ = tiny_batch(batch_size=1)
    limit = model.config.qformer_config.max_position_embeddings
    # The last token is predicted from position limit - 1 and never fed back: limit + 1 tokens fit the table.
    generated = model.generate(pixel_values=pixel_values, num_beams=1, max_length=limit + 1, min_length=limit + 1)
    assert generated.shape == (1, limit + 1)
    with pytest.raises(ValueError, match=rf"text position {limit} is past .*max_position_embeddings={limit}"):
        model.generate(pixel_values=pixel_values, num_beams=1, max_length=limit + 2, min_length=limit + 2)


def test_half_precision_loading_keeps_what_trains_in_float32(tmp_path):
    # dtype=float16 puts the frozen tower in half precision; what trains (queries, Q-Former, vision LayerNorm, heads,
    # temperature) stays float32, as the original trains it, and the losses match the float32 model's.
    model = tiny_model()
    model.save_pretrained(tmp_path)
    half = Blip2BridgeModel.from_pretrained(tmp_path, dtype=torch.float16)
    dtypes = {name.split(".")[0]: parameter.dtype for name, parameter in half.named_parameters()}
    assert dtypes.pop("vision_model") == torch.float16
    assert set(dtypes.values()) == {torch.float32}, dtypes
    pixel_values, input_ids, attention_mask = tiny_batch()
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    torch.manual_seed(0)
    half_output = half(**inputs)
    torch.manual_seed(0)
    full_output = model(**inputs)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert abs(getattr(half_output, name).item() - getattr(full_output, name).item()) < 0.01, name
    half_output.loss.backward()
    assert half.query_tokens.grad.dtype == torch.float32 and half.query_tokens.grad.abs().sum() > 0


def test_the_losses_need_two_text_tokens_and_take_exactly_two():
    """ITG predicts each token from the ones before it: [CLS] alone leaves nothing to predict."""
    model = tiny_model()
    pixel_values, input_ids, attention_mask = tiny_batch(text_length=2)
    with pytest.raises(ValueError, match=r"text_length >= 2"):
        model(pixel_values=pixel_values, input_ids=input_ids[:, :1], attention_mask=attention_mask[:, :1],
              return_loss=True)
    output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    assert torch.isfinite(output.loss) and output.loss_itg > 0


def test_itg_loss_leaves_out_targets_marked_minus_100():
    from modeling_blip2.losses import image_grounded_generation_loss

    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, -100, 5, -100])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]], label_smoothing=0.1)
    torch.testing.assert_close(image_grounded_generation_loss(logits, labels), expected)


def test_the_qformer_is_not_treated_as_custom_code_by_transformers():
    """Its `_init_weights` writes through `transformers.initialization`, which leaves loaded tensors alone, so
    transformers may load it as one of its own models (a class-level question, asked before any instance exists)."""
    from modeling_blip2.modeling_qformer import Blip2BridgeQFormerModel

    assert Blip2BridgeQFormerModel.is_custom_code() is False


def test_image_ids_of_the_wrong_shape_are_refused_with_the_expected_shape():
    model = tiny_model()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with pytest.raises(ValueError, match=r"image_ids has shape \(4, 1\); expected \(4,\)"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
              image_ids=torch.arange(4)[:, None], return_loss=True)


def test_the_temperature_is_a_one_element_vector_written_0d_and_read_from_either_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(0.05)
    # FSDP refuses 0-d parameters and DeepSpeed cannot broadcast them.
    assert model.temp.shape == (1,)
    model.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    assert weights["temp"].shape == () and weights["temp"].item() == pytest.approx(0.05)  # LAVIS's shape on disk
    pixel_values, input_ids, attention_mask = tiny_batch()
    batch = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        expected = model.eval()(**batch).logits_per_image
    reloaded = Blip2BridgeModel.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert reloaded.temp.shape == (1,) and reloaded.temp.item() == pytest.approx(0.05)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits_per_image, expected, rtol=0, atol=0)
    # A file holding a 1-element temp loads as well.
    (tmp_path / "vector").mkdir()
    model.config.save_pretrained(tmp_path / "vector")
    save_file({**weights, "temp": torch.tensor([0.04])}, tmp_path / "vector" / "model.safetensors",
              metadata={"format": "pt"})
    assert Blip2BridgeModel.from_pretrained(tmp_path / "vector").temp.tolist() == pytest.approx([0.04])
    # load_state_dict (Trainer checkpoints, the LAVIS converter) takes either shape too.
    for temp in (torch.tensor(0.03), torch.tensor([0.03])):
        fresh = tiny_model(seed=1)
        fresh.load_state_dict({**model.state_dict(), "temp": temp})
        assert fresh.temp.shape == (1,) and fresh.temp.item() == pytest.approx(0.03)
