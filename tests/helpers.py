"""Test helpers shared by the test modules: tiny tokenizers built on the fly (tests never download), free ports and
the deterministic hard-negative sampler of the distributed tests."""

import socket
import string

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertTokenizer


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs run across a green field",
    "a man riding a bicycle down the street",
    "a plate of food with rice and vegetables",
    "a small boat on a calm blue lake at sunset",
    "children playing football in the park",
    "an old clock tower against a cloudy sky",
    "a woman holding an umbrella in the rain",
]


def make_bert_tokenizer(tmp_dir=None, extra_texts=()) -> BertTokenizer:
    """
    A bert-base-uncased look-alike whose WordPiece vocabulary is learned from `CAPTIONS` and `extra_texts`: [PAD]=0,
    [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then every word of the texts (BERT-normalised and pre-tokenised), then every
    lower-case letter, digit and punctuation mark alone and as a word piece, so that any English text encodes without
    [UNK] (unseen words one character at a time). Every text is encoded as [CLS] ... [SEP], and [DEC] is added last as
    the bos token, as BLIP-2 adds it to the Q-Former's tokenizer for image-grounded generation. The same texts always
    give the same ids (tokenizers' WordPieceTrainer breaks ties between equally frequent merges at random). With
    `tmp_dir` it is saved there and loaded back through `AutoTokenizer`, as a user's checkpoint would be.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word for text in (*CAPTIONS, *extra_texts) for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    characters = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [*BERT_SPECIAL_TOKENS, *sorted(words - set(characters)), *characters, *(f"##{c}" for c in characters)]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}

    # BertTokenizer builds BERT's normaliser, pre-tokeniser and [CLS]/[SEP] template around the vocabulary.
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if tmp_dir is None:
        return tokenizer
    tokenizer.save_pretrained(tmp_dir)
    return AutoTokenizer.from_pretrained(tmp_dir)


def tokenizer_without_dec() -> BertTokenizer:
    """A BERT tokenizer with no bos token, as bert-base-uncased's."""
    vocab = {token: index for token, index in make_bert_tokenizer().get_vocab().items() if token != "[DEC]"}
    return BertTokenizer(vocab=dict(sorted(vocab.items(), key=lambda item: item[1])))


# The word-level LLM vocabulary: ids written by hand in the collator tests.
LLM_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "a",
    "photo",
    "of",
    "dog",
    "runs",
    "cat",
    "Question:",
    "Answer:",
    "what",
    "is",
    "this?",
    "yes",
    "red",
    "describe",
    "the",
    "image",
    "\n",
]
PAD, BOS, EOS = 0, 1, 2
ID = {token: index for index, token in enumerate(LLM_TOKENS)}
IMAGE = len(LLM_TOKENS)  # "<image>", added by the collator
X = -100


def make_llm_tokenizer(kind: str, extra_texts=(), padding_side: str = "right", vocabulary: str = "trained"):
    """
    A tiny language-model tokenizer trained on `CAPTIONS` (and `extra_texts`) in milliseconds, with the special tokens
    at the ids of the tiny stage-2 configs in tests/test_stage2.py:

    - "opt": byte-level BPE like OPT's GPT-2 tokenizer: <s>=0, <pad>=1, </s>=2 (OPT's BOS and EOS), <unk>=3; every
      text starts with </s>; no EOS is appended.
    - "t5": SentencePiece-style BPE like T5's: <pad>=0, </s>=1, <unk>=2; every text ends with </s>.

    `padding_side` is saved with the tokenizer (left for batched generation with a decoder-only LLM).

    vocabulary="words" gives instead a word-level tokenizer over `LLM_TOKENS` (ids `ID`, written by hand in tests;
    `extra_texts` unused), words split on spaces only: "opt" puts <s> (`BOS`) first and no EOS, "t5" appends </s>.
    """
    if vocabulary == "words":
        return _word_level_llm_tokenizer(encoder_decoder=kind == "t5", padding_side=padding_side)
    if vocabulary != "trained":
        raise ValueError(f"vocabulary is {vocabulary!r}; expected 'trained' or 'words'")
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    texts = [*CAPTIONS, *extra_texts, "question: what is in the picture? answer: short answer:"]
    if kind == "opt":
        special = ["<s>", "<pad>", "</s>", "<unk>"]
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        template = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)])
        names = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif kind == "t5":
        special = ["<pad>", "</s>", "<unk>"]
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
        template = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        names = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:
        raise ValueError(f"kind is {kind!r}; expected 'opt' or 't5'")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = template
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **names)


def _word_level_llm_tokenizer(encoder_decoder: bool, padding_side: str):
    """Word-level: OPT-like (BOS first, no EOS) or T5-like (no BOS, EOS last); words split on spaces only."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    if encoder_decoder:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None if encoder_decoder else "<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


# ---- distributed tests ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hardest_negatives(similarity: torch.Tensor, positive_mask: torch.Tensor, generator=None) -> torch.Tensor:
    """ITM's hard-negative sampler made deterministic (the most similar non-positive column of each row), so that two
    processes and one process with the doubled batch draw the same negatives and ITM can be compared exactly."""
    return similarity.masked_fill(positive_mask, float("-inf")).argmax(dim=1)
