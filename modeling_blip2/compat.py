"""What differs between the transformers (and torch) releases blip2-bridge supports (pyproject's range), in one place.

A saved folder carries this module with the model code, so a folder saved under one release loads under another.
"""

import re
from dataclasses import fields

import torch
import transformers
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


# transformers 5.23 made `output_hidden_states=[indices]` index the full tuple (the embeddings' output first, negative
# indices from the end, every other entry None); before, the indices counted the layers' outputs, which alone came back.
HIDDEN_STATE_INDICES_COUNT_EMBEDDINGS = tuple(map(int, re.findall(r"\d+", transformers.__version__)[:2])) >= (5, 23)


def select_hidden_states(hidden_states: tuple | None, requested) -> tuple | None:
    """`hidden_states` (the embeddings' output, then each layer's) as the installed release answers
    `output_hidden_states=requested`: all of them for True, the indexed ones (others None) for a list of indices."""
    if hidden_states is None or not isinstance(requested, (list, tuple)):
        return hidden_states
    if not HIDDEN_STATE_INDICES_COUNT_EMBEDDINGS:
        hidden_states = hidden_states[1:]
    kept = {index % len(hidden_states) for index in requested}
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


def is_traced() -> bool:
    """Under torch.compile or torch.export: checks that read tensor values (to refuse bad input, or to skip padding)
    are left out there, since a traced graph cannot branch on data. torch.compiler.is_exporting is torch >= 2.5's."""
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()


__all__ = ["CACHE_KEYWORD", "HIDDEN_STATE_INDICES_COUNT_EMBEDDINGS", "is_traced", "pop_cache", "select_hidden_states"]
