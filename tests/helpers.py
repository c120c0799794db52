"""Test helpers shared by the test modules: tiny tokenizers built on the fly, since tests never download."""

import string

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
    A bert-base-uncased look-alike with a WordPiece vocabulary of a few hundred tokens trained on `CAPTIONS` and
    `extra_texts`: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, every text encoded as [CLS] ... [SEP], and [DEC] added
    last as the bos token, as BLIP-2 adds it to the Q-Former's tokenizer for image-grounded generation. With `tmp_dir`
    it is saved there and loaded back through `AutoTokenizer`, as a user's checkpoint would be.
    """
    trainer_tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False)
    trainer_tokenizer.train_from_iterator([*CAPTIONS, *extra_texts], trainer=trainer)

    # Every lower-case letter, digit and punctuation mark, alone and as a word piece, so that any English text
    # encodes without [UNK], if need be one character at a time.
    vocab = trainer_tokenizer.get_vocab()
    for character in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in (character, f"##{character}"):
            vocab.setdefault(piece, len(vocab))

    # BertTokenizer builds BERT's normaliser, pre-tokeniser and [CLS]/[SEP] template around the vocabulary.
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if tmp_dir is None:
        return tokenizer
    tokenizer.save_pretrained(tmp_dir)
    return AutoTokenizer.from_pretrained(tmp_dir)


LLM_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3; OPT's pad is 1 and its bos = eos is 2


def make_llm_tokenizer(extra_words=()):
    """
    An OPT-style tokenizer for the tiny stage-2 LLMs: one token per word of `CAPTIONS` (plus `extra_words`) after the
    four special tokens, and every encoding starting with "</s>", OPT's bos token.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in CAPTIONS for word in text.split()} | set(extra_words))
    vocab = {token: index for index, token in enumerate([*LLM_SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
