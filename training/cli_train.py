"""`blip2-bridge train`: stage-1 or stage-2 training from the command line or a YAML/JSON config file.

    blip2-bridge train --stage 1 --vision_model_name_or_path openai/clip-vit-large-patch14 \
        --qformer_name_or_path bert-base-uncased --annotation_files coco/captions_train2017.json \
        --image_root coco/train2017 --output_dir blip2-stage1 --per_device_train_batch_size 64
    blip2-bridge train config.yaml --max_steps 100     # flags given after the file override its values

The arguments are three dataclasses read by transformers' `HfArgumentParser`: `ModelArguments`, `DataArguments` and
`Blip2BridgeTrainingArguments` (every TrainingArguments option: batch size, learning rate, bf16, logging, checkpoints, ...).
"""

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import yaml
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    SchedulerType,
    set_seed,
)

from .. import builders
from ..hub import explain_missing_folder
from ..processing.end_of_text import default_end_of_text
from ..modeling_stage1 import Blip2BridgeModel
from ..modeling_stage2 import Blip2BridgeForConditionalGeneration
from ..processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from ..processing.processing_blip2_bridge import add_image_token
from .arguments import Blip2BridgeTrainingArguments, recipe_scheduler_kwargs, recipe_values
from .augmentation import RandomAugment, RandomResizedCropAndFlip
from .collators import (
    DEFAULT_INSTRUCTION_TEXT_TOKENS,
    DEFAULT_QFORMER_INSTRUCTION_TOKENS,
    CaptionLMCollator,
    ImageCaptionCollator,
    InstructionTuningCollator,
)
from .data import DEFAULT_MAX_WORDS, SkippedSamples
from .feature_cache import FeatureCache
from .datasets import load_annotation_file, load_image_folder, load_instruction_annotations, load_webdataset
from .instructions import INSTRUCTION_TEMPLATES, mix_datasets
from .trainer import LATEST_CHECKPOINT, Blip2BridgeTrainer, checkpoint_folders, resolve_checkpoint


logger = logging.getLogger(__name__)

CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")
SUMMARY_FILE = "train_summary.json"


@dataclass
class ModelArguments:
    stage: int = field(
        default=1,
        metadata={
            "help": "1: Q-Former representation learning (ITC + ITM + ITG); "
            "2: generative learning through a frozen LLM",
            "choices": [1, 2],
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a blip2-bridge model to continue from: a stage-1 model for --stage 1, a stage-2 model for "
            "--stage 2 (a folder or hub id)"
        },
    )
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "stage 1 from scratch: the frozen vision encoder (e.g. a CLIP model)"}
    )
    qformer_name_or_path: str | None = field(
        default=None, metadata={"help": "stage 1 from scratch: the BERT the Q-Former starts from (bert-base-uncased)"}
    )
    language_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "stage 2 from a stage-1 --model_name_or_path: the frozen LLM (needs the stage-2 builder)"},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "stage 1: the Q-Former's tokenizer; stage 2: the LLM's. Default: the model's folder, else "
            "the BERT (stage 1) or LLM (stage 2) path"
        },
    )
    instruction_aware: bool = field(
        default=False,
        metadata={
            "help": "stage 2 from a stage-1 --model_name_or_path: keep the Q-Former's text side so that it reads the "
            "instruction (InstructBLIP), for --instruction_data"
        },
    )
    qformer_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "stage 2 with --instruction_data and an instruction-aware Q-Former (use_text_input): the "
            "Q-Former's BERT tokenizer; default MODEL/qformer_tokenizer (where training saves it)"
        },
    )
    num_query_tokens: int = field(default=32, metadata={"help": "queries of a Q-Former built from scratch"})
    vision_feature_layer: int = field(
        default=-2,
        metadata={"help": "stage 1 from scratch: the vision encoder's hidden layer the Q-Former reads (default the "
                  "penultimate, as the original's towers; -1 the last)"},
    )


