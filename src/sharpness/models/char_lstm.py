"""A character-level LSTM language model for Tiny Shakespeare: embedding, LSTM, a linear head per position."""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_int_at_least
from ._layers import check_dropout, check_input_shape

__all__ = ["CharLSTM"]


class CharLSTM(nn.Module):
    """Embedding -> ``num_layers``-layer LSTM -> dropout -> Linear: next-character logits at every position.

    ``forward`` maps token ids ``(B, T)`` to logits ``(B, V, T)``, the class dimension second like every
    other model here, so ``nn.CrossEntropyLoss()(model(x), y)`` works directly on ``(B, T)`` targets and
    ``model(x).argmax(1) == y`` counts correct characters. (``.transpose(1, 2)`` gives ``(B, T, V)``.)

    Note: double backward (Hessian-vector products, gradient-norm penalties) through ``nn.LSTM`` is not
    supported by cuDNN; run such measures on CPU or under ``torch.backends.cudnn.flags(enabled=False)``.

    Args:
        vocab_size: number of distinct tokens ``V`` (inputs and outputs).
        embedding_dim: size of a token embedding.
        hidden_size: LSTM state size.
        num_layers: stacked LSTM layers.
        dropout: dropout probability between LSTM layers and before the head, ``0 <= dropout < 1``.
    """

    def __init__(self, vocab_size: int, *, embedding_dim: int = 128, hidden_size: int = 256,
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        embedding_dim = check_int_at_least("embedding_dim", embedding_dim, 1)
        hidden_size = check_int_at_least("hidden_size", hidden_size, 1)
        num_layers = check_int_at_least("num_layers", num_layers, 1)
        dropout = check_dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        states, _ = self.lstm(self.embedding(tokens))  # (B, T) -> (B, T, E) -> (B, T, H)
        return self.head(self.dropout(states)).transpose(1, 2)  # (B, T, V) -> (B, V, T)


def build(*, num_classes: int, input_shape: tuple[int, ...], embedding_dim: int = 128, hidden_size: int = 256,
          num_layers: int = 2, dropout: float = 0.0) -> CharLSTM:
    """Registry builder: ``num_classes`` is the vocabulary size, ``input_shape`` is ``(block_size,)``."""
    check_input_shape("char_lstm", input_shape, (1,), "(block_size,), a sequence of token ids")
    return CharLSTM(num_classes, embedding_dim=embedding_dim, hidden_size=hidden_size, num_layers=num_layers,
                    dropout=dropout)
