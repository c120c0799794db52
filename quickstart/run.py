"""`blip2-bridge quickstart`: the whole BLIP-2 recipe on a synthetic corpus, on a CPU, in minutes, without downloads.

Phases: scenes -> tokenizers -> a small image encoder pre-trained on the scenes (then frozen) -> a tiny LLM
pre-trained on the texts (then frozen) -> stage 1 (ITC + ITM + ITG) -> stage 2 (the Q-Former prompts the LLM) ->
evaluation on held-out scenes next to the untrained model -> save, reload, report.
"""

import copy
import json
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForImageTextToText,
    BertConfig,
    BertForMaskedLM,
    pipeline,
    set_seed,
)

from ..builders import build_stage1_model, build_stage2_model
from ..pipeline_image_to_text import Blip2BridgeImageToTextPipeline
from ..processing import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from ..training import Blip2BridgeTrainer
from ..metrics import CaptionMetrics, VQAAccuracy
from ..training.collators import ImageCaptionCollator, InstructionCollator
from . import evaluation
from .capfilt import CAPTIONER as CAPFILT_CAPTIONER, add_caption_noise, clean_corpus, qformer_captions, write_corpus
from .language import VQA_PROMPT, language_texts, make_language_config, pretrain_language_model
from .report import draw_loss_curves, draw_sample_grid, format_results_table
from .scenes import QUESTION_TYPES, make_scenes
from .training import PrecomputedImageCollator, train_with_progress_bar, trainer_arguments, trainer_losses
from .tokenization import train_llm_tokenizer, train_qformer_tokenizer
from .vision import cell_accuracy, cell_labels, make_vision_config, pretrain_vision_model


def knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class QuickstartSettings:
    """The knobs of `blip2-bridge quickstart`; the defaults are sized for a few minutes on two CPU cores."""

    output_dir: str = knob("blip2-quickstart", "folder for the model, results.json and the PNG files")
    seed: int = knob(0, "seed of the scenes, every initialisation and every batch order")
    num_train: int = knob(3000, "training scenes")
    num_test: int = knob(200, "held-out scenes (distinct layouts, none seen in training)")
    image_size: int = knob(64, "image side in pixels")
    vision_steps: int = knob(600, "image-encoder pre-training steps")
    language_steps: int = knob(150, "LLM pre-training steps")
    stage1_steps: int = knob(1000, "stage-1 steps (ITC + ITM + ITG)")
    stage2_steps: int = knob(800, "stage-2 steps (the Q-Former prompts the frozen LLM, which carries LoRA "
                             "adapters): on captions alone, or on captions and answers together when --vqa-steps is 0")
    vqa_steps: int = knob(1400, "VQA fine-tuning steps after stage 2: answers to the scenes' questions, with each "
                          "caption once more (0: no fine-tuning; stage 2 then trains on captions and answers together)")
    batch_size: int = knob(32, "batch size of every phase")
    num_query_tokens: int = knob(8, "learned queries (32 in the paper)")
    qformer_hidden_size: int = knob(128, "Q-Former width (768 in the paper)")
    qformer_layers: int = knob(2, "Q-Former layers (12 in the paper)")
    lora_rank: int = knob(32, "rank of the LoRA adapters on the frozen LLM's projections in stage 2")
    instruction_aware: bool = knob(True, "the Q-Former also reads the prompt (the question), as in BLIP-2's VQA "
                                   "fine-tuning and InstructBLIP; with --no-instruction-aware only the LLM reads it")
    threads: int = knob(1, "CPU threads; at this size one thread is fastest, and any other process on the cores "
                        "slows a multi-threaded run many times over")
    report_to: str = knob("none", "where the Trainer phases also log (e.g. tensorboard, in OUTPUT_DIR/logs/<phase>)")
    caption_noise: float = knob(0.0, "fraction of training captions replaced by another scene's caption, as wrong web "
                                "alt-texts")
    capfilt: bool = knob(False, "clean the training captions with CapFilt (the stage-1 model captions and filters "
                         "them), train stage 1 again on the result and compare it with the noisy model; writes "
                         "OUTPUT_DIR/capfilt/ and results.json's \"capfilt\"")


