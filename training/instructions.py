"""Instruction tuning data (InstructBLIP, Dai et al. 2023): instruction templates per task, and dataset mixing.

InstructBLIP turns each held-in dataset into instruction data by wrapping every example in one template drawn at
random from its task's list (each template starts with the image, `<Image>`, which is our `num_query_tokens` image
placeholders), and samples the datasets in proportion to the square root of their sizes.

Templates (`INSTRUCTION_TEMPLATES`):

- "caption" (13), "vqa" (10) and "vqg" (visual question generation, 6): the InstructBLIP paper's appendix table of
  instruction templates, word for word (read from a transcription of the table and from LAVIS-derived code that holds
  the same lists; the paper's "<Image>" prefix left out, `{question}` / `{answer}` for its "{Question}" / "{Answer}");
- "classification" (20): LAVIS's X-InstructBLIP image-classification templates
  (`TEMPLATES["image"]["classification"]` of `lavis/processors/blip_processors.py`); the answer is the label;
- "ocr_vqa": the VQA templates, with the sample's OCR tokens (if any) put before the instruction as
  "OCR tokens: ...". The paper adds OCR tokens for its scene-text datasets; this wording is ours.

`mix_datasets` interleaves named `datasets` datasets with `datasets.interleave_datasets`, each sampled with probability
sqrt(size) / sum of sqrt(size) unless given an explicit weight.
"""

import math
from collections.abc import Mapping, Sequence

import datasets

from .data import DEFAULT_MAX_WORDS, UnreadableSampleError, pre_caption, pre_question, text_or_most_frequent


CAPTION_TEMPLATES = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

VQA_TEMPLATES = (
    "{question}",
    "Question: {question}",
    "{question} A short answer to the question is",
    "Q: {question} A:",
    "Question: {question} Short answer:",
    "Given the image, answer the following question with no more than three words. {question}",
    "Based on the image, respond to this question with a short answer: {question}. Answer:",
    "Use the provided image to answer the question: {question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{question}"',
    'The question "{question}" can be answered using the image. A short answer is',
)

VQG_TEMPLATES = (
    "Given the image, generate a question whose answer is: {answer}. Question:",
    "Based on the image, provide a question with the answer: {answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{answer}".',
    "From the image provided, craft a question that leads to the reply: {answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {answer}.",
    "Taking the image into account, generate an question that has the answer: {answer}. Question:",
)

CLASSIFICATION_TEMPLATES = (
    "Identify the objects in this image:",
    "What objects can you spot in the picture?",
    "Classify the objects in the photo:",
    "Name the objects visible in the image:",
    "Identify and classify the objects in this image:",
    "What type of objects are in the photo?",
    "Classify the main object in the picture:",
    "Identify the primary object in this image:",
    "Name the main object visible in the photo:",
    "What is the central object in the image?",
    "Can you classify the central object in this photo?",
    "Determine the type of the main object in this picture:",
    "What objects do you identify in the photo?",
    "Please classify the objects in the image:",
    "Please identify the main object in the picture:",
    "What kind of object is displayed in the image?",
    "What object is predominantly featured in the photo?",
    "Classify the object that is the focus of this image:",
    "What is the main object in the picture?",
    "Identify the primary object in the photo:",
)

INSTRUCTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": CAPTION_TEMPLATES,
    "vqa": VQA_TEMPLATES,
    "ocr_vqa": VQA_TEMPLATES,
    "vqg": VQG_TEMPLATES,
    "classification": CLASSIFICATION_TEMPLATES,
}

# The sample columns each task reads: the instruction's fields and the target's.
TASK_COLUMNS = {
    "caption": ("caption",),
    "vqa": ("question", "answer"),
    "ocr_vqa": ("question", "answer", "ocr_tokens"),
    "vqg": ("question", "answer"),
    "classification": ("label",),
}


def task_texts(task: str, sample: Mapping, max_words: int = DEFAULT_MAX_WORDS) -> tuple[dict, str]:
    """The template fields of `sample` for `task` and its target text, cleaned as BLIP cleans them: captions by
    `pre_caption`, questions by `pre_question`; answers and labels stripped. Raises `UnreadableSampleError` ("bad
    text") when a field is missing or empty, and ValueError for an unknown task."""
    if task not in INSTRUCTION_TEMPLATES:
        raise ValueError(f"task {task!r}; expected one of {sorted(INSTRUCTION_TEMPLATES)}")
    if task == "caption":
        caption = pre_caption(text_or_most_frequent(sample, "caption"), max_words)
        if not caption:
            raise UnreadableSampleError(f"caption {sample['caption']!r} is empty after cleaning", "bad text")
        return {}, caption
    if task == "classification":
        return {}, text_or_most_frequent(sample, "label")
    question = pre_question(text_or_most_frequent(sample, "question"), max_words).strip()
    answer = text_or_most_frequent(sample, "answer")
    if not question:
        raise UnreadableSampleError(f"question {sample['question']!r} is empty after cleaning", "bad text")
    if task == "vqg":
        return {"answer": answer}, question
    return {"question": question}, answer


