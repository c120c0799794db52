"""Caption and question cleaning as BLIP's, pinned on strings whose outputs were derived by reading LAVIS's code."""

import pytest

from modeling_blip2.training.data import pre_caption, pre_question


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        # . ! " ( ) * # : ; ~ become spaces, the resulting runs of spaces collapse, the ends are stripped
        ("A DOG (brown) sits; on the ~mat~!", "a dog brown sits on the mat"),
        ('He said: "hi" #tag *star*', "he said hi tag star"),
        ("a.b.c.d", "a b c d"),
        # commas, apostrophes, hyphens, slashes and question marks stay
        ("Don't stop, it's 5-year-old's toy/ball?", "don't stop, it's 5-year-old's toy/ball?"),
        # a run of two whitespace characters becomes one space; a single tab survives in the middle
        ("  Two\tcats\n", "two\tcats"),
        # "!" then "\n" is a run of two whitespace characters: one space, then stripped
        ("Hello!\n", "hello"),
        ("end.\t", "end"),
        # a single trailing tab is neither collapsed nor stripped (only newlines and spaces are)
        ("tab\tonly\t", "tab\tonly\t"),
        ("CAFÉ Ü", "café ü"),
        ("...", ""),
    ],
)
def test_pre_caption_matches_blip(caption, expected):
    assert pre_caption(caption) == expected


def test_pre_caption_keeps_max_words_split_on_spaces_only():
    assert pre_caption("one two three four", max_words=3) == "one two three"
    assert pre_caption("a.b.c.d", max_words=2) == "a b"
    # "two\tcats" is one word for BLIP, which splits on " " only
    assert pre_caption("  Two\tcats and dogs\n", max_words=2) == "two\tcats and"
    assert pre_caption("exactly three words", max_words=3) == "exactly three words"


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is on the table?  ", "what is on the table?"),
        # the punctuation is deleted, not replaced by a space
        ("Is it a dog...or a cat?", "is it a dogor a cat?"),
        ("Why (really)?", "why really?"),
        # leading spaces, double spaces and trailing newlines stay
        ("  leading spaces kept", "  leading spaces kept"),
        ("what  is this", "what  is this"),
        ("where?\n", "where?\n"),
    ],
)
def test_pre_question_matches_blip(question, expected):
    assert pre_question(question) == expected


def test_pre_question_counts_the_empty_words_of_double_spaces():
    # "what  is this".split(" ") == ["what", "", "is", "this"]: the first two "words" are "what" and ""
    assert pre_question("what  is this", max_words=2) == "what "
    assert pre_question("  leading spaces kept", max_words=2) == " "
    assert pre_question("Is it a dog...or a cat?", max_words=2) == "is it"


def test_cleaning_refuses_bad_input():
    with pytest.raises(TypeError, match="caption is a list; expected a string"):
        pre_caption(["a", "b"])
    with pytest.raises(TypeError, match="question is a int"):
        pre_question(3)
    with pytest.raises(ValueError, match="max_words is 0; expected a positive"):
        pre_caption("a b", max_words=0)
