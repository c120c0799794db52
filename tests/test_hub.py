"""A saved or pushed folder is self-contained: its own code, auto_map and model card load it where blip2-bridge is
not installed, with the same logits and tokens as the model in memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import modeling_blip2  # noqa: F401  (registers the Auto classes)
from modeling_blip2.hub import REMOTE_CODE_MODULES, flatten_relative_imports
from tests.tiny_models import prompts, tiny_model, tiny_stage2


def make_images(count: int = 2, shape=(30, 26, 3)) -> list[PIL.Image.Image]:
    return [
        PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
        for seed in range(count)
    ]


def test_saved_folder_holds_flat_code_auto_map_pipeline_and_model_card(tmp_path):
    model, processor = tiny_stage2("opt")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    generation_class = "modeling_stage2.Blip2BridgeForConditionalGeneration"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_blip2_bridge.Blip2BridgeConfig",
        "AutoModel": generation_class,
        "AutoModelForImageTextToText": generation_class,
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_image_to_text.Blip2BridgeImageToTextPipeline"
    assert "auto_map" not in model.config.__dict__  # the model in memory keeps resolving to the installed classes
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_blip2_bridge.Blip2BridgeProcessor"}
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_blip2_bridge.Blip2BridgeImageProcessor"
    )
    code_files = {f"{name}.py" for name in REMOTE_CODE_MODULES} | {
        "processing_blip2_bridge.py", "image_processing_blip2_bridge.py",
    }  # fmt: skip
    saved_code_files = {path.name for path in tmp_path.glob("*.py")}
    assert code_files == saved_code_files
    # What builds or converts a model is no part of a loaded one.
    assert "builders.py" not in saved_code_files and "convert_lavis.py" not in saved_code_files
    for path in tmp_path.glob("*.py"):  # flat: relative imports name only files of the folder
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("from ."):
                assert (tmp_path / f"{line.split()[1][1:]}.py").exists(), (path.name, line)

    card = (tmp_path / "README.md").read_text()
    assert "- Stage: stage 2" in card and "pipeline_tag: image-text-to-text" in card
    assert "- Vision encoder: `blip_2_vision_model`" in card
    assert "- Language model: `opt`" in card


def test_stage1_model_card_and_auto_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_stage1.Blip2BridgeModel"
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_stage1.Blip2BridgeModel"
    assert "custom_pipelines" not in config
    card = (tmp_path / "README.md").read_text()
    assert "- Stage: stage 1" in card and "- Language model: none (stage 1)" in card


def test_a_model_card_written_by_the_user_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_relative_import_of_a_module_the_folder_does_not_carry_is_refused():
    assert flatten_relative_imports("from .configuration import A\n", "x.py") == (
        "from .configuration_blip2_bridge import A\n"
    )
    with pytest.raises(ValueError, match=r"x\.py imports \.training, which a saved folder does not carry"):
        flatten_relative_imports("    from .training import Trainer\n", "x.py")


# ---- loading where blip2-bridge is not installed ------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.append(sys.argv[1])  # site-packages only: no project folder, no editable-install finder
    try:
        import modeling_blip2
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("modeling_blip2 is importable: the test would not show that the folder is self-contained")
    import numpy as np, PIL.Image, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    results = {}
    image_shape = tuple(json.loads(sys.argv[3]))
    for kind, folder in json.loads(sys.argv[2]).items():
        inputs = load_file(f"{folder}/inputs.safetensors")
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        as_auto_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(**inputs).logits
            auto_logits = as_auto_model(**inputs).logits
        images = [PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, image_shape, dtype=np.uint8))
                  for seed in range(2)]
        processed = processor(images=images, text=["a photo of", ""])
        tokens = model.generate(**processed, max_new_tokens=5)
        save_file({"logits": logits, "auto_logits": auto_logits, "tokens": tokens,
                   "input_ids": processed["input_ids"], "pixel_values": processed["pixel_values"]},
                  f"{folder}/remote_outputs.safetensors")
        captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
        answerer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        results[kind] = {
            "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "image_processor_class": type(processor.image_processor).__name__,
            "caption": captioner(images[0], max_new_tokens=5),
            "answer": answerer(images=images[1], text="a photo of", max_new_tokens=5, return_full_text=False),
        }
    print("RESULTS" + json.dumps(results))
    """
)


# CI sets this to the python of a second venv holding the other end of pyproject's transformers range: folders saved
# here must load there too (and the second venv's run checks the other direction).
OTHER_PYTHON = os.environ.get("BLIP2_BRIDGE_OTHER_PYTHON")
PYTHONS = ["this venv", pytest.param("other venv", marks=[pytest.mark.cross_version, pytest.mark.skipif(
    not OTHER_PYTHON, reason="BLIP2_BRIDGE_OTHER_PYTHON names no second venv")])]  # fmt: skip


def site_packages_without_the_project(python: str) -> str:
    """The venv's site-packages: the project reaches Python there only through the editable .pth, which -S skips."""
    path = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert not (Path(path) / "modeling_blip2").exists(), f"blip2-bridge is installed non-editable in {path}"
    return path


