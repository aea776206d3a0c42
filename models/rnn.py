"""An embedding and a bidirectional recurrent layer, for text and for images."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class BiRNN(nn.Module):
    """Reads a sequence in both directions and classifies it as a whole.

    On text the sequence is a window of character ids and the class is the
    character that follows the window: the target lies outside the window, so
    neither direction can see the character it predicts. On images the
    sequence is the rows of the image, each projected linearly in place of
    the embedding.

    Args:
        num_classes: classes, or the vocabulary size for text.
        vocab_size: embed character ids from a vocabulary of this size; or
        row_width: project image rows of this width (exactly one of the two).
        cell: "rnn", "lstm" or "gru".
        embed_dim, hidden_size, num_layers, dropout: sizes of the layers.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        row_width: int | None = None,
        cell: str = "lstm",
        embed_dim: int = 32,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (vocab_size is None) == (row_width is None):
            raise ValueError(
                "give exactly one of vocab_size (text) and row_width (images)"
            )
        if cell not in CELLS:
            raise ValueError(f"cell={cell!r}; choose one of {', '.join(CELLS)}")
        if vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(vocab_size, embed_dim)
        else:
            self.embed = nn.Linear(row_width, embed_dim)
        self.rnn = CELLS[cell](
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * hidden_size, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(read_both_ends(self.rnn, embed_input(self.embed, x)))

    def blocks(self) -> list[nn.Module]:
        """The units a sharded strategy wraps one by one."""
        return [self.embed, self.rnn, self.head]

    def layers(self) -> list[tuple[str, nn.Module]]:
        """Every layer in order, named as in ``state_dict``: applying them one
        after the other is ``forward``, so a pipeline may cut between any two."""
        return [
            ("embed", _Step(embed_input, self.embed)),
            ("rnn", _Step(read_both_ends, self.rnn)),
            ("head.0", self.head[0]),
            ("head.1", self.head[1]),
        ]


def embed_input(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:  # images (B, C, H, W): one step per row
        x = x.flatten(1, 2)
    return embed(x)


def read_both_ends(rnn: nn.RNNBase, embedded: torch.Tensor) -> torch.Tensor:
    """Both directions' final states: the last step forward, the first backward."""
    out, _ = rnn(embedded)
    hidden = rnn.hidden_size
    return torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], dim=1)


class _Step(nn.Module):
    """One step of ``BiRNN.forward`` as a module, so a pipeline stage can hold it."""

    def __init__(self, fn, layer: nn.Module):
        super().__init__()
        self.fn = fn
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.layer, x)
