"""Each metric script loads offline with `evaluate.load(<path>)` and scores exactly as the class exported by the package."""

import json
import os
import subprocess
import sys
from pathlib import Path

import modeling_blip2.metrics
from modeling_blip2.metrics import CaptionMetrics, RetrievalRecall, VQAAccuracy


METRICS_DIR = Path(modeling_blip2.metrics.__file__).parent

INPUTS = {
    "vqa": {"predictions": ["Two", "yes.", "the dog"], "references": [["2"] * 10, ["yes"] * 9 + ["no"], ["dog"] * 2 + ["cat"] * 8]},
    "caption": {
        "predictions": ["a dog runs on the grass.", "a man's hat (red)"],
        "references": [["A dog running on grass.", "A brown dog runs outside."], ["A man wearing a red hat."]],
    },
    "retrieval": {
        "scores_i2t": [[0.9, 0.1, 0.3], [0.2, 0.8, 0.7]],
        "scores_t2i": [[0.9, 0.2], [0.1, 0.8], [0.6, 0.5]],
        "img2txt": [[0], [1, 2]],
        "txt2img": [0, 1, 1],
    },
}

# Runs in a fresh interpreter with the Hub switched off: only the copied scripts can answer.
LOAD_SCRIPT = """
import json, sys
import evaluate
metrics_dir, inputs = sys.argv[1], json.loads(sys.argv[2])
vqa = evaluate.load(metrics_dir + "/vqa_accuracy.py", config_name="lavis")
caption = evaluate.load(metrics_dir + "/caption_metrics.py")
retrieval = evaluate.load(metrics_dir + "/retrieval_recall.py")
assert all(type(m).__module__.startswith("evaluate_modules.") for m in (vqa, caption, retrieval))
print(json.dumps({
    "vqa": vqa.compute(**inputs["vqa"]),
    "caption": caption.compute(**inputs["caption"], java_metrics=False),
    "retrieval": retrieval.compute(**inputs["retrieval"]),
    "names": [type(m).__name__ for m in (vqa, caption, retrieval)],
}))
"""


def test_metrics_are_exported_by_the_package():
    import modeling_blip2

    assert (modeling_blip2.VQAAccuracy, modeling_blip2.CaptionMetrics, modeling_blip2.RetrievalRecall) == (
        VQAAccuracy, CaptionMetrics, RetrievalRecall
    )
    assert {"VQAAccuracy", "CaptionMetrics", "RetrievalRecall"} <= set(modeling_blip2.__all__)


def test_metric_scripts_load_offline_with_evaluate_and_give_identical_results(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(METRICS_DIR), json.dumps(INPUTS)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])

    assert loaded["names"] == ["VQAAccuracy", "CaptionMetrics", "RetrievalRecall"]
    assert loaded["vqa"] == VQAAccuracy(config_name="lavis").compute(**INPUTS["vqa"])
    assert loaded["caption"] == CaptionMetrics().compute(**INPUTS["caption"], java_metrics=False)
    assert loaded["retrieval"] == RetrievalRecall().compute(**INPUTS["retrieval"])
    # The scripts were copied into the module cache, the caption metric with its two helper modules.
    copied = {path.name for path in (tmp_path / "modules").rglob("*.py")}
    assert {"vqa_accuracy.py", "caption_metrics.py", "ptb_tokenizer.py", "coco_caption_scorers.py"} <= copied
    assert 0 < loaded["vqa"]["accuracy"] < 100 and 0 < loaded["caption"]["CIDEr"]
