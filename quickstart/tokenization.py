"""The quickstart's two tokenizers, trained on its own texts in a fraction of a second with the `tokenizers` library."""

import string
from collections import Counter

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizer, PreTrainedTokenizerFast

from ..processing.processing_blip2_bridge import IMAGE_TOKEN


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC_TOKEN = "[DEC]"
LLM_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_qformer_tokenizer(texts: list[str], vocab_size: int = 300) -> BertTokenizer:
    """A bert-base-uncased look-alike: a WordPiece vocabulary of the corpus's words, [CLS] ... [SEP] around every text,
    [DEC] as bos.

    The vocabulary holds the special tokens, the `vocab_size` most frequent words of `texts` as BERT's normaliser and
    pre-tokeniser split them (ties in alphabetical order) and every lower-case letter, digit and punctuation mark, alone
    and as a word piece, so that any English text encodes without [UNK]. It is built by counting rather than with the
    `tokenizers` WordPiece trainer, whose choice among equally frequent merges changes from process to process: the
    same seed then trained a different Q-Former.
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    words = sorted(counts, key=lambda word: (-counts[word], word))[:vocab_size]
    vocab = {token: index for index, token in enumerate(BERT_SPECIAL_TOKENS)}
    for piece in words + [f"{prefix}{character}" for character in string.ascii_lowercase + string.digits
                          + string.punctuation for prefix in ("", "##")]:
        vocab.setdefault(piece, len(vocab))
    # BertTokenizer builds BERT's normaliser, pre-tokeniser and [CLS]/[SEP] template around the vocabulary.
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def train_llm_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE with <s>, </s>, <pad>, <unk> and the image placeholder token <image>; like LLaMA's, it starts
    every text with <s> and leaves </s> to the caller.

    Byte-level BPE decodes back to the exact text (spaces and punctuation included), which captions need.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*LLM_SPECIAL_TOKENS.values(), IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bos = LLM_SPECIAL_TOKENS["bos_token"]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **LLM_SPECIAL_TOKENS, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer
