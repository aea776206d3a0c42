"""The classic CNN for handwritten digits."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding), ReLU, 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class CNN(nn.Module):
    """Two conv blocks, a dense layer and a classifier.

    Args:
        input_shape: (channels, height, width) of one image, e.g. (1, 8, 8).
        num_classes: number of output classes.
        channels: filters of the two conv blocks.
        hidden: width of the dense layer.
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__()
        in_channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ValueError(
                f"images of {height}x{width} are too small for two 2x2 pools"
            )
        self.features = nn.Sequential(
            conv_block(in_channels, channels[0]), conv_block(channels[0], channels[1])
        )
        flat = channels[1] * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def blocks(self) -> list[nn.Module]:
        """The units a sharded strategy wraps one by one: conv blocks, classifier."""
        return [*self.features, self.classifier]

    def layers(self) -> list[tuple[str, nn.Module]]:
        """Every layer in order, named as in ``state_dict``: applying them one
        after the other is ``forward``, so a pipeline may cut between any two."""
        return [
            (f"{name}.{index}", layer)
            for name, seq in (
                ("features.0", self.features[0]),
                ("features.1", self.features[1]),
                ("classifier", self.classifier),
            )
            for index, layer in enumerate(seq)
        ]
