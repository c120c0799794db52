"""Every ```python and ```bash block of README.md and docs/*.md runs, so that the docs cannot drift from the code.

The blocks are found by reading the markdown: a new block is a new test case, named after its file and the line of
its opening fence ("README.md:L97"). The blocks of one file run in order, in one namespace and one working folder, as
a reader runs them: a later block may use what an earlier one defined or saved. Run alone, a block first runs the
blocks before it.

What the docs take from elsewhere is made locally and tiny:
- hub ids ("bert-base-uncased", "facebook/opt-2.7b", ...) are folders at the same relative paths in the working folder,
  which `from_pretrained` reads as local folders; LAVIS's tower presets ("eva_clip_g", "clip_L") are tiny towers;
- names a block uses without defining them (`images`, `model`, `dataset`, ...) come from `PREAMBLES`;
- files a command reads (LAVIS checkpoints, COCO folders, benchmark data) are written under the names the docs use,
  and absolute paths ("/data/lavis") are re-rooted in the working folder.

`blip2-bridge` commands run in this process through `modeling_blip2.cli.main`, with the arguments that make them
short appended (`appended_arguments`): a fresh `blip2-bridge` process spends about 6 s importing torch and
transformers, which for the 16 documented commands would take more than this file's time budget.
`test_documented_command_runs_through_the_installed_console_script` runs one of them through bash and the installed
console script.
"""

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPConfig, CLIPModel

import modeling_blip2.training
from modeling_blip2 import convert_lavis
from modeling_blip2.cli import main
from tests.helpers import CAPTIONS, make_llm_tokenizer, tokenizer_without_dec
from tests.lavis_reference import lavis_state_dict_random
from tests.data_files import write_benchmark_data, write_coco_folder, write_shards
from tests.lavis_checkpoints import (
    CLIP_CONFIG,
    EVA_CONFIG,
    LAVIS_QFORMER,
    QFORMER_CONFIG,
    eva_tower,
    lavis_stage2_checkpoint,
    save_checkpoint,
    write_json,
)
from tests.tiny_models import tiny_bert, tiny_llm, tiny_model, tiny_stage2
from tests.trainer_helpers import CaptionedImages, stage1_setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread

REPOSITORY = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
RUNNABLE_LANGUAGES = ("python", "bash")
FENCE = re.compile(r"^\s*```\s*(?P<language>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Snippet:
    document: str  # relative to the repository, e.g. "docs/hub.md"
    line: int  # of the opening fence
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.document}:L{self.line}"


def read_snippets(path: Path) -> list[Snippet]:
    """The fenced ```python and ```bash blocks of a markdown file, in order."""
    snippets, opening, language, body = [], None, "", []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line)
        if opening is None:
            if fence:
                opening, language, body = number, fence["language"], []
        elif fence and not fence["language"]:
            if language in RUNNABLE_LANGUAGES:
                code = textwrap.dedent("\n".join(body))
                snippets.append(Snippet(str(path.relative_to(REPOSITORY)), opening, language, code))
            opening = None
        else:
            body.append(line)
    assert opening is None, f"{path.name}: the fence opened at line {opening} is never closed"
    return snippets


SNIPPETS = [snippet for path in DOCUMENTS for snippet in read_snippets(path)]


def entries_for(snippet: Snippet, table: dict) -> list:
    """The values of `table` whose key (a stable substring of a block) the block contains."""
    return [value for key, value in table.items() if key in snippet.code]


# ---- blocks that cannot run here ----------------------------------------------------------------------------------

SKIPPED = {
    "pip install": "sets up a venv and installs packages from the network (CI runs it: .ci/run)",
    "python -m pytest -q": "runs the whole suite, this file included (CI runs it: .ci/run)",
}
if importlib.util.find_spec("bitsandbytes") is None:
    SKIPPED["BitsAndBytesConfig(load_in_4bit"] = (
        "needs bitsandbytes, the quantization extra (CI installs it and runs this block: .ci/run)"
    )


# ---- tiny stand-ins for hub models and LAVIS files ------------------------------------------------------------------

# The image size of ViT-L/14 and EVA ViT-g, so that the docs' default 224 px image processors fit; 32 px patches keep
# the tower cheap (49 patches).
HUB_IMAGE_SIZE = 224


def save_clip(folder: Path) -> None:
    torch.manual_seed(2)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=HUB_IMAGE_SIZE, patch_size=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=60)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).save_pretrained(folder)


