"""Zero-shot benchmark runs: VQA and captioning with a stage-2 model, retrieval with a stage-1 model.

`evaluate(task, model_dir, data_dir, output_dir)` writes `predictions.jsonl` (one row per question or image) and
`metrics.json` to `output_dir`. Work is split into shards across the processes of `accelerate launch`; each shard's
result is kept under `output_dir/shards/`, so a rerun after an interruption computes only the missing shards.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..processing.image_processing_blip2_bridge import open_image
from ..retrieval import image_text_matching_scores, rerank_scores, select_candidates
from ..losses import max_over_queries_similarity
from ..processing.text_cleaning import pre_caption, pre_question
from ..processing.end_of_text import default_end_of_text, end_of_text_ids
from .data import TaskData, load_task_data
from .shards import JSONL, TENSORS, check_resumable, map_shards, write_jsonl


@dataclass(frozen=True)
class GenerationSettings:
    """Prompt, beam search and stop of a generative task.

    min_new_tokens and max_new_tokens count generated tokens only (LAVIS's T5 `min_length` also counts the decoder's
    start token: its min_len 8 is 7 new tokens here). end_of_text: the text whose token ends an answer or caption
    ("\n" for OPT, as the original); None for the LLM's own EOS token.
    """

    prompt: str
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = -1.0
    repetition_penalty: float = 1.0
    end_of_text: str | None = None


# The defaults, per task and LLM family ("opt", "encoder_decoder" = FlanT5, "decoder_only" = any other), from LAVIS's
# released eval configs (lavis/projects/blip2/eval/*.yaml) and what they leave to the code they call: the captioning
# prompt is the evaluated model's (lavis/configs/models/blip2/*.yaml: "a photo of" for the COCO-finetuned OPT, "" for
# the pretrained FlanT5 the T5 configs name) and the VQA length penalty the default of `predict_answers` (OPT 0, T5 -1).
# LAVIS has no BLIP-2 config for other decoder-only LLMs, nor for NoCaps with OPT: those follow the paper.
# docs/evaluation.md lists every value with its file.
SHORT_ANSWER_PROMPT = "Question: {} Short answer:"
LAVIS_SETTINGS = {
    "vqa": {
        "opt": GenerationSettings(SHORT_ANSWER_PROMPT, length_penalty=0.0),
        "encoder_decoder": GenerationSettings(SHORT_ANSWER_PROMPT, min_new_tokens=0),
        "decoder_only": GenerationSettings("Question: {} Answer:"),
    },
    "coco_caption": {
        "opt": GenerationSettings("a photo of", max_new_tokens=30, min_new_tokens=8, length_penalty=1.0),
        "encoder_decoder": GenerationSettings("", max_new_tokens=30, min_new_tokens=7, length_penalty=1.0),
        "decoder_only": GenerationSettings("a photo of", max_new_tokens=30, min_new_tokens=8, length_penalty=1.0),
    },
    "nocaps": {
        "opt": GenerationSettings("a photo of", max_new_tokens=80, min_new_tokens=10, length_penalty=1.0),
        # The NoCaps configs' keys (annotation_file, img_ids) are read by lavis/tasks/captioning.py from ac8fc98 on,
        # which passes repetition_penalty (default 1.15) and length_penalty (1.0 here) to `generate`.
        "encoder_decoder": GenerationSettings(
            "", max_new_tokens=80, min_new_tokens=9, length_penalty=1.0, repetition_penalty=1.15
        ),
        "decoder_only": GenerationSettings("a photo of", max_new_tokens=80, min_new_tokens=10, length_penalty=1.0),
    },
}
# `defaults="lavis"` (the released configs, which produce the released numbers) or "paper" (the paper's text where
# it differs: VQA prompt "Question: {} Answer:" for decoder-only LLMs, length penalty -1; captions "a photo of").
DEFAULTS = ("lavis", "paper")
VQA_TASKS = ("vqav2", "okvqa", "gqa")
CAPTION_TASKS = ("coco_caption", "nocaps")
RETRIEVAL_TASKS = ("flickr30k", "coco_retrieval")
TASKS = VQA_TASKS + CAPTION_TASKS + RETRIEVAL_TASKS
# LAVIS tokenises retrieval texts to at most 35 tokens.
RETRIEVAL_MAX_TEXT_LENGTH = 35
# Image-text pairs per ITM pass in retrieval (the original's k_test rows per pass).
ITM_BATCH_SIZE = 128


def load_metric(name: str, **kwargs):
    """One of the project's `evaluate.Metric`s: VQAAccuracy, CaptionMetrics or RetrievalRecall."""
    from .. import metrics

    return getattr(metrics, name)(**kwargs)