def run_without_the_project(python_choice: str, script: str, *args: str, cwd: Path) -> str:
    """Runs `script` where only site-packages is importable (no blip2-bridge, no hub); returns its stdout."""
    python = sys.executable if python_choice == "this venv" else OTHER_PYTHON
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    completed = subprocess.run(
        [python, "-I", "-S", "-c", script, site_packages_without_the_project(python), *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("python_choice", PYTHONS)
def test_folder_loads_with_trust_remote_code_where_blip2_bridge_is_not_installed(tmp_path, python_choice):
    folders, expected = {}, {}
    # Pillow 13 resamples differently from Pillow 12 and older (the floor venv's): across venvs the images come at the
    # model's size, which needs no resampling, so that the comparison sees the folder's code and not Pillow.
    image_shape = (30, 26, 3) if python_choice == "this venv" else (28, 28, 3)
    images = make_images(2, image_shape)
    for kind in ("opt", "t5"):
        model, processor = tiny_stage2(kind)
        folder = tmp_path / kind
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        pixel_values, input_ids, attention_mask = prompts()
        input_ids[input_ids == 98] = processor.image_token_id  # the placeholders of this tokenizer
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if kind == "t5":
            inputs["labels"] = input_ids[:, -3:].clone()
        save_file(inputs, folder / "inputs.safetensors")
        processed = processor(images=images, text=["a photo of", ""])
        with torch.no_grad():
            logits = model(**inputs).logits
        captioner = modeling_blip2.Blip2BridgeImageToTextPipeline(model=model, processor=processor)
        expected[kind] = {
            "logits": logits,
            "tokens": model.generate(**processed, max_new_tokens=5),
            "processed": processed,
            "caption": captioner(images[0], max_new_tokens=5),
            "answer": captioner(images[1], prompt="a photo of", max_new_tokens=5, return_full_text=False),
        }
        folders[kind] = str(folder)

    stdout = run_without_the_project(
        python_choice, REMOTE_SCRIPT, json.dumps(folders), json.dumps(image_shape), cwd=tmp_path
    )
    results = json.loads(stdout.split("RESULTS", 1)[1])

    for kind, folder in folders.items():
        remote = load_file(f"{folder}/remote_outputs.safetensors")
        assert results[kind]["model_class"] == "Blip2BridgeForConditionalGeneration"
        assert results[kind]["processor_class"] == "Blip2BridgeProcessor"
        assert results[kind]["image_processor_class"] == "Blip2BridgeImageProcessor"
        assert expected[kind]["logits"].abs().max() > 0.1
        torch.testing.assert_close(remote["logits"], expected[kind]["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(remote["auto_logits"], expected[kind]["logits"], rtol=0, atol=1e-5)
        assert remote["input_ids"].tolist() == expected[kind]["processed"]["input_ids"].tolist()
        torch.testing.assert_close(remote["pixel_values"], expected[kind]["processed"]["pixel_values"], rtol=0, atol=0)
        assert remote["tokens"].tolist() == expected[kind]["tokens"].tolist()
        assert results[kind]["caption"] == expected[kind]["caption"]
        assert [record["generated_text"] for record in results[kind]["answer"]] == [
            record["generated_text"] for record in expected[kind]["answer"]
        ]


@pytest.mark.slow
@pytest.mark.parametrize("python_choice", PYTHONS)
def test_stage1_folder_loads_with_auto_model_where_blip2_bridge_is_not_installed(tmp_path, python_choice):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "stage1")
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    save_file({"pixel_values": pixel_values}, tmp_path / "pixel_values.safetensors")
    script = textwrap.dedent(
        """
        import sys
        sys.path.append(sys.argv[1])
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel, AutoModelForPreTraining
        model = AutoModel.from_pretrained("stage1", trust_remote_code=True, attn_implementation="eager").eval()
        assert type(AutoModelForPreTraining.from_pretrained("stage1", trust_remote_code=True)) .__name__ == (
            "Blip2BridgeModel")
        pixel_values = load_file("pixel_values.safetensors")["pixel_values"]
        save_file({"features": model.get_image_features(pixel_values=pixel_values).pooler_output.detach()}, "features.safetensors")
        """
    )
    run_without_the_project(python_choice, script, cwd=tmp_path)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(load_file(tmp_path / "features.safetensors")["features"], expected, rtol=0, atol=1e-5)


# ---- push_to_hub without network -----------------------------------------------------------------------------------


def test_push_to_hub_uploads_a_folder_that_loads_with_identical_outputs(local_hub):
    model, processor = tiny_stage2("t5")
    model.push_to_hub("user/tiny-blip2", tags=["my-tag"])
    processor.push_to_hub("user/tiny-blip2")
    pushed = local_hub.root / "user/tiny-blip2"

    assert [commit[0] for commit in local_hub.commits] == ["user/tiny-blip2"] * 2
    uploaded = set(local_hub.commits[0][2])
    assert {"config.json", "model.safetensors", "README.md", "modeling_stage2.py"} <= uploaded
    assert {"processor_config.json", "processing_blip2_bridge.py"} <= set(local_hub.commits[1][2])
    card = (pushed / "README.md").read_text()  # the processor's push keeps the model's card
    assert "- Language model: `t5`" in card and "- my-tag" in card

    loaded = AutoModelForImageTextToText.from_pretrained(pushed).eval()
    loaded_processor = AutoProcessor.from_pretrained(pushed)
    images = make_images(2)
    inputs = processor(images=images, text=["a photo of", ""])
    assert loaded_processor(images=images, text=["a photo of", ""])["input_ids"].tolist() == inputs["input_ids"].tolist()
    labels = torch.tensor([[5, 6, 1], [7, 1, 0]])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, labels=labels).logits, model(**inputs, labels=labels).logits)
    assert loaded.generate(**inputs, max_new_tokens=4).tolist() == model.generate(**inputs, max_new_tokens=4).tolist()


def test_save_pretrained_with_push_to_hub_uploads_the_code_files_too(local_hub, tmp_path):
    model = tiny_model()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "notes.txt").write_text("not part of the model")
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="user/stage1")
    uploaded = set(local_hub.commits[-1][2])
    assert {"config.json", "README.md", "modeling_stage1.py", "configuration_blip2_bridge.py"} <= uploaded
    assert "notes.txt" not in uploaded  # files this save did not write stay local, as with transformers
    assert (local_hub.root / "user/stage1/modeling_qformer.py").exists()
