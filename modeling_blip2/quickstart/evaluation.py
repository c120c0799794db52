"""Evaluation of the quickstart's models on held-out scenes: retrieval, captioning and VQA."""

import torch
from tqdm.auto import tqdm

from ..training.collators import image_text_ids
from .language import VQA_PROMPT


@torch.no_grad()
def retrieval_scores(model, pixel_values: torch.Tensor, input_ids, attention_mask, batch_size: int = 128):
    """(scores_i2t, scores_t2i) of a stage-1 model over every image and text: the ITC similarity (max over queries)."""
    model.eval()
    image_feats = torch.cat([model.get_image_features(pixel_values=batch) for batch in pixel_values.split(batch_size)])
    text_feats = torch.cat(
        [
            model.get_text_features(ids, mask)
            for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size))
        ]
    )
    similarity = torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)
    return similarity, similarity.T


def recall_at(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Text i describes image i. Percentages of images whose text ranks in the top k (txt_r*), and of texts whose
    image does (img_r*), as LAVIS's retrieval task names them."""
    target = torch.arange(scores_i2t.shape[0])
    results = {}
    for name, scores in (("txt", scores_i2t), ("img", scores_t2i)):
        rank = (scores > scores[target, target].unsqueeze(1)).sum(dim=1)
        for k in ks:
            results[f"{name}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    return results


@torch.no_grad()
def generate_texts(model, tokenizer, pixel_values: torch.Tensor, prompts: list[str] | None, batch_size: int = 100,
                   max_new_tokens: int = 30, description: str = "generating") -> list[str]:
    """Greedy answers (or captions, without prompts) of a stage-2 model, one per image."""
    model.eval()
    outputs = []
    for start in tqdm(range(0, len(pixel_values), batch_size), desc=description, unit="batch"):
        images = pixel_values[start : start + batch_size]
        texts = [""] * len(images) if prompts is None else prompts[start : start + batch_size]
        rows = image_text_ids(tokenizer, model.config.num_query_tokens, texts)
        length = max(len(row) for row in rows)
        # Left padding, so that every row's new tokens follow its prompt directly.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(row)) + row for row in rows])
        attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
        generated = model.generate(
            pixel_values=images,
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, length:]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def vqa_prompts(questions: list[str]) -> list[str]:
    return [VQA_PROMPT.format(question) for question in questions]


# ---- interim metrics, replaced by modeling_blip2.metrics when it lands ----------------------------------------------
import math
from collections import Counter


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D (x100) of whitespace-tokenised lower-case captions."""
    tokenize = lambda text: text.lower().replace(",", " ").split()  # noqa: E731
    candidates = [tokenize(text) for text in predictions]
    reference_words = [[tokenize(text) for text in refs] for refs in references]
    matches, totals, candidate_length, reference_length = [0] * 4, [0] * 4, 0, 0
    for candidate, refs in zip(candidates, reference_words):
        candidate_length += len(candidate)
        reference_length += min((abs(len(ref) - len(candidate)), len(ref)) for ref in refs)[1]
        for n in range(1, 5):
            counts = _ngrams(candidate, n)
            max_ref = Counter()
            for ref in refs:
                max_ref |= _ngrams(ref, n)
            matches[n - 1] += sum(min(count, max_ref[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(candidate) - n + 1, 0)
    precisions = [(m + 1e-9) / (t + 1e-15) for m, t in zip(matches, totals)]
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / max(candidate_length, 1))
    bleu4 = brevity * math.exp(sum(math.log(p) for p in precisions) / 4)

    document_frequency = [Counter() for _ in range(4)]
    for refs in reference_words:
        for n in range(1, 5):
            document_frequency[n - 1].update(set().union(*(_ngrams(ref, n).keys() for ref in refs)))
    log_num_docs = math.log(len(references))

    def vector(words, n):
        counts = _ngrams(words, n)
        return {gram: count * (log_num_docs - math.log(max(1.0, document_frequency[n - 1][gram]))) for gram, count in counts.items()}

    cider = 0.0
    for candidate, refs in zip(candidates, reference_words):
        score = 0.0
        for n in range(1, 5):
            vc = vector(candidate, n)
            for ref in refs:
                vr = vector(ref, n)
                dot = sum(min(value, vr.get(gram, 0.0)) * vr.get(gram, 0.0) for gram, value in vc.items())
                norm = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vr.values()))
                penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * 6.0**2))
                score += penalty * dot / norm if norm else 0.0
        cider += score / 4 / len(refs) * 10
    return {"BLEU-4": 100 * bleu4, "CIDEr": 100 * cider / len(candidates)}


def vqa_accuracy(predictions: list[str], references: list[list[str]]) -> float:
    return 100 * sum(min(1.0, refs.count(p.strip().lower()) / 3) for p, refs in zip(predictions, references)) / len(predictions)
