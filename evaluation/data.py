"""The benchmarks' annotation files, read from a local folder laid out as LAVIS's dataset cache.

    DATA_DIR/
      coco/annotations/v2_OpenEnded_mscoco_val2014_questions.json   VQAv2 val questions (official)
      coco/annotations/v2_mscoco_val2014_annotations.json           VQAv2 val answers (official)
      coco/annotations/coco_karpathy_test.json                      COCO Karpathy test: [{"image", "caption": [...]}]
      coco/images/val2014/COCO_val2014_000000000042.jpg             COCO images, named by the files above
      okvqa/annotations/OpenEnded_mscoco_val2014_questions.json     OK-VQA val questions (official)
      okvqa/annotations/mscoco_val2014_annotations.json             OK-VQA val answers (official)
      gqa/annotations/testdev_balanced_questions.json              GQA test-dev balanced (official dict or LAVIS list)
      gqa/images/n161313.jpg
      nocaps/annotations/nocaps_val_4500_captions.json              NoCaps val (official, COCO caption format)
      nocaps/images/0013ea2087020901.jpg
      flickr30k/annotations/flickr30k_test.json                     Flickr30K 1k test: [{"image", "caption": [...]}]
      flickr30k/images/flickr30k-images/1007129816.jpg
"""

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskData:
    """What a task evaluates. `samples`: one dict per question (VQA) or image (captioning, retrieval), each with an
    absolute "image" path. Retrieval also has `texts` (every caption, in order) and each sample's "text_ids"."""

    samples: list[dict]
    texts: list[str] | None = None


def read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found; see docs/evaluation.md for the expected layout")
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def check_images_exist(samples: list[dict], annotation: Path) -> None:
    missing = [sample["image"] for sample in samples if not Path(sample["image"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(samples)} images named by {annotation} are missing, e.g. {missing[0]}"
        )


# ---- text normalisation of the original's eval processors (LAVIS BlipQuestionProcessor, BlipCaptionProcessor) -----


# ---- loaders --------------------------------------------------------------------------------------------------------


def load_vqa_official(data_dir: Path, questions_file: str, annotations_file: str) -> TaskData:
    """VQAv2 / OK-VQA: the official question and annotation JSONs; images are COCO val2014."""
    questions_path, annotations_path = data_dir / questions_file, data_dir / annotations_file
    questions = read_json(questions_path)["questions"]
    answers = {
        annotation["question_id"]: [answer["answer"] for answer in annotation["answers"]]
        for annotation in read_json(annotations_path)["annotations"]
    }
    samples = []
    for question in questions:
        if question["question_id"] not in answers:
            raise ValueError(f"question {question['question_id']} of {questions_path} has no entry in {annotations_path}")
        image = data_dir / "coco" / "images" / "val2014" / f"COCO_val2014_{question['image_id']:012d}.jpg"
        samples.append({
            "question_id": question["question_id"],
            "image": str(image),
            "question": question["question"],
            "answers": answers[question["question_id"]],
        })
    check_images_exist(samples, questions_path)
    return TaskData(samples)


def load_gqa(data_dir: Path) -> TaskData:
    """GQA test-dev balanced: the official {question_id: {"imageId", "question", "answer"}} or LAVIS's list of
    {"question_id", "image", "question", "answer"}."""
    path = data_dir / "gqa" / "annotations" / "testdev_balanced_questions.json"
    annotations = read_json(path)
    if isinstance(annotations, dict):
        annotations = [
            {"question_id": question_id, "image": f"{entry['imageId']}.jpg", **entry}
            for question_id, entry in annotations.items()
        ]
    samples = [
        {
            "question_id": entry["question_id"],
            "image": str(data_dir / "gqa" / "images" / entry["image"]),
            "question": entry["question"],
            "answers": [entry["answer"]],
        }
        for entry in annotations
    ]
    check_images_exist(samples, path)
    return TaskData(samples)


def load_karpathy_style(data_dir: Path, dataset: str, annotation_file: str) -> TaskData:
    """LAVIS's test files: a list of {"image": relative path, "caption": [captions]}; texts in file order."""
    path = data_dir / dataset / "annotations" / annotation_file
    samples, texts = [], []
    for entry in read_json(path):
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        text_ids = list(range(len(texts), len(texts) + len(captions)))
        texts.extend(captions)
        image = str(data_dir / dataset / "images" / entry["image"])
        samples.append({"image_id": entry["image"], "image": image, "references": captions, "text_ids": text_ids})
    check_images_exist(samples, path)
    return TaskData(samples, texts)


def load_nocaps(data_dir: Path) -> TaskData:
    """NoCaps val: the official COCO-format file ("images" with "file_name", "annotations" with "caption")."""
    path = data_dir / "nocaps" / "annotations" / "nocaps_val_4500_captions.json"
    annotations = read_json(path)
    references: dict[int, list[str]] = {}
    for annotation in annotations["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    samples = [
        {
            "image_id": image["id"],
            "image": str(data_dir / "nocaps" / "images" / image["file_name"]),
            "references": references.get(image["id"], []),
        }
        for image in annotations["images"]
    ]
    check_images_exist(samples, path)
    return TaskData(samples)


def load_task_data(task: str, data_dir: str | Path) -> TaskData:
    data_dir = Path(data_dir)
    if task == "vqav2":
        return load_vqa_official(
            data_dir,
            "coco/annotations/v2_OpenEnded_mscoco_val2014_questions.json",
            "coco/annotations/v2_mscoco_val2014_annotations.json",
        )
    if task == "okvqa":
        return load_vqa_official(
            data_dir,
            "okvqa/annotations/OpenEnded_mscoco_val2014_questions.json",
            "okvqa/annotations/mscoco_val2014_annotations.json",
        )
    if task == "gqa":
        return load_gqa(data_dir)
    if task in ("coco_caption", "coco_retrieval"):
        return load_karpathy_style(data_dir, "coco", "coco_karpathy_test.json")
    if task == "nocaps":
        return load_nocaps(data_dir)
    if task == "flickr30k":
        return load_karpathy_style(data_dir, "flickr30k", "flickr30k_test.json")
    raise ValueError(f"unknown task {task!r}")
