"""The user's path: processor -> model -> loss and captions -> tokenizer, then a saved directory back."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeModel, Blip2BridgeProcessor
from tests.helpers import make_bert_tokenizer
from tests.tiny_models import tiny_config


def test_processor_to_loss_to_captions_and_back_from_disk(tmp_path):
    tokenizer = make_bert_tokenizer()
    processor = Blip2BridgeProcessor(Blip2BridgeImageProcessor(size={"height": 28, "width": 28}), tokenizer)
    config = tiny_config()
    config.qformer_config.vocab_size = len(tokenizer)
    config.qformer_config.bos_token_id = tokenizer.bos_token_id
    config.qformer_config.sep_token_id = tokenizer.sep_token_id
    config.qformer_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = Blip2BridgeModel(config).eval()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).convert("L")]
    inputs = processor(images=images, text=["a cat on a red sofa", "two dogs"], return_tensors="pt")
    assert inputs["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    assert inputs["attention_mask"].tolist()[1][-1] == 0  # "two dogs" is padded to the first caption's length
    torch.manual_seed(1)
    outputs = model(**inputs)
    assert outputs.loss.item() == pytest.approx((outputs.loss_itc + outputs.loss_itm + outputs.loss_itg).item(), abs=1e-6)
    # The processor's padding and mask line up with the model's: more padding changes no loss.
    longer = processor(images=images, text=["a cat on a red sofa", "two dogs"], padding="max_length", max_length=12,
                       return_tensors="pt")
    assert longer["input_ids"].shape[1] == 12 > inputs["input_ids"].shape[1]
    torch.manual_seed(1)
    padded = model(**longer)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert getattr(padded, name).item() == pytest.approx(getattr(outputs, name).item(), abs=1e-5), name
    # The captions reach the model paired with their images: pairing them the other way round changes ITC.
    swapped = processor(images=images, text=["two dogs", "a cat on a red sofa"], return_tensors="pt")
    torch.manual_seed(1)
    assert abs(model(**swapped).loss_itc.item() - outputs.loss_itc.item()) > 1e-3

    generated = model.generate(pixel_values=inputs["pixel_values"], num_beams=1, max_length=6, min_length=4)
    assert (generated[:, 0] == tokenizer.bos_token_id).all()
    captions = processor.batch_decode(generated, skip_special_tokens=True)
    # The words of the generated tokens, without [DEC], [SEP] or [PAD]: at least min_length - 1 = 3 tokens each.
    special = {tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id}
    for caption, tokens in zip(captions, generated.tolist()):
        words = [token for token in tokens if token not in special]
        assert len(words) >= 3 and caption == tokenizer.decode(words)
        assert caption.strip() and not any(name in caption for name in ("[DEC]", "[SEP]", "[PAD]", "[CLS]"))

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    loaded_model = AutoModel.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation).eval()
    reloaded_inputs = loaded_processor(images=images, text=["a cat on a red sofa", "two dogs"], return_tensors="pt")
    for key in inputs:
        assert torch.equal(inputs[key], reloaded_inputs[key]), key
    torch.manual_seed(1)
    reloaded = loaded_model(**reloaded_inputs)
    assert torch.equal(reloaded.loss, outputs.loss)
    reloaded_generated = loaded_model.generate(pixel_values=reloaded_inputs["pixel_values"], num_beams=1, max_length=6,
                                               min_length=4)
    assert loaded_processor.batch_decode(reloaded_generated, skip_special_tokens=True) == captions