def llm_family(text_config) -> str:
    """"opt", "encoder_decoder" (FlanT5 and any other encoder-decoder LLM) or "decoder_only" (any other)."""
    if text_config.model_type == "opt":
        return "opt"
    return "encoder_decoder" if text_config.is_encoder_decoder else "decoder_only"


def default_generation_settings(task: str, text_config, defaults: str = "lavis") -> GenerationSettings:
    """The task's prompt, beam search and stop for this LLM, from LAVIS's released configs or the paper's text."""
    if defaults not in DEFAULTS:
        raise ValueError(f"defaults is {defaults!r}; expected one of {', '.join(DEFAULTS)}")
    family = llm_family(text_config)
    settings = LAVIS_SETTINGS["vqa" if task in VQA_TASKS else task][family]
    # The stop belongs to the checkpoint (what its LLM was trained to end with), so it is the same under both defaults.
    settings = replace(settings, end_of_text=default_end_of_text(text_config))
    if defaults == "paper":
        if task in VQA_TASKS:
            prompt = SHORT_ANSWER_PROMPT if family == "encoder_decoder" else "Question: {} Answer:"
            settings = replace(settings, prompt=prompt, length_penalty=-1.0)
        else:
            settings = replace(settings, prompt="a photo of")
    return settings


def generation_settings(task: str, text_config, defaults: str = "lavis", overrides: dict | None = None):
    """The defaults with the caller's overrides; an `end_of_text` override of "" means the LLM's EOS token."""
    settings = replace(default_generation_settings(task, text_config, defaults), **(overrides or {}))
    if settings.end_of_text == "":
        settings = replace(settings, end_of_text=None)
    return settings


def generate_kwargs(settings: GenerationSettings, tokenizer) -> dict:
    """The keyword arguments of `model.generate` for these settings; `eos_token_id` when the stop is not the EOS."""
    kwargs = dict(
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        length_penalty=settings.length_penalty,
        repetition_penalty=settings.repetition_penalty,
    )
    if settings.end_of_text is not None:
        ids = end_of_text_ids(tokenizer, settings.end_of_text)
        if len(ids) != 1:
            raise ValueError(
                f"end_of_text {settings.end_of_text!r} is {len(ids)} tokens {ids} for this tokenizer; generation stops "
                "at one token: expected a text of one token"
            )
        # Only this token stops generation, as LAVIS passes eos_token_id = the id of "\n" alone.
        kwargs["eos_token_id"] = ids[0]
    return kwargs


def stage2_text_config(config, model_dir, task: str):
    """The LLM's config of a stage-2 model; an error naming the folder for a stage-1 one."""
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        raise ValueError(f"{model_dir} holds a stage-1 model; {task} needs a stage-2 model with a language model")
    return text_config


