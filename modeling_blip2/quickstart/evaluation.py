"""Evaluation of the quickstart's models on held-out scenes: retrieval, captioning and VQA."""

import torch
from tqdm.auto import tqdm

from ..metrics import RetrievalRecall
from .language import VQA_PROMPT


@torch.no_grad()
def retrieval_scores(model, pixel_values: torch.Tensor, input_ids, attention_mask, batch_size: int = 100):
    """(scores_i2t, scores_t2i) of a stage-1 model over every image and text: the ITC similarity (max over queries)."""
    model.eval()
    image_feats = torch.cat([model.get_image_features(pixel_values=batch) for batch in pixel_values.split(batch_size)])
    text_feats = torch.cat(
        [model.get_text_features(ids, mask) for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size))]
    )
    similarity = torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)
    return similarity, similarity.T


def retrieval_recall(model, pixel_values: torch.Tensor, text: dict) -> dict[str, float]:
    """Text i describes image i: recall at 1/5/10 in both directions (percentages, LAVIS's names)."""
    scores_i2t, scores_t2i = retrieval_scores(model, pixel_values, text["input_ids"], text["attention_mask"])
    num_items = len(pixel_values)
    return RetrievalRecall().compute(
        scores_i2t=scores_i2t.tolist(),
        scores_t2i=scores_t2i.tolist(),
        img2txt=[[index] for index in range(num_items)],
        txt2img=list(range(num_items)),
    )


@torch.no_grad()
def generate_texts(model, processor, images: list, prompts: list[str] | None, batch_size: int = 100,
                   max_new_tokens: int = 30, description: str = "generating") -> list[str]:
    """Greedy answers (or captions, without prompts) of a stage-2 model, one per image. `processor`: the stage-2
    `Blip2BridgeProcessor`, whose tokenizer pads on the left so that every row's new tokens follow its prompt."""
    model.eval()
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc=description, unit="batch"):
        batch_images = images[start : start + batch_size]
        texts = [""] * len(batch_images) if prompts is None else prompts[start : start + batch_size]
        inputs = processor(images=batch_images, text=texts, return_tensors="pt")
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=processor.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        outputs.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def vqa_prompts(questions: list[str]) -> list[str]:
    return [VQA_PROMPT.format(question) for question in questions]

