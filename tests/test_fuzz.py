"""Property-based tests: arbitrary images, texts and model inputs give a valid output or a ValueError/TypeError.

Never another exception type (an IndexError or OverflowError from deep inside a library tells a user nothing) and
never a NaN in an output. The example counts are bounded so the whole file stays within a minute on 2 cores.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modeling_blip2 import Blip2BridgeImageProcessor, Blip2BridgeProcessor
from tests.helpers import make_bert_tokenizer
from tests.tiny_models import tiny_model, tiny_stage2

CLEAR_ERRORS = (ValueError, TypeError)
SIZE = {"height": 28, "width": 28}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(function, *args, **kwargs):
    """The function's result, or None when it raised one of the clear errors (which must name what was wrong)."""
    try:
        return function(*args, **kwargs)
    except CLEAR_ERRORS as error:
        assert str(error), f"{type(error).__name__} without a message"
        return None


def assert_finite_pixels(encoding, batch_size: int):
    pixel_values = encoding["pixel_values"]
    assert pixel_values.shape == (batch_size, 3, SIZE["height"], SIZE["width"])
    assert torch.isfinite(pixel_values).all()


# ---- images -------------------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_])
SHAPES = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)),  # grayscale
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 5)),  # channels last
    st.tuples(st.integers(1, 5), st.integers(0, 40), st.integers(0, 40)),  # channels first
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),  # a batch
    st.tuples(st.integers(0, 3)),
)


@st.composite
def image_arrays(draw):
    dtype = draw(DTYPES)
    shape = draw(SHAPES)
    if np.issubdtype(dtype, np.floating):
        width = 16 if dtype == np.float16 else 32
        largest = 60000 if dtype == np.float16 else 70000
        elements = st.one_of(st.floats(-2, largest, width=width), st.sampled_from([np.nan, np.inf, -np.inf]))
    elif dtype == np.bool_:
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1))
    return draw(arrays(dtype, shape, elements=elements))


@FUZZ
@given(image=image_arrays())
def test_any_array_is_processed_to_finite_pixels_or_refused_clearly(image):
    processor = Blip2BridgeImageProcessor(size=SIZE)
    encoding = outcome(processor, image)
    if encoding is not None:
        assert_finite_pixels(encoding, len(encoding["pixel_values"]))


PIL_MODES = st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"])


@FUZZ
@given(mode=PIL_MODES, width=st.integers(0, 30), height=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_any_pil_image_is_processed_to_finite_pixels_or_refused_clearly(mode, width, height, seed):
    noise = np.random.default_rng(seed).integers(0, 256, (max(height, 1), max(width, 1), 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise).resize((width, height)) if width and height else PIL.Image.new("RGB", (0, 0))
    try:
        image = image.convert(mode)
    except ValueError:  # PIL itself has no conversion to this mode
        return
    encoding = outcome(Blip2BridgeImageProcessor(size=SIZE), image)
    if encoding is not None:
        assert_finite_pixels(encoding, 1)


# ---- texts --------------------------------------------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(max_size=60),  # any code points, control characters included
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=4),  # lone surrogates
    st.just(""),
    st.builds(lambda word, count: " ".join([word] * count), st.sampled_from(["cat", "a", "🍕"]), st.integers(0, 3000)),
)


@pytest.fixture(scope="module")
def stage1_processor():
    return Blip2BridgeProcessor(Blip2BridgeImageProcessor(size=SIZE), make_bert_tokenizer())


@pytest.fixture(scope="module")
def stage2_processor():
    return tiny_stage2("opt")[1]


@FUZZ
@given(texts=st.lists(TEXTS, min_size=1, max_size=3))
def test_stage1_texts_are_tokenised_within_the_length_or_refused_clearly(stage1_processor, texts):
    encoding = outcome(stage1_processor, text=texts)
    if encoding is not None:
        assert encoding["input_ids"].shape[0] == len(texts)
        assert encoding["input_ids"].shape[1] <= stage1_processor.max_text_length
        assert (encoding["input_ids"][:, 0] == stage1_processor.tokenizer.cls_token_id).all()


@FUZZ
@given(texts=st.lists(TEXTS, min_size=1, max_size=3), max_length=st.one_of(st.none(), st.integers(-2, 40)))
def test_stage2_prompts_hold_the_placeholders_or_are_refused_clearly(stage2_processor, texts, max_length):
    images = [PIL.Image.new("RGB", (28, 28), "red")] * len(texts)
    encoding = outcome(stage2_processor, images=images, text=texts, max_length=max_length, truncation=True)
    if encoding is not None:
        placeholders = (encoding["input_ids"] == stage2_processor.image_token_id).sum(dim=1)
        assert placeholders.tolist() == [stage2_processor.num_query_tokens] * len(texts)


# ---- model inputs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_model():
    return tiny_model().eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(0, 3),
    channels=st.integers(1, 4),
    size=st.sampled_from([14, 28, 42]),
    text_batch=st.integers(0, 3),
    text_length=st.integers(0, 20),
    token=st.integers(-1, 200),
)
def test_stage1_forward_gives_finite_outputs_or_refuses_clearly(
    stage1_model, batch, channels, size, text_batch, text_length, token
):
    pixel_values = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    input_ids = torch.full((text_batch, text_length), token)
    if text_length:
        input_ids[:, 0] = 1
    with torch.no_grad():
        output = outcome(stage1_model, pixel_values=pixel_values, input_ids=input_ids)
    if output is not None:
        for name in ("loss", "logits_per_image", "itm_logits", "image_feats", "text_feats"):
            value = getattr(output, name)
            assert value is None or torch.isfinite(value).all(), name
