"""The user's path: processor -> model -> loss and captions -> tokenizer, then a saved directory back."""

import numpy as np
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
    torch.manual_seed(1)
    outputs = model(**inputs)
    assert torch.isfinite(outputs.loss) and outputs.loss_itg > 0 and outputs.loss_itc > 0

    generated = model.generate(pixel_values=inputs["pixel_values"], num_beams=1, max_length=6, min_length=0)
    assert (generated[:, 0] == tokenizer.bos_token_id).all()
    captions = processor.batch_decode(generated, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)

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