@dataclass
class DataArguments:
    annotation_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "COCO-style ({'images', 'annotations'}) or LAVIS-style (list of {'image', 'caption'}) "
            "JSON files; the kind is read from each file",
            "nargs": "+",
        },
    )
    image_root: str | None = field(default=None, metadata={"help": "the folder the annotation files' paths start in"})
    image_folder: str | None = field(
        default=None, metadata={"help": "a folder of images with same-name .txt captions or a metadata.jsonl"}
    )
    shards: list[str] = field(
        default_factory=list, metadata={"help": "webdataset tar shards (paths or globs), always streamed", "nargs": "+"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "stream the annotation files' rows too (needs --max_steps)"}
    )
    max_words: int = field(default=DEFAULT_MAX_WORDS, metadata={"help": "captions are cut to this many words"})
    max_text_length: int = field(
        default=32,
        metadata={
            "help": "text tokens per sample (LAVIS max_txt_len): stage 1 counts the Q-Former's [CLS] and [SEP], "
            "stage 2 the LLM's prompt and caption tokens, not the image placeholders"
        },
    )
    prompt: str = field(default="", metadata={"help": "stage 2: text before every caption (e.g. 'a photo of')"})
    end_of_text: str | None = field(
        default=None,
        metadata={"help": "stage 2: text that ends every caption (default: '\\n' for OPT, as the original; the LLM's EOS "
                  "otherwise; '</s>' gives OPT's EOS)"},
    )
    split_captions: bool = field(
        default=False, metadata={"help": "stage 2, encoder-decoder LLM: prefix LM on captions split at a random word"}
    )
    use_image_ids: bool = field(
        default=False, metadata={"help": "stage 1: captions of the same image are all ITC positives (fine-tuning)"}
    )
    feature_cache: str | None = field(
        default=None,
        metadata={
            "help": "a folder written by `blip2-bridge cache-features` for this model and data: each sample's image is "
            "replaced by its cached frozen-tower features (vision_layernorm still trains); --augment and "
            "--random_augment then do nothing (the cache's views are the augmentation); a sample whose image is not "
            "in the cache is skipped and counted as a missing file. Refused if the cache was made with another tower"
        },
    )
    augment: bool = field(default=True, metadata={"help": "random resized crop + horizontal flip"})
    min_crop_scale: float = field(default=0.5, metadata={"help": "smallest crop area, as a fraction of the image"})
    random_augment: bool = field(
        default=False,
        metadata={"help": "BLIP's RandomAugment(2, 5) after crop + flip, as the original's configs give Visual Genome"},
    )
    instruction_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "stage 2 instruction tuning (InstructBLIP): task datasets to mix, each "
            "'task=TASK,file=PATH[,image_root=DIR][,weight=W][,name=NAME]' (TASK: "
            f"{', '.join(INSTRUCTION_TEMPLATES)}; image_root default --image_root; a config file may give mappings "
            "with these keys); drawn in proportion to sqrt(size) (the paper's), or to the weights given (relative; a "
            "dataset without one weighs sqrt(size)); each sample wrapped in a random template of its task",
            "nargs": "+",
        },
    )
    instruction_max_length: int = field(
        default=DEFAULT_INSTRUCTION_TEXT_TOKENS,
        metadata={"help": "--instruction_data: LLM text tokens per sample, instruction and target (LAVIS InstructBLIP "
                  "max_txt_len)"},
    )
    qformer_max_length: int = field(
        default=DEFAULT_QFORMER_INSTRUCTION_TOKENS,
        metadata={"help": "--instruction_data: the Q-Former's instruction tokens, [CLS] and [SEP] included (at most "
                  "the Q-Former's max_position_embeddings)"},
    )
    mixing_stopping_strategy: str = field(
        default="all_exhausted",
        metadata={
            "help": "--instruction_data: all_exhausted (every dataset drawn through at least once, smaller ones "
            "repeat) or first_exhausted (the mixture ends with the first dataset to end)",
            "choices": ["all_exhausted", "first_exhausted"],
        },
    )


