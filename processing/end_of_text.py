"""Where a language model's text ends: the text appended to every training target and the stop token of generation.

Training (the collators) and evaluation (the benchmark runner) both read it from here.
"""

from transformers import PreTrainedTokenizerBase


# The text that ends every target, per LLM `model_type`, where it is not the tokenizer's EOS: LAVIS's `Blip2OPT`
# (lavis/models/blip2_models/blip2_opt.py) appends "\n" to every caption in `forward` and passes the id of "\n" as
# `eos_token_id` to `generate`; transformers' converted BLIP-2 OPT checkpoints carry it as `text_config.eos_token_id`.
END_OF_TEXT_BY_MODEL_TYPE = {"opt": "\n"}


def default_end_of_text(text_config) -> str | None:
    """The text that ends a target and stops generation for this LLM: "\n" for OPT, as the original; None (the
    tokenizer's EOS token) for every other family."""
    return END_OF_TEXT_BY_MODEL_TYPE.get(getattr(text_config, "model_type", None))


def end_of_text_ids(tokenizer: PreTrainedTokenizerBase, end_of_text: str | None) -> list[int]:
    """The token ids of `end_of_text` (no special tokens added), or the tokenizer's EOS id when it is None."""
    if end_of_text is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; pass end_of_text")
        return [tokenizer.eos_token_id]
    ids = tokenizer(end_of_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"end_of_text {end_of_text!r} encodes to no token; expected a text such as '\\n'")
    return ids