def save_bert(folder: Path) -> None:
    tokenizer = tokenizer_without_dec()  # as bert-base-uncased's, which has no [DEC]
    # Room for a caption of 30 generated tokens (generate's default) after [DEC]; queries take no positions.
    tiny_bert(len(tokenizer), max_position_embeddings=40).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_opt(folder: Path) -> None:
    # Room for 32 queries, a prompt and the 256 new tokens of the image-text-to-text pipeline's default.
    tiny_llm("opt", max_position_embeddings=512).save_pretrained(folder)
    make_llm_tokenizer("opt").save_pretrained(folder)


HUB_MODELS = {
    "openai/clip-vit-large-patch14": save_clip,
    "bert-base-uncased": save_bert,
    "facebook/opt-2.7b": save_opt,
}


def write_lavis_files(folder: Path) -> None:
    """LAVIS's released files as they are: checkpoints without the frozen image encoder (LAVIS saves trainable weights
    only), and the tower's own file, whose extra block LAVIS does not build."""
    # The Q-Former's vocabulary is bert-base-uncased's plus [DEC], as in blip2_pretrained.pth.
    qformer = dict(LAVIS_QFORMER, vocab_size=len(tokenizer_without_dec()) + 1)
    save_checkpoint(folder / "blip2_pretrained.pth", lavis_state_dict_random(qformer))
    stage2 = {k: v for k, v in lavis_stage2_checkpoint("opt").items() if not k.startswith("visual_encoder.")}
    save_checkpoint(folder / "blip2_pretrained_opt2.7b.pth", stage2)
    save_checkpoint(folder / "eva_vit_g.pth", eva_tower(), wrap=False)


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory) -> Path:
    """Every stand-in, built once: each document's working folder gets a copy."""
    folder = tmp_path_factory.mktemp("hub")
    for hub_id, save in HUB_MODELS.items():
        save(folder / hub_id)
    write_lavis_files(folder)
    write_json(folder / "qformer.json", QFORMER_CONFIG)
    return folder


# ---- what each document's commands read ---------------------------------------------------------------------------


def save_stage1_with_processor(folder: Path) -> None:
    model, collator = stage1_setup()
    model.save_pretrained(folder)
    collator.processor.save_pretrained(folder)


def save_stage2_with_processor(folder: Path) -> None:
    model, processor = tiny_stage2("opt")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def write_readme_inputs(folder: Path) -> None:
    write_coco_folder(folder, image_dir="train2017", annotation_file="captions_train2017.json")


def write_conversion_inputs(folder: Path) -> None:
    tiny_model().save_pretrained(folder / "my-blip2-stage1")  # an EVA-like Blip2VisionModel tower: exportable


def write_data_inputs(folder: Path) -> None:
    write_coco_folder(folder / "coco", image_dir="train2017", annotation_file="annotations/captions_train2017.json")
    stage2_config = {
        "stage": 2,
        "model_name_or_path": "blip2-stage1",  # the first command's output
        "language_model_name_or_path": "facebook/opt-2.7b",
        "annotation_files": ["coco/annotations/captions_train2017.json"],
        "image_root": "coco/train2017",
        "prompt": "a photo of",
        "output_dir": "blip2-stage2",
        "per_device_train_batch_size": 4,
    }
    (folder / "stage2.yaml").write_text(yaml.safe_dump(stage2_config))


def write_evaluation_inputs(folder: Path) -> None:
    write_benchmark_data(folder / "data" / "lavis")
    save_stage2_with_processor(folder / "my-blip2-opt")
    save_stage1_with_processor(folder / "my-blip2-stage1")


def write_capfilt_inputs(folder: Path) -> None:
    """A stage-1 and a stage-2 model, and the same web images in the three layouts CapFilt reads."""
    save_stage1_with_processor(folder / "blip2-stage1")
    save_stage2_with_processor(folder / "blip2-opt")
    annotation_file = write_coco_folder(folder, image_dir="images", annotation_file="coco_style.json")
    content = json.loads(annotation_file.read_text())
    file_names = {image["id"]: image["file_name"] for image in content["images"]}
    lavis_style = [{"image": file_names[a["image_id"]], "caption": a["caption"], "image_id": a["image_id"]}
                   for a in content["annotations"]]
    write_json(folder / "web_captions.json", lavis_style)
    (folder / "web").mkdir()
    for index, caption in enumerate(CAPTIONS[:3]):
        shutil.copy(folder / "images" / f"{index}.jpg", folder / "web" / f"{index}.jpg")
        (folder / "web" / f"{index}.txt").write_text(caption)
    (folder / "web-shards").mkdir()
    write_shards(folder / "web-shards")