# How often stage 2 sees each caption when it also trains on answers (--vqa-steps 0); it sees each of the scene's five
# questions once.
CAPTION_REPEATS = 2
# How often VQA fine-tuning sees each scene's caption (next to each of its five questions once): captioning, which
# stage 2 taught, is kept up while the answers are learned, as InstructBLIP mixes captioning into instruction tuning.
# Without them fine-tuning forgets the captions, and colour and shape answers stay lower (docs/quickstart.md).
FINE_TUNING_CAPTION_REPEATS = 1

# LoRA on the frozen LLM in stage 2: every projection of its attention and MLP. A 2-layer LLM of width 128 cannot
# learn to read soft prompts it never saw in pre-training (it answers from the question's wording alone); the paper's
# frozen LLMs are billions of parameters. The base weights stay frozen; the adapters are merged before saving.
LORA_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Presets of `--size`: "small" is a run of under two minutes that still learns retrieval and captioning.
SIZE_PRESETS = {
    "default": {},
    "small": {"num_train": 1000, "num_test": 100, "vision_steps": 400, "language_steps": 100,
              "stage1_steps": 300, "stage2_steps": 250, "vqa_steps": 400},
}

# Learning rates: the toy scale's, not the paper's 1e-4 over hundreds of thousands of steps.
LLM_LEARNING_RATE = 3e-3
STAGE1_LEARNING_RATE = 1e-3
STAGE2_LEARNING_RATE = 2e-3
# Fine-tuning starts from a model that captions: at stage 2's rate it answered as well but lost most exact captions
# (52% against 95% at this rate, docs/quickstart.md).
VQA_FINE_TUNING_LEARNING_RATE = 1e-3

# Seconds per step of each phase with one thread on a 2-core machine (measured with the defaults), for the headers.
SECONDS_PER_STEP = {"image encoder": 0.02, "LLM": 0.04, "stage 1": 0.13, "stage 2": 0.11, "VQA fine-tuning": 0.11}


@dataclass
class QuickstartResults:
    metrics: dict[str, dict[str, float]]  # metric -> {"untrained": ..., "trained": ...}
    # The VQA accuracy of each question type (count, colour, ...), as metrics; a breakdown of "VQA accuracy".
    vqa_by_question_type: dict[str, dict[str, float]]
    timings: dict[str, dict[str, float]]  # phase -> {"wall": seconds, "cpu": seconds}
    files: dict[str, str] = field(default_factory=dict)
    # With --capfilt: wrong_before, wrong_after, right_kept (percent) and the stage-1 model trained on the noisy and on
    # the filtered captions, measured on the held-out scenes.
    capfilt: dict | None = None