def evaluate(
    task: str,
    model_dir: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    batch_size: int = 16,
    shard_size: int = 512,
    limit: int | None = None,
    k: int = 128,
    vqa_metric: str = "official",
    generation: dict | None = None,
    defaults: str = "lavis",
    dtype: str = "float32",
    accelerator: Accelerator | None = None,
) -> dict | None:
    """Runs one benchmark; returns the metrics on the main process (None on the others).

    defaults: the generation defaults, "lavis" (LAVIS's released eval configs) or "paper" (the paper's text).
    generation: overrides of the task's `GenerationSettings` (prompt, num_beams, max_new_tokens, min_new_tokens,
    length_penalty, repetition_penalty, end_of_text). limit: evaluate only the first `limit` questions/images. k: ITM
    re-ranking candidates per query.
    """
    if task not in TASKS:
        raise ValueError(f"task is {task!r}; expected one of {', '.join(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; expected at least 1")
    accelerator = accelerator or Accelerator()
    output_dir = Path(output_dir)
    data = load_task_data(task, data_dir)
    if limit is not None:
        data = limit_task_data(data, limit)
    settings = None
    if task not in RETRIEVAL_TASKS:
        from transformers import AutoConfig

        text_config = stage2_text_config(AutoConfig.from_pretrained(model_dir), model_dir, task)
        settings = generation_settings(task, text_config, defaults, generation)
    # The settings in full, not the overrides: shards made under other defaults are not reused.
    run_arguments = dict(task=task, model=str(model_dir), data_dir=str(data_dir), limit=limit, shard_size=shard_size,
                         k=k if task in RETRIEVAL_TASKS else None,
                         generation=None if settings is None else asdict(settings), dtype=dtype,
                         model_files=model_files(model_dir))
    check_resumable(output_dir, run_arguments, accelerator)

    model, processor = load_model_and_processor(task, model_dir, dtype, accelerator.device)
    if task in RETRIEVAL_TASKS:
        rows, metrics = evaluate_retrieval(model, processor, data, output_dir, batch_size, shard_size, k, accelerator)
    else:
        rows = map_shards(
            accelerator,
            output_dir / "shards" / "predictions",
            len(data.samples),
            shard_size,
            lambda items: generate_predictions(model, processor, task, [data.samples[i] for i in items], settings,
                                               batch_size, accelerator),
            JSONL,
        )
        rows = [row for shard in rows for row in shard]
        metrics = None
        if accelerator.is_main_process:
            metrics = {**generative_metrics(task, rows, vqa_metric), "generation": asdict(settings)}

    if not accelerator.is_main_process:
        return None
    metrics = {"task": task, "model": str(model_dir), "num_samples": len(data.samples), **metrics}
    write_jsonl(rows, output_dir / "predictions.jsonl")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def limit_task_data(data: TaskData, limit: int) -> TaskData:
    if limit < 1:
        raise ValueError(f"limit is {limit}; expected at least 1 sample")
    samples = data.samples[:limit]
    if data.texts is None:
        return TaskData(samples)
    # Retrieval keeps the captions of the kept images only, renumbered.
    texts, kept = [], []
    for sample in samples:
        text_ids = list(range(len(texts), len(texts) + len(sample["text_ids"])))
        texts.extend(data.texts[i] for i in sample["text_ids"])
        kept.append({**sample, "text_ids": text_ids})
    return TaskData(kept, texts)


