"""Text cleaning as BLIP does it, shared by training and evaluation.

`pre_caption` and `pre_question` restate LAVIS's `BlipCaptionProcessor.pre_caption` and
`BlipQuestionProcessor.pre_question` (lavis/processors/blip_processors.py) character for character, quirks included,
so that captions and questions reach the tokenizer exactly as they did in the original training and evaluation runs.
"""

import re


# LAVIS's default `max_words` for captions and questions.
DEFAULT_MAX_WORDS = 50

# The punctuation BLIP removes. Everything else stays: commas, apostrophes, question marks, hyphens, slashes, ...
BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
# Runs of two or more whitespace characters; a single tab or newline is left alone, as in LAVIS.
WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """
    BLIP's caption cleaning: lower case; `. ! " ( ) * # : ; ~` become spaces; runs of two or more whitespace
    characters become one space; the ends are stripped of newlines and spaces; then at most `max_words` words, where
    words are what `str.split(" ")` gives (a single tab does not separate words).

        >>> pre_caption("A DOG (brown) sits; on the ~mat~!")
        'a dog brown sits on the mat'
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption is a {type(caption).__name__}; expected a string")
    caption = BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return truncate_words(caption, max_words)


def pre_question(question: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """
    BLIP's question cleaning: lower case; `. ! " ( ) * # : ; ~` are deleted (not replaced by spaces, so "ice-cream.s"
    becomes "ice-creams"); trailing spaces are stripped, leading ones kept; whitespace is not collapsed, so each extra
    space of a double space counts as an (empty) word for `max_words`.

        >>> pre_question("What is on the table?  ")
        'what is on the table?'
    """
    if not isinstance(question, str):
        raise TypeError(f"question is a {type(question).__name__}; expected a string")
    question = BLIP_PUNCTUATION.sub("", question.lower())
    question = question.rstrip(" ")
    return truncate_words(question, max_words)


def truncate_words(text: str, max_words: int) -> str:
    if max_words < 1:
        raise ValueError(f"max_words is {max_words}; expected a positive number of words")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


__all__ = ["DEFAULT_MAX_WORDS", "pre_caption", "pre_question", "truncate_words"]