class PhaseTimer:
    """Wall-clock and CPU seconds of each phase. On a shared machine the CPU seconds (all threads together) tell
    what the phase costs; the wall clock also counts the time other processes held the cores."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    @contextmanager
    def phase(self, name: str, what: str = ""):
        print(f"\n== {name}" + (f": {what}" if what else ""), flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def run_quickstart(settings: QuickstartSettings) -> QuickstartResults:
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return run_phases(settings)
    finally:
        torch.set_num_threads(threads)


def expected_time(phase: str, steps: int) -> str:
    return f"{steps} steps, about {max(1, round(SECONDS_PER_STEP[phase] * steps))} s"


def run_phases(settings: QuickstartSettings) -> QuickstartResults:
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blip2-quickstart-") as scratch:
        # The Trainer phases save nothing mid-run; their folder holds only the logs of `report_to`, if any.
        log_root = Path(scratch) if settings.report_to == "none" else output_dir / "logs"
        return run_phases_logging_to(settings, output_dir, log_root)


def run_phases_logging_to(settings: QuickstartSettings, output_dir: Path, log_root: Path) -> QuickstartResults:
    set_seed(settings.seed)
    timer, curves, metrics, vqa_by_question_type = PhaseTimer(), {}, {}, {}

    def arguments(phase: str, steps: int, learning_rate: float):
        return trainer_arguments(
            log_root / phase, steps, settings.batch_size, learning_rate, settings.seed, settings.report_to
        )

    with timer.phase("scenes"):
        train_scenes, test_scenes = make_scenes(settings.num_train, settings.num_test, seed=settings.seed)
        image_processor = Blip2BridgeImageProcessor(size={"height": settings.image_size, "width": settings.image_size})
        train_images = [scene.draw(settings.image_size) for scene in train_scenes]
        train_pixels = image_processor(train_images)["pixel_values"]
        test_images = [scene.draw(settings.image_size) for scene in test_scenes]
        test_pixels = image_processor(test_images)["pixel_values"]
        true_captions = [scene.caption for scene in train_scenes]
        train_captions, _ = add_caption_noise(true_captions, settings.caption_noise, settings.seed)
        print(f"{len(train_scenes)} training and {len(test_scenes)} held-out scenes of {settings.image_size}px")
        if settings.caption_noise:
            print(f"{100 * settings.caption_noise:g}% of the training captions replaced by another scene's caption")

    with timer.phase("tokenizers"):
        texts = language_texts(train_captions, [pair for scene in train_scenes for pair in scene.questions])
        qformer_tokenizer = train_qformer_tokenizer(texts)
        llm_tokenizer = train_llm_tokenizer(texts)
        print(f"Q-Former WordPiece: {len(qformer_tokenizer)} tokens; LLM byte-level BPE: {len(llm_tokenizer)} tokens")

    with timer.phase("image encoder pre-training",
                     f"a small ViT learns to name each grid cell's object ({expected_time('image encoder', settings.vision_steps)})"):
        train_labels = torch.tensor([cell_labels(scene) for scene in train_scenes])
        test_labels = torch.tensor([cell_labels(scene) for scene in test_scenes])
        classifier, vision_losses = pretrain_vision_model(
            make_vision_config(settings.image_size),
            train_pixels,
            train_labels,
            steps=settings.vision_steps,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
        curves["image encoder"] = {"loss": list(enumerate(vision_losses, start=1))}
        vision_accuracy = 100 * cell_accuracy(classifier, test_pixels, test_labels)
        print(f"held-out grid cells named right: {vision_accuracy:.1f}%")
        vision_model = classifier.vision_model

    with timer.phase("LLM pre-training",
                     f"a small LLaMA learns the texts, then stays frozen ({expected_time('LLM', settings.language_steps)})"):
        language_model, log = pretrain_language_model(
            make_language_config(llm_tokenizer),
            llm_tokenizer,
            texts,
            arguments("llm", settings.language_steps, LLM_LEARNING_RATE),
        )
        curves["LLM"] = trainer_losses(log)

    stage1 = build_stage1_model(
        vision_model,
        BertForMaskedLM(qformer_bert_config(settings, qformer_tokenizer)),
        tokenizer=qformer_tokenizer,
        num_query_tokens=settings.num_query_tokens,
        cross_attention_frequency=1,
        embed_dim=64,
        vision_feature_layer=-1,  # the toy tower was pre-trained to name the grid cells from its last layer
    )
    qformer_processor = Blip2BridgeProcessor(image_processor, qformer_tokenizer)
    test_text = qformer_processor(text=[scene.caption for scene in test_scenes])
    # An instruction-aware stage 2 reads the prompt with the Q-Former's tokenizer too; the processor saved with it does.
    stage2_qformer_tokenizer = qformer_tokenizer if settings.instruction_aware else None
    llm_processor = Blip2BridgeProcessor(
        image_processor, llm_tokenizer, num_query_tokens=settings.num_query_tokens,
        qformer_tokenizer=stage2_qformer_tokenizer,
    )
    # The baseline: the same parts before stage 1 and stage 2 (pre-trained image encoder and LLM, new Q-Former).
    torch.manual_seed(settings.seed)
    untrained_stage2 = build_stage2_model(
        stage1, language_model, llm_tokenizer, instruction_aware=settings.instruction_aware
    )

    with timer.phase("image features (frozen encoder, once)"):
        train_embeds = evaluation.image_embeds(stage1, train_pixels)
        test_embeds = evaluation.image_embeds(stage1, test_pixels)

    with timer.phase("stage 1: ITC + ITM + ITG",
                     f"the Q-Former learns from the frozen image encoder ({expected_time('stage 1', settings.stage1_steps)})"):
        untrained_retrieval = evaluation.retrieval_recall(stage1, test_embeds, test_text)
        stage1_data = [{"image_index": index, "caption": caption} for index, caption in enumerate(train_captions)]
        initial_stage1 = copy.deepcopy(stage1.state_dict()) if settings.capfilt else None

        def train_stage1(data: list[dict], phase: str, label: str):
            trainer = Blip2BridgeTrainer(
                model=stage1,
                args=arguments(phase, settings.stage1_steps, STAGE1_LEARNING_RATE),
                train_dataset=data,
                data_collator=PrecomputedImageCollator(ImageCaptionCollator(qformer_processor), train_embeds),
            )
            train_with_progress_bar(trainer, label)
            curves[label] = trainer_losses(trainer.state.log_history)

        train_stage1(stage1_data, "stage1", "stage 1")
        trained_retrieval = evaluation.retrieval_recall(stage1, test_embeds, test_text)

    capfilt_results = None
    if settings.capfilt:
        capfilt_folder = output_dir / "capfilt"
        corpus_file = write_corpus(capfilt_folder / "corpus", train_images, train_captions)
        with timer.phase("CapFilt: the stage-1 model captions and filters its own training captions",
                         f"{CAPFILT_CAPTIONER.num_captions} sampled captions per image, the best kept if ITM calls it "
                         "a match"):
            noisy_quality = stage1_quality(stage1, trained_retrieval, test_embeds, qformer_tokenizer, test_scenes)
            stage1_data, capfilt_results = clean_corpus(
                stage1, qformer_processor, corpus_file, true_captions, capfilt_folder / "filtered", settings.seed
            )
            print(
                f"wrong captions: {capfilt_results['wrong_before']:.1f}% before, {capfilt_results['wrong_after']:.1f}% "
                f"after; right captions kept: {capfilt_results['right_kept']:.1f}%"
            )
        with timer.phase("stage 1 on the filtered captions",
                         f"the same model, from the same start ({expected_time('stage 1', settings.stage1_steps)})"):
            stage1.load_state_dict(initial_stage1)
            train_stage1(stage1_data, "stage1_filtered", "stage 1 (filtered captions)")
            trained_retrieval = evaluation.retrieval_recall(stage1, test_embeds, test_text)
            capfilt_results["noisy"] = noisy_quality
            capfilt_results["filtered"] = stage1_quality(
                stage1, trained_retrieval, test_embeds, qformer_tokenizer, test_scenes
            )
    for name in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        metrics[f"retrieval {name}"] = {"untrained": untrained_retrieval[name], "trained": trained_retrieval[name]}

    with timer.phase("stage 2: Q-Former -> frozen LLM",
                     f"the queries learn to prompt the LLM ({expected_time('stage 2', settings.stage2_steps)})"):
        torch.manual_seed(settings.seed)
        # A copy of the LLM: the adapters merged into it must not reach the untrained baseline's LLM.
        stage2 = build_stage2_model(
            stage1, copy.deepcopy(language_model), llm_tokenizer, instruction_aware=settings.instruction_aware
        )
        rank = settings.lora_rank
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model; the warning
            # is addressed to peft, not to the quickstart's user.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            lora_model = get_peft_model(
                stage2, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            )
        # get_peft_model freezes every base weight, the bridge's too.
        for part in (stage2.qformer, stage2.language_projection):
            part.requires_grad_(True)
        stage2.query_tokens.requires_grad_(True)
        stage2_collator = PrecomputedImageCollator(
            InstructionCollator(image_processor, llm_tokenizer, stage2.config.num_query_tokens,
                                qformer_tokenizer=stage2_qformer_tokenizer),
            train_embeds,
        )
        captions_data = [
            {"image_index": row["image_index"], "prompt": "", "response": row["caption"]} for row in stage1_data
        ]

        def train_stage2(data: list[dict], phase: str, steps: int, learning_rate: float, label: str):
            trainer = Blip2BridgeTrainer(
                model=lora_model,
                args=arguments(phase, steps, learning_rate),
                train_dataset=data,
                data_collator=stage2_collator,
            )
            train_with_progress_bar(trainer, label)
            curves[label] = trainer_losses(trainer.state.log_history)

        question_data = [
            {"image_index": index, "prompt": VQA_PROMPT.format(question), "response": answer}
            for index, scene in enumerate(train_scenes)
            for question, answer in scene.questions
        ]
        if settings.vqa_steps:
            # Captions without a prompt, as BLIP-2's stage 2; the answers come in VQA fine-tuning.
            train_stage2(captions_data, "stage2", settings.stage2_steps, STAGE2_LEARNING_RATE, "stage 2")
        else:
            # Captions and answers in one instruction-style set. Each caption appears twice: with one caption per five
            # answers, stage 2 could leave the LLM's prior in place, which starts most texts with "Question:" when
            # given no prompt.
            train_stage2(
                CAPTION_REPEATS * captions_data + question_data, "stage2", settings.stage2_steps, STAGE2_LEARNING_RATE,
                "stage 2",
            )

    if settings.vqa_steps:
        with timer.phase("VQA fine-tuning",
                         f"answers to the scenes' questions ({expected_time('VQA fine-tuning', settings.vqa_steps)})"):
            # The paper fine-tunes its stage-2 model on VQA data with the LLM frozen and the question given to the
            # Q-Former. Trained on captions and answers together from the start, the same model answered 68.5% and
            # never learned where an object is (docs/quickstart.md has the runs).
            fine_tuning_data = FINE_TUNING_CAPTION_REPEATS * captions_data + question_data
            train_stage2(
                fine_tuning_data, "vqa", settings.vqa_steps, VQA_FINE_TUNING_LEARNING_RATE, "VQA fine-tuning"
            )
    stage2 = lora_model.merge_and_unload().eval()

    with timer.phase("evaluation on held-out scenes"):
        questions = [scene.questions[index % len(QUESTION_TYPES)] for index, scene in enumerate(test_scenes)]
        prompts = evaluation.vqa_prompts([question for question, _ in questions])
        answers = [[answer] * 10 for _, answer in questions]  # VQA's ten human answers, all agreeing here
        references = [[scene.caption] for scene in test_scenes]
        captions = {}
        for name, model in (("untrained", untrained_stage2), ("trained", stage2)):
            captions[name] = evaluation.generate_texts(
                model, llm_processor, test_images, None, description=f"captions ({name})"
            )
            predicted_answers = evaluation.generate_texts(
                model, llm_processor, test_images, prompts, max_new_tokens=5, description=f"answers ({name})"
            )
            caption_scores = CaptionMetrics().compute(predictions=captions[name], references=references)
            exact = [caption == scene.caption for caption, scene in zip(captions[name], test_scenes)]
            metrics.setdefault("caption exact match", {})[name] = 100 * sum(exact) / len(exact)
            for metric in ("Bleu_4", "CIDEr"):
                # The COCO toolkit reports fractions; the paper's tables (and ours) show them x100.
                metrics.setdefault(f"caption {metric}", {})[name] = 100 * caption_scores[metric]
            vqa = VQAAccuracy(config_name="official").compute(predictions=predicted_answers, references=answers)
            metrics.setdefault("VQA accuracy", {})[name] = vqa["accuracy"]
            # Per question type, as VQAv2 reports per answer type: which kinds of question the model has learned.
            for type_index, question_type in enumerate(QUESTION_TYPES):
                rows = range(type_index, len(questions), len(QUESTION_TYPES))
                vqa = VQAAccuracy(config_name="official").compute(
                    predictions=[predicted_answers[row] for row in rows], references=[answers[row] for row in rows]
                )
                vqa_by_question_type.setdefault(question_type, {})[name] = vqa["accuracy"]

    with timer.phase("save, reload, report"):
        model_dir = output_dir / "model"
        stage2.save_pretrained(model_dir)
        llm_processor.save_pretrained(model_dir)
        reloaded = AutoModelForImageTextToText.from_pretrained(model_dir)
        reloaded_captions = evaluation.generate_texts(
            reloaded, llm_processor, test_images[:8], None, description="captions (reloaded)"
        )
        captioner = pipeline("image-to-text", model=str(model_dir), pipeline_class=Blip2BridgeImageToTextPipeline)
        pipeline_captions = [
            output[0]["generated_text"].strip() for output in captioner(test_images[:8], max_new_tokens=30)
        ]
        for source, texts in (("AutoModelForImageTextToText", reloaded_captions), ("pipeline", pipeline_captions)):
            if texts != captions["trained"][:8]:
                raise RuntimeError(f"the model reloaded through {source} captions differently: {texts[:2]}")
        print(f'reloaded through AutoModelForImageTextToText and pipeline("image-to-text"): "{pipeline_captions[0]}"')
        files = {
            "model": str(model_dir),
            "loss curves": str(draw_loss_curves(curves, output_dir / "loss_curves.png")),
            "samples": str(
                draw_sample_grid(
                    [scene.draw(4 * settings.image_size) for scene in test_scenes[:12]],
                    [scene.caption for scene in test_scenes[:12]],
                    captions["trained"][:12],
                    output_dir / "samples.png",
                )
            ),
        }
    results = QuickstartResults(
        metrics=metrics, vqa_by_question_type=vqa_by_question_type, timings=timer.seconds, files=files,
        capfilt=capfilt_results,
    )
    results_path = output_dir / "results.json"
    results_path.write_text(json.dumps({"settings": asdict(settings), **asdict(results)}, indent=2))
    results.files["results"] = str(results_path)
    print(format_results_table(results))
    return results


def stage1_quality(stage1, retrieval: dict, test_embeds, tokenizer, test_scenes) -> dict[str, float]:
    """What CapFilt's comparison reads of a stage-1 model on the held-out scenes: its retrieval recall at 1
    (`retrieval`, as `evaluation.retrieval_recall` measured it) and its own decoder's captions (greedy; percent equal to
    the true caption, and CIDEr x100)."""
    captions = qformer_captions(stage1, tokenizer, test_embeds)
    true_captions = [scene.caption for scene in test_scenes]
    cider = CaptionMetrics().compute(predictions=captions, references=[[caption] for caption in true_captions])
    exact = sum(caption == true for caption, true in zip(captions, true_captions))
    return {
        "retrieval txt_r1": retrieval["txt_r1"],
        "retrieval img_r1": retrieval["img_r1"],
        "caption exact match": 100 * exact / len(true_captions),
        "caption CIDEr": 100 * cider["CIDEr"],
    }


def qformer_bert_config(settings: QuickstartSettings, tokenizer) -> BertConfig:
    """A small BERT for the Q-Former to start from; randomly initialised, since nothing is downloaded."""
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.qformer_hidden_size,
        num_hidden_layers=settings.qformer_layers,
        num_attention_heads=4,
        intermediate_size=2 * settings.qformer_hidden_size,
        max_position_embeddings=64,
        # BERT's 0.02 leaves the cross-attention's share of each query output near 1%: every image then looks alike,
        # and a short run ends before that changes. A wider start puts about a third of the output on the image.
        initializer_range=0.15,
        # A few hundred steps over a few thousand scenes do not over-fit; dropout would only slow learning down.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