DOCUMENT_INPUTS = {
    "docs/capfilt.md": write_capfilt_inputs,
    "README.md": write_readme_inputs,
    "docs/conversion.md": write_conversion_inputs,
    "docs/data.md": write_data_inputs,
    "docs/evaluation.md": write_evaluation_inputs,
}


# ---- names the blocks use without defining them ---------------------------------------------------------------------


def caption_images(count: int) -> list[Image.Image]:
    """Images of different sizes and colours (the processor resizes them)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(count)]


def two_images_and_captions(namespace: dict) -> None:
    namespace["images"], namespace["captions"] = caption_images(2), CAPTIONS[:2]


def stage1_training_inputs(namespace: dict) -> None:
    model, collator = stage1_setup()
    namespace.update(model=model, dataset=CaptionedImages(), collator=collator)


def stage2_prompt_inputs(namespace: dict) -> None:
    """An image, and the tokenizer the README's stage-2 model was built with."""
    namespace.update(image=caption_images(1)[0], llm_tokenizer=namespace["opt_tokenizer"])


def stage2_processor(model, tokenizer):
    """The stage-2 processor of `model`: images resized to its tower's input size, its number of queries."""
    from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeProcessor

    size = model.config.vision_config.image_size
    image_processor = Blip2BridgeImageProcessor(size={"height": size, "width": size})
    return Blip2BridgeProcessor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens)


def stage2_on_the_opt_stand_in(opt_folder: Path):
    """A 28 px stage-2 model on the "facebook/opt-2.7b" stand-in, whose 512 positions hold the image-text-to-text
    pipeline's default of 256 new tokens, and its processor."""
    from transformers import AutoTokenizer

    from modeling_blip2 import build_stage2_model

    tokenizer = AutoTokenizer.from_pretrained(opt_folder)
    model = build_stage2_model(tiny_model(), opt_folder, tokenizer=tokenizer)
    return model, stage2_processor(model, tokenizer)


def saved_stage2_model(namespace: dict) -> None:
    """A stage-2 model and its processor, saved as "my-blip2" as the README saves its own, and two images."""
    model, processor = stage2_on_the_opt_stand_in(Path("facebook/opt-2.7b"))
    model.save_pretrained("my-blip2")
    processor.save_pretrained("my-blip2")
    image, other = caption_images(2)
    namespace.update(model=model, processor=processor, image=image, other=other)


def hub_repository(namespace: dict) -> None:
    shutil.copytree("my-blip2", "user/my-blip2")


def stage2_model(namespace: dict) -> None:
    namespace["model"] = tiny_stage2("opt")[0]


def stage2_generation_inputs(namespace: dict) -> None:
    """The processor's output for the stage-2 model of docs/conversion.md's first block."""
    processor = stage2_processor(namespace["model"], namespace["tokenizer"])
    namespace["inputs"] = processor(images=caption_images(1), text="a photo of")


PREAMBLES = {
    "model = build_stage1_model(": two_images_and_captions,
    "Blip2BridgeTrainer(model=model, args=args": stage1_training_inputs,
    'processor(images=image, text="Question: what is shown? Answer:")': stage2_prompt_inputs,
    'answerer = pipeline("image-text-to-text", model="my-blip2")': saved_stage2_model,
    '"user/my-blip2"': hub_repository,
    "peft_model = get_peft_model(model,": stage2_model,
    "model = get_peft_model(model, config)": stage2_generation_inputs,
}


# ---- what the commands get appended ---------------------------------------------------------------------------------


def appended_arguments(arguments: list[str], hub: Path) -> list[str]:
    """What the test appends to a documented command's arguments (subcommand first); later flags override earlier
    ones."""
    subcommand, text = arguments[0], " ".join(arguments)
    appended = []
    if subcommand == "quickstart":
        appended += ["--help"]  # the run takes minutes; tests/test_quickstart.py runs it (slow)
    if subcommand == "convert" and "--from lavis" in text:
        appended += ["--qformer-config", str(hub / "qformer.json")]  # the default Q-Former is BERT-base's size
    if subcommand == "train":
        appended += ["--max_steps", "1"]
    if "--bf16" in text:
        appended += ["--use_cpu"]  # transformers allows bf16 without a GPU only when told to use the CPU
    return appended


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, one argument list each: continued lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [command for line in joined.splitlines() if (command := shlex.split(line, comments=True))]


