"""BERT encoders as Hugging Face's BertModel computes them (post-norm layers, exact GELU, a tanh pooler over
the first token), taking ``input_ids`` and ``attention_mask`` and giving ``last_hidden_state`` and
``pooler_output``; without ``token_type_ids``, every token of type 0, whose embedding a trained model would
add to every position's (a random one adds nothing a position embedding does not)."""

from __future__ import annotations

from ...layers import Graph
from ..network import Tensor as NamedTensor
from ..registry import Tensor, register

VOCABULARY = 30522  # bert-base-uncased's WordPiece vocabulary
MAX_POSITIONS = 512
STD = 0.02  # BERT's initializer_range
TOKENS = (NamedTensor("input_ids", ("sequence",), "int64", values_below=VOCABULARY),
          NamedTensor("attention_mask", ("sequence",), "int64"))
OUTPUTS = ("last_hidden_state", "pooler_output")


def _bert(g: Graph, input_ids: Tensor, attention_mask: Tensor, layers: int, hidden: int, heads: int,
          intermediate: int) -> tuple[Tensor, Tensor]:
    x = g.embedding(input_ids, VOCABULARY, hidden, std=STD)
    x = g.layer_norm(g.position_embedding(x, MAX_POSITIONS, std=STD))
    bias = g.attention_bias(attention_mask)
    for _ in range(layers):
        x = g.layer_norm(g.add(x, g.self_attention(x, bias, heads, std=STD)))
        feed = g.linear(g.gelu(g.linear(x, intermediate, std=STD)), hidden, std=STD)
        x = g.layer_norm(g.add(x, feed))
    return x, g.tanh(g.linear(g.first_token(x), hidden, std=STD))


@register("bert-tiny", inputs=TOKENS, outputs=OUTPUTS, max_sizes={"sequence": MAX_POSITIONS})
def bert_tiny(g: Graph, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    return _bert(g, input_ids, attention_mask, layers=2, hidden=128, heads=2, intermediate=512)


@register("bert-base", inputs=TOKENS, outputs=OUTPUTS, max_sizes={"sequence": MAX_POSITIONS})
def bert_base(g: Graph, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    return _bert(g, input_ids, attention_mask, layers=12, hidden=768, heads=12, intermediate=3072)