class OneLineErrorArgumentParser(HfArgumentParser):
    """A bad flag ends in one line that names it: argparse would first print a usage of some 130 flags."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists every flag)\n")


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, Blip2BridgeTrainingArguments]:
    """Parses `blip2-bridge train`'s arguments. Later sources override earlier ones: BLIP-2's recipe for the chosen
    --stage (`training.arguments.recipe_values`: AdamW, wd 0.05, 1e-6 -> 1e-4 -> cosine 1e-5, warm-up and length per
    stage, no gradient clipping), then an optional config file (the first argument, .yaml/.yml/.json), then the flags.
    The recipe's values are the parser's defaults, so `--help` shows the values a run will use."""
    parser = OneLineErrorArgumentParser(
        (ModelArguments, DataArguments, Blip2BridgeTrainingArguments), prog="blip2-bridge train"
    )
    known = {}
    for action in parser._actions:
        known.setdefault(action.dest, action)  # a boolean's --no_NAME complement comes second
    config = {}
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES) and not argv[0].startswith("-"):
        config = read_config_file(argv[0])
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"config file {argv[0]} has unknown keys {unknown}; see blip2-bridge train --help")
        argv = argv[1:]

    stage_flag = flag_value(argv, "stage")
    if stage_flag is None:
        stage = config.get("stage", ModelArguments.stage)  # recipe_values refuses a bad one by name
    else:
        stage = int(stage_flag) if stage_flag in ("1", "2") else ModelArguments.stage  # the parser refuses a bad one
    add_recipe_help(known)
    known["resume_from_checkpoint"].help = (
        f"a checkpoint folder; {LATEST_CHECKPOINT}: the newest complete checkpoint-* in output_dir (incomplete ones "
        "skipped), or a fresh start if there is none; True: the same, an error if there is none"
    )
    defaults = {**recipe_values(stage), **config}
    asks_for_epochs = "num_train_epochs" in config or flag_value(argv, "num_train_epochs") is not None
    if asks_for_epochs and "max_steps" not in config:
        # The recipe's length is in steps, which the Trainer puts before epochs; asking for epochs drops it.
        defaults["max_steps"] = -1
    # On every action of a name: a boolean's --no_NAME complement shares its dest, and argparse reads the first one.
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False

    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    is_recipe_schedule = training_args.lr_scheduler_type == SchedulerType.COSINE_WARMUP_WITH_MIN_LR
    if is_recipe_schedule and not training_args.lr_scheduler_kwargs:
        # As blip2_training_arguments: the warm-up starts at 1e-6 and the decay ends at 1e-5 whatever the peak.
        training_args.lr_scheduler_kwargs = recipe_scheduler_kwargs(training_args.learning_rate)
    return model_args, data_args, training_args


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of the last `--name VALUE` or `--name=VALUE` in `argv` (or `--na-me`, HfArgumentParser's alias), as
    argparse would keep it; None if absent."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    value = None
    for index, argument in enumerate(argv):
        flag, has_value, attached = argument.partition("=")
        if flag in spellings:
            if has_value:
                value = attached
            elif index + 1 < len(argv):
                value = argv[index + 1]
    return value


def add_recipe_help(actions: dict) -> None:
    """Marks the flags whose default is BLIP-2's recipe, with both stages' values where they differ."""
    stage1, stage2 = recipe_values(1), recipe_values(2)
    for name in stage1:
        if stage1[name] == stage2[name]:
            note = "BLIP-2 recipe"
        else:
            note = f"BLIP-2 recipe: stage 1: {stage1[name]}, stage 2: {stage2[name]}"
        actions[name].help = f"{actions[name].help or ''} [{note}]".lstrip()
    actions["lr_scheduler_kwargs"].help += (
        " [BLIP-2 recipe with cosine_warmup_with_min_lr: {'min_lr': 1e-05, 'warmup_lr_rate': 1e-06 / learning_rate}]"
    )
    actions["max_steps"].help += " [-1 when num_train_epochs is given and max_steps is not]"


def read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    except FileNotFoundError as error:
        raise ValueError(f"config file {path} does not exist") from error
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} holds a {type(config).__name__}; expected a mapping of argument names")
    return config


# ---- model, data, trainer ---------------------------------------------------------------------------------------


def load_model_and_tokenizer(model_args: ModelArguments):
    """The model to train and its text tokenizer (the Q-Former's in stage 1, the LLM's in stage 2)."""
    tokenizer_path = model_args.tokenizer_name_or_path
    if model_args.model_name_or_path is not None:
        check_model_stage(model_args)
    if model_args.stage == 1:
        if model_args.model_name_or_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or folder_tokenizer(model_args.model_name_or_path))
            return Blip2BridgeModel.from_pretrained(model_args.model_name_or_path), tokenizer
        if model_args.vision_model_name_or_path is None or model_args.qformer_name_or_path is None:
            raise ValueError(
                "stage 1 needs --model_name_or_path, or --vision_model_name_or_path and --qformer_name_or_path to "
                "build a Q-Former from a vision model and BERT"
            )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_args.qformer_name_or_path)
        model = builders.build_stage1_model(
            model_args.vision_model_name_or_path,
            model_args.qformer_name_or_path,
            tokenizer=tokenizer,
            num_query_tokens=model_args.num_query_tokens,
            vision_feature_layer=model_args.vision_feature_layer,
        )
        return model, tokenizer

    if model_args.model_name_or_path is None:
        raise ValueError(
            "stage 2 needs --model_name_or_path: a stage-2 model, or a stage-1 model with --language_model_name_or_path"
        )
    if model_args.language_model_name_or_path is None:
        model = Blip2BridgeForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or folder_tokenizer(model_args.model_name_or_path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_args.language_model_name_or_path)
        model = builders.build_stage2_model(
            model_args.model_name_or_path,
            model_args.language_model_name_or_path,
            tokenizer=tokenizer,
            instruction_aware=model_args.instruction_aware,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer_image_token_id = add_image_token(tokenizer)
    if model.config.image_token_id != tokenizer_image_token_id:
        raise ValueError(
            f"the tokenizer's image token has id {tokenizer_image_token_id} but the model's config.image_token_id is "
            f"{model.config.image_token_id}; expected the tokenizer saved with the stage-2 model"
        )
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")


def folder_tokenizer(model_path: str) -> str:
    """`model_path` when it holds a tokenizer (or is a hub id); a local folder without one is refused by name."""
    if Path(model_path).is_dir() and not any(Path(model_path, name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{model_path} holds no tokenizer (a folder converted from LAVIS has none); pass --tokenizer_name_or_path, "
            "e.g. bert-base-uncased for the paper's Q-Former (stage 1) or the LLM's tokenizer (stage 2)"
        )
    return model_path


def check_model_stage(model_args: ModelArguments):
    """Refuses, before anything loads, a --model_name_or_path of the other stage than --stage."""
    path = model_args.model_name_or_path
    with explain_missing_folder(path):
        config = AutoConfig.from_pretrained(path)
    is_stage2 = getattr(config, "text_config", None) is not None
    if model_args.stage == 1 and is_stage2:
        raise ValueError(
            f"{path} holds a stage-2 model (Q-Former + language model); --stage 1 continues a stage-1 model. Pass "
            "--stage 2 to train this one, or a stage-1 folder"
        )
    if model_args.stage == 2 and not is_stage2 and model_args.language_model_name_or_path is None:
        raise ValueError(
            f"{path} holds a stage-1 model (no language model); stage 2 from it needs --language_model_name_or_path, "
            "the frozen LLM to bridge to"
        )


def load_image_processor(model_args: ModelArguments, model) -> Blip2BridgeImageProcessor:
    """The model folder's image processor, else the default one at the vision encoder's image size."""
    if model_args.model_name_or_path is not None:
        try:
            return Blip2BridgeImageProcessor.from_pretrained(model_args.model_name_or_path)
        except OSError:
            pass
    image_size = model.config.vision_config.image_size
    return Blip2BridgeImageProcessor(size={"height": image_size, "width": image_size})


INSTRUCTION_DATA_KEYS = ("task", "file", "image_root", "weight", "name")


def parse_instruction_data(entry, default_image_root: str | None) -> dict:
    """One --instruction_data entry, 'task=vqa,file=vqa.json,image_root=images,weight=2,name=vqav2' or a mapping
    with these keys (a config file's list), as {task, file, image_root, weight (None: sqrt(size)), name (default the
    file's stem)}."""
    if isinstance(entry, str):
        pairs = [part.partition("=") for part in entry.split(",") if part.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError(f"--instruction_data entry {entry!r}; expected KEY=VALUE pairs separated by commas")
        entry = {key.strip(): value.strip() for key, _, value in pairs}
    if not isinstance(entry, dict):
        raise ValueError(f"--instruction_data entry {entry!r}; expected 'task=...,file=...' or a mapping")
    unknown = sorted(set(entry) - set(INSTRUCTION_DATA_KEYS))
    missing = [key for key in ("task", "file") if not entry.get(key)]
    if unknown or missing:
        raise ValueError(
            f"--instruction_data entry {entry}: " + (f"unknown keys {unknown}" if unknown else f"no {missing}")
            + f"; the keys are {list(INSTRUCTION_DATA_KEYS)} (task and file required)"
        )
    if entry["task"] not in INSTRUCTION_TEMPLATES:
        raise ValueError(f"--instruction_data entry {entry}: task {entry['task']!r}; expected one of "
                         f"{sorted(INSTRUCTION_TEMPLATES)}")
    image_root = entry.get("image_root", default_image_root)
    if image_root is None:
        raise ValueError(f"--instruction_data entry {entry} has no image_root, and no --image_root is given")
    weight = entry.get("weight")
    try:
        weight = None if weight is None else float(weight)
    except ValueError as error:
        raise ValueError(f"--instruction_data entry {entry}: weight {weight!r} is not a number") from error
    name = str(entry.get("name") or Path(entry["file"]).stem)
    return {"task": entry["task"], "file": str(entry["file"]), "image_root": str(image_root), "weight": weight,
            "name": name}


def load_instruction_mixture(data_args: DataArguments, seed: int = 0):
    """--instruction_data's datasets, each with its task column, mixed by `mix_datasets` (sqrt-size or given
    weights)."""
    entries = [parse_instruction_data(entry, data_args.image_root) for entry in data_args.instruction_data]
    named, weights = {}, {}
    for entry in entries:
        name = entry["name"]
        if name in named:
            raise ValueError(f"--instruction_data: two datasets named {name!r}; give one a name=...")
        named[name] = load_instruction_annotations(entry["file"], entry["image_root"], entry["task"])
        if entry["weight"] is not None:
            weights[name] = entry["weight"]
    return mix_datasets(named, weights=weights, seed=seed, stopping_strategy=data_args.mixing_stopping_strategy)


def load_train_dataset(data_args: DataArguments, seed: int = 0):
    """One dataset from the annotation files, the image folder, the shards or the instruction data (exactly one of
    them); `seed` fixes the instruction data's mixing draws."""
    sources = [bool(data_args.annotation_files), data_args.image_folder is not None, bool(data_args.shards),
               bool(data_args.instruction_data)]
    if sum(sources) != 1:
        raise ValueError(
            "give exactly one data source: --annotation_files (with --image_root), --image_folder, --shards or "
            "--instruction_data"
        )
    if data_args.instruction_data:
        dataset = load_instruction_mixture(data_args, seed)
        return dataset.to_iterable_dataset() if data_args.streaming else dataset
    if data_args.shards:
        return load_webdataset(data_args.shards)
    if data_args.image_folder is not None:
        dataset = load_image_folder(data_args.image_folder)
    else:
        if data_args.image_root is None:
            raise ValueError("--annotation_files needs --image_root, the folder their image paths start in")
        parts = [load_annotation_file(path, data_args.image_root) for path in data_args.annotation_files]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset.to_iterable_dataset() if data_args.streaming else dataset


def make_collator(model_args, data_args, model, tokenizer, image_processor, skipped, feature_cache=None):
    """The collator of the stage and data, and the processor saved with the model. feature_cache: a `FeatureCache`
    checked against the model (`load_feature_cache`): the collator then reads features instead of images."""
    augmentation = None
    if data_args.augment and feature_cache is None:
        augmentation = RandomResizedCropAndFlip(
            image_processor,
            scale=(data_args.min_crop_scale, 1.0),
            random_augment=RandomAugment() if data_args.random_augment else None,
        )
    if model_args.stage == 1 and data_args.instruction_data:
        raise ValueError("--instruction_data trains stage 2 (the LLM reads the instructions); pass --stage 2")
    if model_args.stage == 1:
        processor = Blip2BridgeProcessor(image_processor, tokenizer, max_text_length=data_args.max_text_length)
        collator = ImageCaptionCollator(
            processor,
            image_transform=augmentation,
            max_words=data_args.max_words,
            image_id_column="image_id" if data_args.use_image_ids else None,
            skipped=skipped,
            feature_cache=feature_cache,
        )
        return collator, processor
    text_config = model.config.text_config
    end_of_text = default_end_of_text(text_config) if data_args.end_of_text is None else data_args.end_of_text
    processor = Blip2BridgeProcessor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens)
    if data_args.instruction_data:
        collator = InstructionTuningCollator(
            image_processor,
            tokenizer,
            model.config.num_query_tokens,
            is_encoder_decoder=text_config.is_encoder_decoder,
            qformer_tokenizer=load_qformer_tokenizer(model_args, model),
            # Positions of the Q-Former's text start at 0: at most max_position_embeddings instruction tokens.
            qformer_max_length=min(
                data_args.qformer_max_length, model.config.qformer_config.max_position_embeddings
            ),
            max_words=data_args.max_words,
            max_length=data_args.instruction_max_length,
            end_of_text=end_of_text,
            image_transform=augmentation,
            skipped=skipped,
            feature_cache=feature_cache,
        )
        return collator, processor
    collator = CaptionLMCollator(
        image_processor,
        tokenizer,
        model.config.num_query_tokens,
        is_encoder_decoder=text_config.is_encoder_decoder,
        prompt=data_args.prompt,
        # The cuts draw from torch's global generator, which the run's seed (and DataLoader, per worker) sets.
        split_captions=data_args.split_captions,
        max_words=data_args.max_words,
        max_length=data_args.max_text_length,
        end_of_text=end_of_text,
        image_transform=augmentation,
        skipped=skipped,
        feature_cache=feature_cache,
    )
    # Saved with the model, so that AutoProcessor and the pipelines read the trained folder as they read any other.
    return collator, processor


def load_feature_cache(data_args: DataArguments, model, image_processor) -> FeatureCache | None:
    """--feature_cache's folder, refused when its tower (config, feature layer, image size, weights) is not the
    model's with `image_processor`; None without the flag."""
    if data_args.feature_cache is None:
        return None
    cache = FeatureCache(data_args.feature_cache)
    cache.check_model(model, image_processor)
    if data_args.augment or data_args.random_augment:
        logger.info(
            f"--feature_cache: the images are not read; the cache's {cache.num_views} view(s) per image replace "
            "--augment / --random_augment"
        )
    return cache


QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"  # as transformers' InstructBlipProcessor saves it


def load_qformer_tokenizer(model_args: ModelArguments, model):
    """The Q-Former's tokenizer for an instruction-aware model (None for a Q-Former that reads no text: its LLM still
    reads the instructions): --qformer_tokenizer_name_or_path, else the model folder's qformer_tokenizer/."""
    if not model.config.qformer_config.use_text_input:
        logger.warning(
            "--instruction_data with a Q-Former that reads no text (qformer_config.use_text_input=False): the "
            "instructions reach the LLM only, not the queries"
        )
        return None
    path = model_args.qformer_tokenizer_name_or_path
    if path is None and model_args.model_name_or_path is not None:
        folder = Path(model_args.model_name_or_path, QFORMER_TOKENIZER_FOLDER)
        path = str(folder) if folder.is_dir() else None
    if path is None:
        raise ValueError(
            "an instruction-aware model (qformer_config.use_text_input) reads its instructions with the Q-Former's "
            "BERT tokenizer: pass --qformer_tokenizer_name_or_path (the model folder has no "
            f"{QFORMER_TOKENIZER_FOLDER}/)"
        )
    return AutoTokenizer.from_pretrained(path)


def make_trainer(model, training_args, train_dataset, data_collator, processing_class) -> Blip2BridgeTrainer:
    """The one place the trainer class is chosen."""
    return Blip2BridgeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
    )


