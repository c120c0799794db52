"""Stage-2 generation: ours against transformers' `Blip2ForConditionalGeneration` on identical weights, in one run.

The model is transformers' BLIP-2 built from benchmarks/configs/stage2_small.json with random weights, saved, and loaded
by both classes (ours through its "blip-2" loading path), so both hold the same tensors. Two workloads, greedy:
- plain: a batch of `batch_size` images, each with a prompt of `prompt_tokens` text tokens, `new_tokens` new tokens;
- ten questions about one image: transformers' model runs ten full calls (vision tower + Q-Former + LLM each time);
  ours computes the image features once (`get_image_features`) and answers with `image_features=`, as ten calls and
  as one batched call of the ten questions.
The calls alternate between the implementations, so that both see the same machine conditions; medians are printed.

    python benchmarks/generate.py [--repeats 5] [--shapes FILE.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = REPO / "benchmarks" / "configs" / "stage2_small.json"
NUM_QUESTIONS = 10


def build_models(shapes: dict):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from modeling_blip2 import Blip2BridgeForConditionalGeneration

    torch.manual_seed(0)
    vocab_size = shapes["text_config"]["vocab_size"]
    config = Blip2Config(
        vision_config=shapes["vision_config"],
        qformer_config=shapes["qformer_config"],
        text_config=shapes["text_config"],
        num_query_tokens=shapes["num_query_tokens"],
        image_token_index=vocab_size - 1,
    )
    theirs = Blip2ForConditionalGeneration(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = Blip2BridgeForConditionalGeneration.from_pretrained(folder).eval()
    return theirs, ours


def make_prompts(shapes: dict, batch_size: int, seed: int):
    """[image placeholders; BOS; prompt_tokens random tokens] for each row, no padding."""
    text_config = shapes["text_config"]
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(4, text_config["vocab_size"] - 1, (batch_size, shapes["prompt_tokens"]), generator=generator)
    image_tokens = torch.full((batch_size, shapes["num_query_tokens"]), text_config["vocab_size"] - 1)
    bos = torch.full((batch_size, 1), text_config["bos_token_id"])
    return torch.cat([image_tokens, bos, text], dim=1)


def timed(function, seconds: list[float]):
    start = time.perf_counter()
    result = function()
    seconds.append(time.perf_counter() - start)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=str(DEFAULT_SHAPES))
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each workload")
    args = parser.parse_args()
    shapes = json.loads(Path(args.shapes).read_text())
    torch.set_num_threads(shapes.get("threads", 2))
    sys.path.insert(0, str(REPO))

    theirs, ours = build_models(shapes)
    image_size = shapes["vision_config"]["image_size"]
    generator = torch.Generator().manual_seed(1)
    batch_size = shapes["batch_size"]
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    input_ids = make_prompts(shapes, batch_size, seed=2)
    one_image = pixel_values[:1]
    questions = make_prompts(shapes, NUM_QUESTIONS, seed=3)
    # Every token is generated (no early end), so both run exactly new_tokens steps.
    greedy = dict(max_new_tokens=shapes["new_tokens"], min_new_tokens=shapes["new_tokens"], do_sample=False)

    def plain(model):
        return model.generate(pixel_values=pixel_values, input_ids=input_ids, **greedy)

    def ten_full_calls(model):
        return [model.generate(pixel_values=one_image, input_ids=question[None], **greedy) for question in questions]

    def ten_calls_on_cached_features():
        image_features = ours.get_image_features(one_image).pooler_output
        return [ours.generate(image_features=image_features, input_ids=q[None], **greedy) for q in questions]

    def one_batched_call_on_cached_features():
        image_features = ours.get_image_features(one_image).pooler_output.expand(NUM_QUESTIONS, -1, -1)
        return ours.generate(image_features=image_features, input_ids=questions, **greedy)

    with torch.no_grad():
        # Warm-up, and the check that both produce the same tokens.
        assert plain(theirs).tolist() == plain(ours).tolist(), "ours and transformers' greedy tokens differ"
        expected = torch.cat(ten_full_calls(theirs)).tolist()
        assert torch.cat(ten_calls_on_cached_features()).tolist() == expected
        assert one_batched_call_on_cached_features().tolist() == expected

        timings = {name: [] for name in ("plain theirs", "plain ours", "ten theirs", "ten ours", "ten ours batched")}
        for _ in range(args.repeats):
            timed(lambda: plain(theirs), timings["plain theirs"])
            timed(lambda: plain(ours), timings["plain ours"])
            timed(lambda: ten_full_calls(theirs), timings["ten theirs"])
            timed(ten_calls_on_cached_features, timings["ten ours"])
            timed(one_batched_call_on_cached_features, timings["ten ours batched"])

    median = {name: statistics.median(seconds) for name, seconds in timings.items()}
    print(
        f"stage-2 generate: vision {shapes['vision_config']['num_hidden_layers']}x"
        f"{shapes['vision_config']['hidden_size']}, Q-Former {shapes['qformer_config']['num_hidden_layers']}x"
        f"{shapes['qformer_config']['hidden_size']}, OPT {shapes['text_config']['num_hidden_layers']}x"
        f"{shapes['text_config']['hidden_size']}, {shapes['new_tokens']} new tokens, greedy, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; identical tokens checked"
    )
    print(f"plain, batch {batch_size}:           transformers {median['plain theirs']:.3f} s, ours "
          f"{median['plain ours']:.3f} s -> ours {median['plain theirs'] / median['plain ours']:.2f}x")
    print(f"{NUM_QUESTIONS} questions about one image: transformers (10 full calls) {median['ten theirs']:.3f} s")
    print(f"  ours, features once + 10 calls:      {median['ten ours']:.3f} s -> "
          f"{median['ten theirs'] / median['ten ours']:.2f}x")
    print(f"  ours, features once + 1 batched call: {median['ten ours batched']:.3f} s -> "
          f"{median['ten theirs'] / median['ten ours batched']:.2f}x")


if __name__ == "__main__":
    main()