def as_cli_arguments(command: list[str], folder: Path) -> list[str]:
    """`blip2-bridge ARGS` and `accelerate launch -m modeling_blip2.cli ARGS` (here in one process) -> ARGS, with
    absolute paths ("/data/lavis") re-rooted in the working folder."""
    if command[:2] == ["accelerate", "launch"]:
        module = command.index("-m")
        assert command[module + 1] == "modeling_blip2.cli", command
        arguments = command[module + 2 :]
    else:
        assert command[0] == "blip2-bridge", f"the test runs blip2-bridge commands only, not {command[0]!r}"
        arguments = command[1:]
    return [str(folder / argument.lstrip("/")) if argument.startswith("/") else argument for argument in arguments]


# ---- running a document's blocks ---------------------------------------------------------------------------------


def documented_result(statement: ast.stmt, lines: list[str]) -> object | None:
    """For an expression followed by a comment line holding a Python literal (`# {'accuracy': 100.0}`), the literal."""
    if not isinstance(statement, ast.Expr) or statement.end_lineno >= len(lines):
        return None
    following = lines[statement.end_lineno].strip()
    if not following.startswith("#"):
        return None
    try:
        return ast.literal_eval(following[1:].strip())
    except (ValueError, SyntaxError):
        return None


def run_python(snippet: Snippet, namespace: dict) -> None:
    """Runs the block statement by statement; tracebacks name the document and its line numbers."""
    lines = snippet.code.splitlines()
    tree = ast.parse(snippet.code)
    filename = str(REPOSITORY / snippet.document)  # so that tracebacks quote the document's lines
    for statement in tree.body:
        expected = documented_result(statement, lines)
        ast.increment_lineno(statement, snippet.line)
        if expected is None:
            exec(compile(ast.Module([statement], type_ignores=[]), filename, "exec"), namespace)
        else:
            actual = eval(compile(ast.Expression(statement.value), filename, "eval"), namespace)
            assert actual == expected, f"{snippet}: {ast.unparse(statement)} gives {actual}; the docs say {expected}"


def run_bash(snippet: Snippet, folder: Path, hub: Path) -> None:
    for command in shell_commands(snippet.code):
        arguments = as_cli_arguments(command, folder)
        try:
            exit_code = main(arguments + appended_arguments(arguments, hub))
        except SystemExit as exit:  # --help
            exit_code = exit.code
        assert exit_code == 0, f"{snippet}: {shlex.join(command)} exited with {exit_code}"


@dataclass
class DocumentRun:
    """One document's working folder and namespace, and which of its blocks ran (True) or failed (False)."""

    folder: Path
    namespace: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)

    def run(self, snippet: Snippet, hub: Path) -> None:
        self.outcomes[snippet] = False
        for preamble in entries_for(snippet, PREAMBLES):
            preamble(self.namespace)
        if snippet.language == "python":
            run_python(snippet, self.namespace)
        else:
            run_bash(snippet, self.folder, hub)
        self.outcomes[snippet] = True

    def run_earlier_blocks(self, snippet: Snippet, hub: Path) -> None:
        for earlier in SNIPPETS[: SNIPPETS.index(snippet)]:
            if earlier.document != snippet.document or entries_for(earlier, SKIPPED):
                continue
            if earlier not in self.outcomes:
                self.run(earlier, hub)
            if not self.outcomes[earlier]:
                pytest.skip(f"{earlier} failed, and this block follows it")


@pytest.fixture(scope="session")
def document_runs(hub_folder, tmp_path_factory):
    """The run of a document (by its relative path), made on first use in a copy of the hub folder."""
    runs = {}

    def run_of(document: str) -> DocumentRun:
        if document not in runs:
            folder = tmp_path_factory.mktemp("documents") / Path(document).stem
            shutil.copytree(hub_folder, folder)
            if document in DOCUMENT_INPUTS:
                DOCUMENT_INPUTS[document](folder)
            runs[document] = DocumentRun(folder)
        return runs[document]

    return run_of


RECIPE = modeling_blip2.training.blip2_training_arguments


