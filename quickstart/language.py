"""A tiny Llama pre-trained briefly on the corpus's captions and question/answer texts: the frozen LLM of stage 2 (LoRA adapters on it train there).

Llama's rotary positions are relative, so the texts it learns at position 0 read the same after the image
prefix that stage 2 puts in front of them.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..training.collators import VQA_PROMPT  # the paper's prompt for decoder-only LLMs
from .training import train_with_progress_bar


def make_language_config(tokenizer: PreTrainedTokenizerBase, hidden_size: int = 128, num_layers: int = 2):
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def language_texts(captions: list[str], questions: list[tuple[str, str]]) -> list[str]:
    """What the LLM reads in pre-training: every caption, and every question with its answer in the VQA prompt."""
    return [*captions, *(f"{VQA_PROMPT.format(question)} {answer}" for question, answer in questions)]


class CausalLMCollator:
    """<s> text </s> (the tokenizer adds <s>), right-padded; every real token is a target."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        eos = self.tokenizer.eos_token
        batch = self.tokenizer([f"{text}{eos}" for text in texts], padding=True, padding_side="right", return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def pretrain_language_model(
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    training_arguments: TrainingArguments,
) -> tuple[LlamaForCausalLM, list[dict]]:
    """Trains a fresh LLM on `texts` with transformers' Trainer; returns it (eval mode) and the Trainer's log."""
    torch.manual_seed(training_arguments.seed)
    model = LlamaForCausalLM(config)
    trainer = Trainer(
        model=model, args=training_arguments, train_dataset=texts, data_collator=CausalLMCollator(tokenizer)
    )
    train_with_progress_bar(trainer, "LLM pre-training")
    return model.eval(), trainer.state.log_history
