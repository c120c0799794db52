"""What the Q-Former, the stage-1 model and the caption decoder return beyond their main outputs: attention weights,
hidden states, tuples, and the arguments they refuse (none is silently ignored)."""

import pytest
import torch
import torch.nn.functional as F

from modeling_blip2.compat import HIDDEN_STATE_INDICES_COUNT_EMBEDDINGS
from modeling_blip2.modeling_qformer import QFormerRows
from modeling_blip2.modeling_stage1 import Blip2BridgeCaptionDecoder
from tests.tiny_models import DEC_ID, tiny_batch, tiny_model


def heads_of(attention, states):
    """(batch, heads, positions, head_dim) of a linear projection, split as the attention block does."""
    batch, positions, _ = states.shape
    return attention(states).view(batch, positions, 4, -1).transpose(1, 2)  # the tiny Q-Former has 4 heads


def test_query_pass_attentions_equal_softmax_of_scaled_dot_products_computed_by_hand():
    model = tiny_model().eval()
    pixel_values, _, _ = tiny_batch(batch_size=3)
    image_embeds = model.get_image_embeds(pixel_values)
    with torch.no_grad():
        output = model.get_query_output(image_embeds, output_attentions=True, output_hidden_states=True)
        layers = model.qformer.layer
        assert len(output.hidden_states) == len(layers) + 1
        assert len(output.attentions) == len(layers)
        assert len(output.cross_attentions) == sum(layer.has_cross_attention for layer in layers)
        torch.testing.assert_close(output.hidden_states[-1], output.last_hidden_state)
        for layer_idx, (layer, weights) in enumerate(zip(layers, output.attentions)):
            # The independent oracle: the layer's own projections of its input, softmax(q k^T / sqrt(head_dim)).
            states = output.hidden_states[layer_idx]
            query, key = heads_of(layer.attention.query, states), heads_of(layer.attention.key, states)
            expected = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
            assert weights.shape == (3, 4, 4, 4)
            torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
        cross = output.cross_attentions[0]
        assert cross.shape == (3, 4, model.config.num_query_tokens, image_embeds.shape[1])
        torch.testing.assert_close(cross.sum(dim=-1), torch.ones(cross.shape[:-1]))
    # Asking for them changes no output: the eager path they need agrees with SDPA.
    plain = model.get_query_output(image_embeds).last_hidden_state
    torch.testing.assert_close(output.last_hidden_state, plain, atol=1e-5, rtol=1e-5)
    # Rows that shared the first layer report it per row: image 0 and image 2 started from the same queries.
    torch.testing.assert_close(output.attentions[0][0], output.attentions[0][2])


def test_text_attentions_give_padding_and_future_tokens_zero_weight():
    model = tiny_model().eval()
    _, input_ids, attention_mask = tiny_batch(batch_size=3)
    assert (attention_mask == 0).any()
    with torch.no_grad():
        bidirectional = model.qformer(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        pixel_values, _, _ = tiny_batch(batch_size=3)
        causal = model.qformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_embeds=model.query_tokens,
            image_embeds=model.get_image_embeds(pixel_values),
            is_causal=True,
            output_attentions=True,
        )
    padded_keys = (attention_mask == 0)[:, None, None, :].expand_as(bidirectional.attentions[0])
    assert bidirectional.attentions[0][padded_keys].abs().max() == 0
    num_queries, text_length = model.config.num_query_tokens, input_ids.shape[1]
    weights = causal.attentions[-1]  # (batch, heads, queries + text, queries + text)
    assert weights[:, :, :num_queries, num_queries:].abs().max() == 0  # queries never see text
    future = torch.ones(text_length, text_length, dtype=torch.bool).triu(1)
    assert weights[:, :, num_queries:, num_queries:][..., future].abs().max() == 0  # text sees no later token
    assert weights[:, :, num_queries:, :num_queries].sum() > 0  # text sees the queries