def model_files(model_dir) -> list[list] | None:
    """[name, bytes, modification time in ns] of a local model folder's weights and configs, so that shards computed
    with other weights are not reused after the folder was retrained or replaced (as make, by size and time)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None  # a Hub id: its revision is part of the name
    return [
        [path.name, path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json")
    ]


def load_model_and_processor(task: str, model_dir, dtype: str, device):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from ..modeling_stage1 import Blip2BridgeModel

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype is {dtype!r}; expected a torch dtype name such as float32, bfloat16 or float16")
    processor = AutoProcessor.from_pretrained(model_dir)
    if task in RETRIEVAL_TASKS:
        model = AutoModel.from_pretrained(model_dir, dtype=torch_dtype)
        if not isinstance(model, Blip2BridgeModel):
            raise ValueError(
                f"{model_dir} holds a {type(model).__name__}; retrieval needs a stage-1 Blip2BridgeModel (ITC and ITM)"
            )
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype)
        if not stage2_text_config(model.config, model_dir, task).is_encoder_decoder:
            processor.tokenizer.padding_side = "left"  # batched generation continues every prompt from its end
    return model.to(device).eval(), processor


def load_images(samples: list[dict]) -> list:
    return [open_image(sample["image"]).convert("RGB") for sample in samples]


def batches(items: list, batch_size: int, accelerator: Accelerator, description: str):
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=description, disable=not accelerator.is_local_main_process, leave=False):
        yield items[start : start + batch_size]


# ---- VQA and captioning -----------------------------------------------------------------------------------------


@torch.no_grad()
def generate_predictions(model, processor, task, samples, settings, batch_size, accelerator) -> list[dict]:
    rows = []
    for batch in batches(samples, batch_size, accelerator, task):
        if task in VQA_TASKS:
            prompts = [settings.prompt.format(pre_question(sample["question"])) for sample in batch]
        else:
            prompts = [settings.prompt] * len(batch)
        inputs = processor(images=load_images(batch), text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        generated = model.generate(**inputs, **generate_kwargs(settings, processor.tokenizer))
        if not model.config.text_config.is_encoder_decoder:
            generated = generated[:, inputs["input_ids"].shape[1] :]  # a decoder-only LLM returns the prompt too
        texts = [text.strip() for text in processor.batch_decode(generated, skip_special_tokens=True)]
        for sample, text in zip(batch, texts):
            if task in VQA_TASKS:
                rows.append({"question_id": sample["question_id"], "image": sample["image"],
                             "question": sample["question"], "prediction": text, "answers": sample["answers"]})
            else:
                rows.append({"image_id": sample["image_id"], "image": sample["image"], "prediction": text,
                             "references": sample["references"]})
    return rows


def generative_metrics(task: str, rows: list[dict], vqa_metric: str) -> dict:
    predictions = [row["prediction"] for row in rows]
    if task in VQA_TASKS:
        config_name = "exact" if task == "gqa" else vqa_metric
        result = load_metric("VQAAccuracy", config_name=config_name).compute(
            predictions=predictions, references=[row["answers"] for row in rows]
        )
        return {"accuracy": result["accuracy"], "metric": f"VQAAccuracy/{config_name}"}
    result = load_metric("CaptionMetrics").compute(
        predictions=predictions, references=[row["references"] for row in rows]
    )
    return {**result, "metric": "CaptionMetrics"}


# ---- retrieval ------------------------------------------------------------------------------------------------------


def evaluate_retrieval(model, processor, data: TaskData, output_dir, batch_size, shard_size, k, accelerator):
    """ITC features of every text and image, then ITM on each query's top k, each phase sharded and resumable."""
    shards = output_dir / "shards"
    texts = [pre_caption(text) for text in data.texts]
    tokens = processor(text=texts, padding="longest", max_length=RETRIEVAL_MAX_TEXT_LENGTH, return_tensors="pt")
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    device = model.device

    def image_embeds_of(samples: list[dict]) -> torch.Tensor:
        pixel_values = processor(images=load_images(samples), return_tensors="pt")["pixel_values"]
        return model.get_image_embeds(pixel_values.to(device, model.dtype))

    @torch.no_grad()
    def text_features(items: range) -> dict:
        feats = [
            model.get_text_features(input_ids[batch].to(device), attention_mask[batch].to(device)).pooler_output.float().cpu()
            for batch in batches(list(items), batch_size, accelerator, "text features")
        ]
        return {"text_feats": torch.cat(feats)}

    @torch.no_grad()
    def image_features(items: range) -> dict:
        feats = [
            model.get_image_features(image_embeds=image_embeds_of([data.samples[i] for i in batch])).pooler_output.float().cpu()
            for batch in batches(list(items), batch_size, accelerator, "image features")
        ]
        return {"image_feats": torch.cat(feats)}

    text_feats = torch.cat([r["text_feats"] for r in map_shards(
        accelerator, shards / "text_features", len(texts), shard_size, text_features, TENSORS)])
    image_feats = torch.cat([r["image_feats"] for r in map_shards(
        accelerator, shards / "image_features", len(data.samples), shard_size, image_features, TENSORS)])
    similarity = max_over_queries_similarity(image_feats, text_feats)
    candidates = select_candidates(similarity, k)
    image_of_pair = candidates.pairs[:, 0].contiguous()

    @torch.no_grad()
    def itm_scores(items: range) -> dict:
        # This shard's images, a few at a time: each one's keys/values serve all its candidate texts.
        scores = []
        for batch in batches(list(items), batch_size, accelerator, "ITM re-ranking"):
            start, end = batch[0], batch[-1] + 1
            rows = torch.arange(*torch.searchsorted(image_of_pair, torch.tensor([start, end])).tolist())
            text_index = candidates.pairs[rows, 1]
            scores.append(image_text_matching_scores(
                model,
                image_embeds_of(data.samples[start:end]),
                input_ids[text_index],
                attention_mask[text_index],
                image_of_pair[rows] - start,
                batch_size=ITM_BATCH_SIZE,
            ).cpu())
        return {"scores": torch.cat(scores)}

    pair_scores = torch.cat([r["scores"] for r in map_shards(
        accelerator, shards / "itm", len(data.samples), shard_size, itm_scores, TENSORS)])
    if not accelerator.is_main_process:
        return None, None

    scores_i2t, scores_t2i = rerank_scores(similarity, candidates, pair_scores)
    img2txt = [sample["text_ids"] for sample in data.samples]
    txt2img = [image for image, sample in enumerate(data.samples) for _ in sample["text_ids"]]
    metrics = load_metric("RetrievalRecall").compute(
        scores_i2t=scores_i2t.numpy(), scores_t2i=scores_t2i.numpy(), img2txt=img2txt, txt2img=txt2img
    )
    save_top_k(output_dir / "retrieval_scores.safetensors", scores_i2t, scores_t2i, candidates)
    rows = retrieval_rows(data, texts, scores_i2t, scores_t2i)
    return rows, {**metrics, "k": k, "num_texts": len(texts), "metric": "RetrievalRecall"}


