"""What differs between the transformers releases blip2-bridge supports (pyproject's range), kept in one place.

A saved folder carries this module with the model code, so a folder saved under one release loads under another.
"""

from dataclasses import fields

from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed `past_key_values` to `cache`: in every output class, in models' forward keywords and in
# what `generate` passes to `prepare_inputs_for_generation`. The old name still works there, with a deprecation warning.
CACHE_KEYWORD = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def pop_cache(kwargs: dict, cache=None):
    """The key/value cache among `kwargs` under either release's name (removed from `kwargs`), else `cache`."""
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    return cache


__all__ = ["CACHE_KEYWORD", "pop_cache"]