def render_instruction(
    task: str,
    template_index: int,
    sample: Mapping,
    max_words: int = DEFAULT_MAX_WORDS,
    templates: Mapping[str, Sequence[str]] | None = None,
):
    """(instruction, target) of `sample` for `task` with its `template_index`-th template (of `templates`, default
    `INSTRUCTION_TEMPLATES`). "ocr_vqa" puts the sample's `ocr_tokens` (a string or a list of strings) first as
    "OCR tokens: a, b. "."""
    fields, target = task_texts(task, sample, max_words)
    instruction = (templates or INSTRUCTION_TEMPLATES)[task][template_index].format(**fields)
    ocr_tokens = sample.get("ocr_tokens") if task == "ocr_vqa" else None
    if isinstance(ocr_tokens, (list, tuple)):
        ocr_tokens = ", ".join(str(token) for token in ocr_tokens)
    if isinstance(ocr_tokens, str) and ocr_tokens.strip():
        instruction = f"OCR tokens: {ocr_tokens.strip()}. {instruction}"
    return instruction, target


# ---- mixing -------------------------------------------------------------------------------------------------------


def sqrt_size_weights(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Sampling probabilities of named datasets: sqrt(size) / sum of sqrt(sizes) (InstructBLIP), where `weights` gives
    a dataset an explicit relative weight instead of sqrt(size) (the paper also adjusts a few by hand). The result
    sums to 1, in the order of `sizes`."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"weights for {unknown}, which are not among the datasets {list(sizes)}")
    raw = {}
    for name, size in sizes.items():
        if name in weights:
            raw[name] = float(weights[name])
        elif size is None:
            raise ValueError(f"dataset {name!r} has no length (streamed): give it an explicit weight")
        else:
            raw[name] = math.sqrt(size)
        if not raw[name] >= 0 or math.isinf(raw[name]):
            raise ValueError(f"dataset {name!r} has weight {raw[name]}; expected a finite number >= 0")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"the weights {raw} sum to 0; at least one dataset needs a positive weight")
    return {name: value / total for name, value in raw.items()}


def mix_datasets(
    named_datasets: Mapping[str, datasets.Dataset | datasets.IterableDataset],
    weights: Mapping[str, float] | None = None,
    tasks: Mapping[str, str] | None = None,
    seed: int = 0,
    stopping_strategy: str = "all_exhausted",
):
    """
    One dataset drawing from `named_datasets` at random, each with probability proportional to the square root of its
    size (InstructBLIP's balancing), or to its entry in `weights` (relative, unnormalised; a dataset without one
    weighs sqrt(size)). `datasets.interleave_datasets(..., probabilities, seed, stopping_strategy)` does the drawing:

    - `seed` fixes the draws (the same seed gives the same mixture);
    - `stopping_strategy="all_exhausted"` (default) ends once every dataset has been drawn through at least once,
      restarting those that end earlier (small datasets repeat, as sampling with replacement would);
      "first_exhausted" ends with the first dataset to end.

    tasks: a task name ("caption", "vqa", "vqg", "classification", "ocr_vqa") per dataset, stored in a "task" column
        that `InstructionTuningCollator` reads; a dataset that already has a "task" column keeps it. Columns that
        only some datasets have are None in the rows of the others.
    Streamed datasets (`IterableDataset`, no length) need an explicit weight each.
    """
    if not named_datasets:
        raise ValueError("mix_datasets needs at least one dataset")
    tasks = dict(tasks or {})
    unknown_tasks = {name: task for name, task in tasks.items() if task not in INSTRUCTION_TEMPLATES}
    if unknown_tasks:
        raise ValueError(f"unknown tasks {unknown_tasks}; expected one of {sorted(INSTRUCTION_TEMPLATES)}")
    parts = {}
    for name, dataset in named_datasets.items():
        task = tasks.get(name)
        if task is not None and "task" not in (dataset.column_names or []):
            if isinstance(dataset, datasets.Dataset):
                dataset = dataset.add_column("task", [task] * len(dataset))
            else:
                dataset = dataset.map(lambda row, task=task: {"task": task})
        parts[name] = dataset
    sizes = {name: len(d) if isinstance(d, datasets.Dataset) else None for name, d in parts.items()}
    probabilities = sqrt_size_weights(sizes, weights)
    if len(parts) == 1:
        return next(iter(parts.values()))
    return datasets.interleave_datasets(
        list(parts.values()),
        probabilities=[probabilities[name] for name in parts],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


__all__ = [
    "INSTRUCTION_TEMPLATES",
    "mix_datasets",
    "render_instruction",
    "sqrt_size_weights",
    "task_texts",
]