def save_top_k(path: Path, scores_i2t, scores_t2i, candidates) -> None:
    """The re-ranked entries of both matrices (every other entry is -100): enough to rebuild them exactly."""
    from safetensors.torch import save_file

    save_file({
        "text_index": candidates.text_index.contiguous(),
        "scores_i2t": scores_i2t.gather(1, candidates.text_index).contiguous(),
        "image_index": candidates.image_index.contiguous(),
        "scores_t2i": scores_t2i.gather(1, candidates.image_index).contiguous(),
    }, str(path))


def retrieval_rows(data: TaskData, texts, scores_i2t, scores_t2i, top: int = 10) -> list[dict]:
    """One row per image (its top texts) and one per text (its top images), best first."""
    rows = []
    ranked_texts = scores_i2t.topk(min(top, scores_i2t.shape[1]), dim=1).indices.tolist()
    for image_index, (sample, ranked) in enumerate(zip(data.samples, ranked_texts)):
        rows.append({"direction": "image_to_text", "image_index": image_index, "image": sample["image"],
                     "text_ids": sample["text_ids"], "ranked_text_ids": ranked})
    image_of_text = {text_id: image for image, sample in enumerate(data.samples) for text_id in sample["text_ids"]}
    ranked_images = scores_t2i.topk(min(top, scores_t2i.shape[1]), dim=1).indices.tolist()
    for text_id, (text, ranked) in enumerate(zip(texts, ranked_images)):
        rows.append({"direction": "text_to_image", "text_id": text_id, "text": text,
                     "image_index": image_of_text[text_id], "ranked_image_indices": ranked})
    return rows
