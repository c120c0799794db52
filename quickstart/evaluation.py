"""Evaluation of the quickstart's models on held-out scenes: retrieval, captioning and VQA."""

import torch
from tqdm.auto import tqdm

from ..metrics import RetrievalRecall
from ..retrieval import compute_retrieval_scores
from .language import VQA_PROMPT


# Candidates ITM re-ranks per query: the recall at 1/5/10 reported needs only the first few; BLIP-2 uses 128 (COCO)
# or 256 (Flickr) over thousands of items.
RERANK_CANDIDATES = 16


@torch.no_grad()
def image_embeds(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen encoder's features after the vision LayerNorm, for every image (`get_image_embeds`)."""
    model.eval()
    return torch.cat([model.get_image_embeds(batch) for batch in pixel_values.split(batch_size)])


@torch.no_grad()
def retrieval_recall(model, image_embeds: torch.Tensor, text: dict, k: int = RERANK_CANDIDATES) -> dict[str, float]:
    """Text i describes image i: recall at 1/5/10 in both directions (percentages, LAVIS's names), ranked as BLIP-2
    ranks: ITC over every pair, then ITM re-ranks each query's top k."""
    model.eval()
    scores_i2t, scores_t2i = compute_retrieval_scores(
        model, image_embeds, text["input_ids"], text["attention_mask"], k=k
    )
    num_items = len(image_embeds)
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

