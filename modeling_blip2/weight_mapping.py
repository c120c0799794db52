"""Where each Q-Former weight comes from in a BERT-layout checkpoint: one table for the builder and the LAVIS converter.

LAVIS's Q-Former (`Qformer.bert.*`) keeps BERT's module names and adds two things a plain BERT lacks: the
cross-attention blocks (`crossattention`) and the queries' own feed-forward (`intermediate_query`, `output_query`).
"""

from collections.abc import Iterable


# BERT's hyper-parameters that the Q-Former takes over unchanged.
BERT_HYPERPARAMETERS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


def qformer_module_sources(
    num_hidden_layers: int, cross_attention_frequency: int, from_lavis_qformer: bool
) -> dict[str, str]:
    """Our Q-Former module names (relative to `Blip2BridgeQFormerModel`) -> BERT module names (relative to `BertModel`).

    from_lavis_qformer: the source is LAVIS's Q-Former, which holds the cross-attention and the queries' feed-forward.
        Otherwise it is a plain BERT: the cross-attention is absent from the table (it starts from random weights)
        and the queries' feed-forward is read from BERT's feed-forward, as the paper initialises it.
    """
    sources = {
        "word_embeddings": "embeddings.word_embeddings",
        "position_embeddings": "embeddings.position_embeddings",
        "layernorm": "embeddings.LayerNorm",
    }
    query_intermediate, query_output = (
        ("intermediate_query", "output_query") if from_lavis_qformer else ("intermediate", "output")
    )
    for layer_idx in range(num_hidden_layers):
        ours, theirs = f"layer.{layer_idx}", f"encoder.layer.{layer_idx}"
        attention_blocks = ["attention"]
        if from_lavis_qformer and layer_idx % cross_attention_frequency == 0:
            attention_blocks.append("crossattention")
        for block in attention_blocks:
            for projection in ("query", "key", "value"):
                sources[f"{ours}.{block}.{projection}"] = f"{theirs}.{block}.self.{projection}"
            sources[f"{ours}.{block}.dense"] = f"{theirs}.{block}.output.dense"
            sources[f"{ours}.{block}.LayerNorm"] = f"{theirs}.{block}.output.LayerNorm"
        for feed_forward, intermediate, output in (
            ("text_feed_forward", "intermediate", "output"),
            ("query_feed_forward", query_intermediate, query_output),
        ):
            sources[f"{ours}.{feed_forward}.intermediate"] = f"{theirs}.{intermediate}.dense"
            sources[f"{ours}.{feed_forward}.output"] = f"{theirs}.{output}.dense"
            sources[f"{ours}.{feed_forward}.LayerNorm"] = f"{theirs}.{output}.LayerNorm"
    return sources


# Our ITG head (relative to `Blip2BridgeModel`) <- BERT's masked-LM head transform (relative to `BertForMaskedLM` /
# `BertLMHeadModel`, whose `cls.predictions` LAVIS's Q-Former keeps). The vocabulary projection is tied to the word
# embeddings on both sides and its bias is handled by the callers: BERT's is shorter than ours by the [DEC] row.
ITG_HEAD_MODULE_SOURCES = {
    "itg_head.dense": "cls.predictions.transform.dense",
    "itg_head.LayerNorm": "cls.predictions.transform.LayerNorm",
}


def parameter_sources(
    module_sources: dict[str, str],
    parameter_names: Iterable[str],
    target_prefix: str = "",
    source_prefix: str = "",
) -> dict[str, str]:
    """Expands a module table to parameters: `{target_prefix}{module}.{param}` -> `{source_prefix}{source}.{param}`.

    Only the names in `parameter_names` (e.g. a model's `state_dict()` keys) whose module is in the table appear.
    """
    sources = {}
    for name in parameter_names:
        if not name.startswith(target_prefix):
            continue
        module, _, parameter = name[len(target_prefix) :].rpartition(".")
        if module in module_sources:
            sources[name] = f"{source_prefix}{module_sources[module]}.{parameter}"
    return sources