def test_hidden_states_cover_every_position_even_where_the_fast_path_skips_some():
    # The ITC text pass computes only [CLS] in its last layer and skips padding: asked for hidden states, every
    # position is computed, and [CLS] equals the fast path's.
    model = tiny_model().eval()
    _, input_ids, attention_mask = tiny_batch(batch_size=3)
    with torch.no_grad():
        fast = model.qformer(input_ids=input_ids, attention_mask=attention_mask, rows=QFormerRows(output_rows=1))
        full = model.qformer(
            input_ids=input_ids, attention_mask=attention_mask, rows=QFormerRows(output_rows=1), output_hidden_states=True
        )
    assert fast.last_hidden_state.shape[1] == 1
    assert full.last_hidden_state.shape[1] == input_ids.shape[1]
    padded = attention_mask == 0
    assert full.hidden_states[1][padded].abs().min() > 0  # computed, not left at zero
    torch.testing.assert_close(full.last_hidden_state[:, :1], fast.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_return_dict_false_gives_the_outputs_fields_as_a_tuple():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with torch.no_grad():
        torch.manual_seed(0)  # the same ITM hard negatives for both calls
        as_output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        torch.manual_seed(0)
        as_tuple = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        qformer_tuple = model.qformer(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_output.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.loss_itc)
    assert isinstance(qformer_tuple, tuple) and qformer_tuple[0].shape == (*input_ids.shape, 32)


def test_the_towers_hidden_states_are_in_the_output_only_when_asked_for():
    """The tower runs with output_hidden_states to read its feature layer; the rest must not stay in the output, where
    accelerate's mixed precision would copy every one to float32 (15 GB for a ViT-g at batch 256)."""
    from accelerate.utils import convert_outputs_to_fp32

    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        plain = convert_outputs_to_fp32(model.forward)(**inputs)
        asked = model(**inputs, output_hidden_states=True)
    assert list(plain.vision_model_output.keys()) == ["last_hidden_state", "pooler_output"]
    tower_tensors = [value for value in plain.vision_model_output.to_tuple() if torch.is_tensor(value)]
    assert len(tower_tensors) == 2
    num_layers = model.config.vision_config.num_hidden_layers
    assert len(asked.vision_model_output.hidden_states) == num_layers + 1  # the embeddings' output, then each layer's


def test_stage1_forward_refuses_labels_and_unknown_arguments():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch()
    with pytest.raises(ValueError, match="takes no labels"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_cache'"):
        model(pixel_values=pixel_values, input_ids=input_ids, use_cache=True)


def test_caption_decoder_returns_hidden_states_and_attentions_and_refuses_unknown_arguments():
    model = tiny_model().eval()
    pixel_values, _, _ = tiny_batch(batch_size=2)
    decoder = Blip2BridgeCaptionDecoder(model)
    inputs = dict(
        input_ids=torch.full((2, 1), DEC_ID),
        query_embeds=model.query_tokens.expand(2, -1, -1),
        image_embeds=model.get_image_embeds(pixel_values),
    )
    with torch.no_grad():
        output = decoder(**inputs, output_hidden_states=True, output_attentions=True)
        plain = decoder(**inputs)
    assert len(output.hidden_states) == len(model.qformer.layer) + 1
    assert output.attentions[0].shape == (2, 4, model.config.num_query_tokens + 1, model.config.num_query_tokens + 1)
    torch.testing.assert_close(output.logits, plain.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="token_type_ids"):
        decoder(**inputs, token_type_ids=torch.zeros(2, 1, dtype=torch.long))
    # generate() asks the decoder for them step by step.
    generated = model.generate(
        pixel_values=pixel_values, num_beams=1, max_length=4, min_length=1, output_attentions=True,
        output_hidden_states=True, return_dict_in_generate=True,
    )
    assert len(generated.attentions) == generated.sequences.shape[1] - 1


def test_itm_scoring_with_text_and_image_indices_equals_pairs_given_in_full():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    image_embeds = model.get_image_embeds(pixel_values)
    text_index, image_index = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([1, 1, 0, 2, 2])
    with torch.no_grad():
        indexed = model.get_itm_logits(
            input_ids, attention_mask, image_embeds=image_embeds, text_index=text_index, image_index=image_index
        )
        projected = model.get_itm_logits(
            input_ids, attention_mask, text_index=text_index, image_index=image_index,
            image_key_values=model.qformer.project_image(image_embeds),
        )
        in_full = model.get_itm_logits(input_ids[text_index], attention_mask[text_index], image_embeds=image_embeds[image_index])
    torch.testing.assert_close(indexed, in_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projected, in_full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="5 texts \\(text_index\\) but 3 images"):
        model.get_itm_logits(input_ids, attention_mask, image_embeds=image_embeds, text_index=text_index)


def test_features_follow_transformers_get_features_contract():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    with torch.no_grad():
        text = model.get_text_features(input_ids, attention_mask, output_hidden_states=True, output_attentions=True)
        image = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        image_tuple = model.get_image_features(pixel_values, return_dict=False)
        forward = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
    qformer = model.config.qformer_config
    assert text.last_hidden_state.shape == (*input_ids.shape, qformer.hidden_size)
    assert len(text.hidden_states) == qformer.num_hidden_layers + 1 and len(text.attentions) == qformer.num_hidden_layers
    # pooler_output is ITC's text side: the normalised projection of [CLS], as the forward computes it.
    torch.testing.assert_close(text.pooler_output, forward.text_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        text.pooler_output, F.normalize(model.text_proj(text.last_hidden_state[:, 0]), dim=-1), atol=1e-6, rtol=1e-6
    )
    vision = model.config.vision_config
    assert image.last_hidden_state.shape[0] == 3 and image.last_hidden_state.shape[-1] == vision.hidden_size
    assert len(image.hidden_states) == vision.num_hidden_layers + 1 and len(image.attentions) == vision.num_hidden_layers
    torch.testing.assert_close(image.pooler_output, forward.image_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image.query_output, forward.query_output, atol=1e-5, rtol=1e-5)
    assert isinstance(image_tuple, tuple)
    torch.testing.assert_close(image_tuple[0], image.last_hidden_state)
    torch.testing.assert_close(image_tuple[1], image.pooler_output, atol=1e-5, rtol=1e-5)
    # A subset of the hidden states, as the installed transformers reads output_hidden_states=[indices].
    some = model.get_image_features(pixel_values, output_hidden_states=[-1]).hidden_states
    every = image.hidden_states if HIDDEN_STATE_INDICES_COUNT_EMBEDDINGS else image.hidden_states[1:]
    assert len(some) == len(every) > 1 and all(state is None for state in some[:-1])
    assert torch.equal(some[-1], every[-1])


def test_stage1_forward_returns_the_query_pass_hidden_states_and_attentions():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=3)
    with torch.no_grad():
        output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                       output_hidden_states=True, output_attentions=True)
        query_pass = model.get_query_output(model.get_image_embeds(pixel_values), output_hidden_states=True)
    assert len(output.hidden_states) == model.config.qformer_config.num_hidden_layers + 1
    for reported, expected in zip(output.hidden_states, query_pass.hidden_states):
        torch.testing.assert_close(reported, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.hidden_states[-1], output.query_output)
    assert output.attentions[0].shape == (3, 4, model.config.num_query_tokens, model.config.num_query_tokens)
    assert len(output.vision_model_output.hidden_states) == model.config.vision_config.num_hidden_layers + 1


def test_eval_draws_the_same_hard_negatives_on_every_call_and_training_draws_anew():
    model = tiny_model()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        model.eval()
        first, second = model(**inputs), model(**inputs)
        torch.testing.assert_close(first.itm_logits, second.itm_logits)
        assert torch.equal(first.loss, second.loss)
        model.train()
        drawn = set()
        for _ in range(8):
            drawn.add(tuple(model(**inputs).itm_logits[4:8, 1].round(decimals=5).tolist()))
    assert len(drawn) > 1  # training samples its negatives from the global generator, as the original