def short_recipe(stage, output_dir, **overrides):
    """The paper's recipe (250k steps) cut to one step, on the CPU (the docs' bf16 needs `use_cpu` without a GPU)."""
    return RECIPE(stage, output_dir, **{**overrides, "max_steps": 1, "use_cpu": True})


@pytest.fixture
def offline_tiny_world(monkeypatch):
    """No hub, tiny LAVIS towers, a one-step training recipe."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(convert_lavis.VISION_PRESETS, "eva_clip_g", EVA_CONFIG)
    monkeypatch.setitem(convert_lavis.VISION_PRESETS, "clip_L", CLIP_CONFIG)
    monkeypatch.setattr(modeling_blip2.training, "blip2_training_arguments", short_recipe)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_documented_snippet_runs(snippet, document_runs, hub_folder, offline_tiny_world, monkeypatch, capsys):
    skipped = entries_for(snippet, SKIPPED)
    if skipped:
        pytest.skip(f"{snippet}: {skipped[0]}")
    run = document_runs(snippet.document)
    monkeypatch.chdir(run.folder)
    run.run_earlier_blocks(snippet, hub_folder)
    run.run(snippet, hub_folder)
    for check in entries_for(snippet, CHECKS):
        check(run, capsys.readouterr().out)


# ---- what the blocks must have done ---------------------------------------------------------------------------------


def check_stage1_usage(run: DocumentRun, printed: str) -> None:
    from transformers import AutoModel

    names = run.namespace
    outputs = names["outputs"]
    torch.testing.assert_close(outputs.loss, outputs.loss_itc + outputs.loss_itm + outputs.loss_itg)
    assert tuple(names["image_feats"].shape) == (2, 32, 256)
    assert tuple(names["text_feats"].shape) == (2, 256)
    assert tuple(names["match_logits"].shape) == (2, 2)
    assert len(names["captions"]) == 2 and all(isinstance(caption, str) for caption in names["captions"])
    reloaded = AutoModel.from_pretrained("my-blip2")
    assert torch.equal(reloaded.query_tokens, names["model"].query_tokens)


def check_stage2_build(run: DocumentRun, printed: str) -> None:
    model, tokenizer = run.namespace["model"], run.namespace["opt_tokenizer"]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.num_query_tokens == 32


def check_lavis_stage1_conversion(run: DocumentRun, printed: str) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained("blip2-stage1")
    # the tower file's 3 blocks less the one LAVIS does not build
    assert model.config.vision_config.num_hidden_layers == 2
    checkpoint = torch.load("blip2_pretrained.pth", weights_only=True)["model"]
    assert torch.equal(model.query_tokens, checkpoint["query_tokens"])


def check_lavis_stage2_conversion(run: DocumentRun, printed: str) -> None:
    assert json.loads(Path("blip2-opt/config.json").read_text())["text_config"]["model_type"] == "opt"
    assert json.loads(Path("blip2-opt-hf/config.json").read_text())["model_type"] == "blip-2"


def check_stage2_prompts(run: DocumentRun, printed: str) -> None:
    names = run.namespace
    model, input_ids = names["model"], names["inputs"]["input_ids"]
    is_placeholder = input_ids[0] == model.config.image_token_id
    assert is_placeholder[:32].all() and not is_placeholder[32:].any()
    assert len(names["answer"]) == 1 and isinstance(names["answer"][0], str)


def check_training_summary(output_dir: str, stage: int) -> None:
    summary = json.loads(Path(output_dir, "train_summary.json").read_text())
    assert (summary["stage"], summary["steps"]) == (stage, 1)
    # one batch: the 8 captions less the one whose image is a truncated JPEG
    assert (summary["samples"], summary["skipped_samples"]) == (7, 1)


def check_readme_training_command(run: DocumentRun, printed: str) -> None:
    check_training_summary("blip2-stage1-coco", stage=1)


def check_recipe_training(run: DocumentRun, printed: str) -> None:
    trainer, args = run.namespace["trainer"], run.namespace["args"]
    assert trainer.state.global_step == 1
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (1e-4, 0.05, 5000)


def check_mixed_precision_training(run: DocumentRun, printed: str) -> None:
    check_recipe_training(run, printed)
    model = run.namespace["trainer"].model
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def check_peft_unfrozen_bridge(run: DocumentRun, printed: str) -> None:
    model = run.namespace["model"]
    trainable = {name for name, p in run.namespace["peft_model"].named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert all(p.requires_grad for p in model.qformer.parameters())
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def check_pipelines(run: DocumentRun, printed: str) -> None:
    answers = run.namespace["answerer"](images=run.namespace["image"], text="", max_new_tokens=3)
    assert isinstance(answers[0]["generated_text"], str)
    captions = run.namespace["captioner"]([run.namespace["image"], run.namespace["other"]], prompt="a photo of")
    assert len(captions) == 2 and all(isinstance(c[0]["generated_text"], str) for c in captions)


def check_remote_code_load(run: DocumentRun, printed: str) -> None:
    model, processor = run.namespace["model"], run.namespace["processor"]
    assert model.config.num_query_tokens == processor.num_query_tokens == 4
    assert processor.image_token_id == model.config.image_token_id


def check_conversion_stage2(run: DocumentRun, printed: str) -> None:
    from modeling_blip2 import Blip2BridgeForConditionalGeneration

    model = run.namespace["model"]
    assert isinstance(model, Blip2BridgeForConditionalGeneration)
    assert model.config.image_token_id == run.namespace["tokenizer"].convert_tokens_to_ids("<image>")


def check_export(run: DocumentRun, printed: str) -> None:
    from transformers import Blip2ForConditionalGeneration

    assert isinstance(run.namespace["blip2"], Blip2ForConditionalGeneration)


def check_lora(run: DocumentRun, printed: str) -> None:
    from modeling_blip2 import Blip2BridgeForConditionalGeneration

    assert Path("adapters/adapter_config.json").is_file()
    assert isinstance(run.namespace["merged"], Blip2BridgeForConditionalGeneration)
    assert not any("lora" in name for name, _ in run.namespace["merged"].named_parameters())


def check_data_training_commands(run: DocumentRun, printed: str) -> None:
    check_training_summary("blip2-stage1", stage=1)
    check_training_summary("blip2-stage2", stage=2)


def check_evaluation_commands(run: DocumentRun, printed: str) -> None:
    vqa = json.loads(Path("runs/vqav2/metrics.json").read_text())
    assert (vqa["task"], vqa["num_samples"]) == ("vqav2", 5) and 0 <= vqa["accuracy"] <= 100
    assert len(Path("runs/vqav2/predictions.jsonl").read_text().splitlines()) == 5
    retrieval = json.loads(Path("runs/coco_retrieval/metrics.json").read_text())
    # the 3 images of the Karpathy test file and their 9 captions
    assert (retrieval["num_texts"], retrieval["k"]) == (9, 128) and 0 <= retrieval["txt_r1"] <= 100


def check_capfilt_commands(run: DocumentRun, printed: str) -> None:
    # 4 of the 5 images are readable (the fifth is a truncated JPEG); BLIP-2's rule keeps the best two captions each.
    annotations = json.loads(Path("web-capfilt/annotations.json").read_text())
    assert len(annotations) == 4 and all(len(entry["caption"]) == 2 for entry in annotations)
    assert json.loads(Path("web-capfilt/capfilt_summary.json").read_text())["images_skipped"]["corrupt image"] == 1
    # The stage-2 captioner's captions are candidates too.
    opt_rows = json.loads(Path("web-capfilt-opt/annotations.json").read_text())
    summary = json.loads(Path("web-capfilt-opt/capfilt_summary.json").read_text())
    assert summary["images"] == 3 and summary["candidates"]["synthetic"] > 0 and len(opt_rows) <= 3
    shards = sorted(path.name for path in Path("web-capfilt-shards/webdataset").iterdir())
    assert shards == ["00000.tar", "00001.tar"]
    # The model trained on the kept captions was saved.
    assert Path("blip2-stage1-capfilt/model.safetensors").is_file()


def check_capfilt_python(run: DocumentRun, printed: str) -> None:
    dataset, summary = run.namespace["dataset"], run.namespace["summary"]
    assert len(dataset) == summary["kept"]["web"] + summary["kept"]["synthetic"] == 8


def check_quickstart_help(run: DocumentRun, printed: str) -> None:
    assert "usage: blip2-bridge quickstart" in printed and "--size" in printed


CHECKS = {
    "image_feats = model.get_image_features(": check_stage1_usage,
    'build_stage2_model("my-blip2", "facebook/opt-2.7b"': check_stage2_build,
    "convert --from lavis blip2_pretrained.pth --output blip2-stage1": check_lavis_stage1_conversion,
    "--from blip2-bridge blip2-opt --to transformers --output blip2-opt-hf": check_lavis_stage2_conversion,
    'processor(images=image, text="Question: what is shown? Answer:")': check_stage2_prompts,
    "--output_dir blip2-stage1-coco": check_readme_training_command,
    'blip2_training_arguments(stage=1, output_dir="blip2-stage1")  #': check_recipe_training,
    'frozen_dtype="bfloat16")': check_mixed_precision_training,
    "peft_model = get_peft_model(model,": check_peft_unfrozen_bridge,
    'captioner([image, other], prompt="a photo of")': check_pipelines,
    '"user/my-blip2"': check_remote_code_load,
    '"my-blip2-stage1",': check_conversion_stage2,
    "blip2 = export_to_transformers(model": check_export,
    "merged = model.merge_and_unload()": check_lora,
    "blip2-bridge train stage2.yaml": check_data_training_commands,
    "blip2-bridge evaluate --task vqav2": check_evaluation_commands,
    "blip2-bridge quickstart": check_quickstart_help,
    "--image-root images --output web-capfilt\n": check_capfilt_commands,
    'load_lavis_annotations("web-capfilt-python/annotations.json"': check_capfilt_python,
}


# ---- the tables above stay true, and the machinery does what it says -------------------------------------------------


@pytest.mark.parametrize("table", ["SKIPPED", "PREAMBLES", "CHECKS"])
def test_every_table_entry_still_matches_a_block(table):
    stale = [key for key in globals()[table] if not any(key in snippet.code for snippet in SNIPPETS)]
    assert not stale, f"{table} entries that match no block of README.md or docs/*.md: {stale}"


def test_blocks_are_read_from_every_document_with_the_line_of_their_fence():
    hub_snippets = [s for s in SNIPPETS if s.document == "docs/hub.md"]
    lines = (REPOSITORY / "docs/hub.md").read_text().splitlines()
    assert [lines[s.line - 1] for s in hub_snippets] == ["```python"] * 3
    # docs/architecture.md holds only a diagram, fenced without a language: not code
    documents = {str(path.relative_to(REPOSITORY)) for path in DOCUMENTS}
    assert {s.document for s in SNIPPETS} == documents - {"docs/architecture.md"}


def test_a_documented_result_that_differs_fails_the_block():
    snippet = Snippet("docs/example.md", 10, "python", "total = 2\ntotal + 1\n# 4\n")
    with pytest.raises(AssertionError, match=r"docs/example.md:L10: total \+ 1 gives 3; the docs say 4"):
        run_python(snippet, {})
    # metrics.md documents one result this way
    assert any(
        documented_result(statement, s.code.splitlines()) is not None
        for s in SNIPPETS
        if s.language == "python"
        for statement in ast.parse(s.code).body
    )


def test_documented_command_runs_through_the_installed_console_script():
    """One documented command as a reader runs it: bash, the installed console script, a fresh process."""
    (command,) = [
        line for s in SNIPPETS for line in s.code.splitlines() if line.startswith("blip2-bridge quickstart --help")
    ]
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: blip2-bridge quickstart" in result.stdout and "--size" in result.stdout


# ---- the README's stage-2 block serves any stage-2 model ------------------------------------------------------------


def test_readme_stage2_block_runs_with_a_vision_tower_smaller_than_224_pixels(
    offline_tiny_world, hub_folder, tmp_path, monkeypatch
):
    """The quickstart's tower takes 64 px images, the tests' 28 px: the README's processor must follow the model
    (with a fixed 224 px image processor, generate refuses the images)."""
    (snippet,) = [s for s in SNIPPETS if 'processor(images=image, text="Question: what is shown? Answer:")' in s.code]
    model, processor = stage2_on_the_opt_stand_in(hub_folder / "facebook/opt-2.7b")
    assert model.config.vision_config.image_size == 28
    monkeypatch.chdir(tmp_path)
    namespace = dict(model=model, llm_tokenizer=processor.tokenizer, image=caption_images(1)[0])
    run_python(snippet, namespace)
    assert tuple(namespace["inputs"]["pixel_values"].shape) == (1, 3, 28, 28)
    assert len(namespace["answer"]) == 1 and isinstance(namespace["answer"][0], str)