# ---- the command ------------------------------------------------------------------------------------------------


def checkpoint_to_resume(training_args: Blip2BridgeTrainingArguments) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names (`training.trainer.resolve_checkpoint`; "True" read as
    True), None to start from scratch; refuses to start from scratch over an earlier run in `--output_dir` (its
    checkpoint-* folders or its model) unless `--overwrite_output_dir`, which first deletes the earlier run's
    checkpoints so that a later "latest" cannot pick one of them up."""
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"  # HfArgumentParser reads the field as a string
    output_dir = Path(training_args.output_dir)
    checkpoints = checkpoint_folders(output_dir)
    earlier_run = [path.name for path in reversed(checkpoints)]
    if (output_dir / SUMMARY_FILE).is_file():
        earlier_run.append(SUMMARY_FILE)
    if earlier_run and training_args.overwrite_output_dir and resume in (None, False):
        if checkpoints and training_args.process_index == 0:
            names = ", ".join(path.name for path in reversed(checkpoints))
            logger.warning(f"--overwrite_output_dir: deleting the earlier run's {names} in {output_dir}")
            for folder in checkpoints:
                shutil.rmtree(folder)
        return None
    checkpoint = resolve_checkpoint(resume, output_dir)
    if earlier_run and checkpoint is None and not training_args.overwrite_output_dir:
        found = f"{output_dir} holds an earlier run ({', '.join(earlier_run)})"
        if resume in (None, False):
            raise ValueError(
                f"{found}; pass --resume_from_checkpoint {LATEST_CHECKPOINT} to continue it from its newest complete "
                "checkpoint, or --overwrite_output_dir to train from scratch over it"
            )
        raise ValueError(
            f"{found} but no complete checkpoint to resume; pass --overwrite_output_dir to train from scratch over it"
        )
    return checkpoint


def train(model_args: ModelArguments, data_args: DataArguments, training_args: Blip2BridgeTrainingArguments) -> dict:
    """Trains, saves the model (and its processor) to `output_dir`, and returns the summary it also writes there."""
    if training_args.output_dir is None:
        raise ValueError("--output_dir is required: the folder the trained model is written to")
    # The collators read the raw columns (image, caption, ...), which the Trainer would otherwise drop.
    training_args.remove_unused_columns = False
    checkpoint = checkpoint_to_resume(training_args)
    set_seed(training_args.seed)

    model, tokenizer = load_model_and_tokenizer(model_args)
    image_processor = load_image_processor(model_args, model)
    train_dataset = load_train_dataset(data_args, seed=training_args.seed)
    is_streaming = not hasattr(train_dataset, "__len__")
    if is_streaming and training_args.max_steps <= 0:
        raise ValueError("streamed data has no length: give --max_steps, the number of optimiser steps to train")
    skipped = SkippedSamples()
    feature_cache = load_feature_cache(data_args, model, image_processor)
    collator, processing_class = make_collator(
        model_args, data_args, model, tokenizer, image_processor, skipped, feature_cache
    )

    trainer = make_trainer(model, training_args, train_dataset, collator, processing_class)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(training_args.output_dir)
        qformer_tokenizer = getattr(collator, "qformer_tokenizer", None)
        if qformer_tokenizer is not None:
            qformer_tokenizer.save_pretrained(Path(training_args.output_dir, QFORMER_TOKENIZER_FOLDER))

    # Each process counts the samples it collated; the summary adds up all processes.
    counts = torch.tensor([skipped.used, *skipped.counts.values()], device=trainer.accelerator.device)
    counts = trainer.accelerator.reduce(counts, reduction="sum").tolist()
    summary = {
        "stage": model_args.stage,
        "steps": trainer.state.global_step,
        "samples": counts[0],
        "skipped_samples": sum(counts[1:]),
        "skipped_by_reason": dict(zip(skipped.counts, counts[1:])),
        "final_losses": final_losses(trainer.state.log_history),
        "mean_train_loss": result.training_loss,
        "output_dir": str(Path(training_args.output_dir).resolve()),
        # samples, skipped samples and mean_train_loss count this invocation's steps only
        "resumed_from": None if checkpoint is None else str(Path(checkpoint).resolve()),
    }
    if trainer.is_world_process_zero():
        Path(training_args.output_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def final_losses(log_history: list[dict]) -> dict[str, float]:
    """The losses of the last logging step (`loss`, and `loss_itc`, `loss_itm`, ... where the trainer logs them)."""
    for entry in reversed(log_history):
        losses = {name: value for name, value in entry.items() if name.startswith("loss")}
        if losses:
            return losses
    return {}


def format_summary(summary: dict) -> str:
    skipped = summary["skipped_samples"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in summary["skipped_by_reason"].items() if count)
    losses = ", ".join(f"{name} {value:.4f}" for name, value in summary["final_losses"].items())
    lines = [
        f"Stage-{summary['stage']} training done: {summary['steps']} steps, {summary['samples']} samples",
        f"  skipped samples: {skipped}" + (f" ({reasons})" if reasons else ""),
        f"  final losses: {losses or 'none logged'}; mean training loss {summary['mean_train_loss']:.4f}",
        f"  model written to {summary['output_dir']}",
    ]
    if summary["resumed_from"] is not None:
        resumed = f"  resumed from {summary['resumed_from']} (samples and the mean loss count the steps after it)"
        lines.insert(1, resumed)
    return "\n".join(lines)


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "train",
        help="train a Q-Former (stage 1) or bridge it to an LLM (stage 2)",
        description="Train BLIP-2 stage 1 or 2. Arguments: [CONFIG.yaml|CONFIG.json] [--flags]; the flags are "
        "ModelArguments, DataArguments and Blip2BridgeTrainingArguments (transformers' TrainingArguments + frozen_dtype, frozen_modules_eval) (see `blip2-bridge train --help`).",
        add_help=False,  # --help goes to HfArgumentParser, which knows every flag
    )

    # Every argument after "train" is HfArgumentParser's to read, options included (argparse's REMAINDER would stop
    # at the first option), so the subcommand's parser hands them over unparsed.
    def pass_arguments_through(arg_strings=None, namespace=None):
        return argparse.Namespace(arguments=list(arg_strings or []), run=run_train), []

    parser.parse_known_args = pass_arguments_through


def run_train(args: argparse.Namespace) -> int:
    model_args, data_args, training_args = parse_arguments(args.arguments)
    summary = train(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(format_summary(summary))
    return 0


__all__ = ["DataArguments", "ModelArguments", "add_train_command", "parse_arguments", "train"]
