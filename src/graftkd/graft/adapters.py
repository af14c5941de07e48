"""Adapters: 1×1 channel maps between teacher and student widths, and the wrapped scion of Eq. 2–3.

An adapter is a bias-free linear map over channels. On a (N, C, H, W) tensor it is a 1×1 convolution;
on a flattened (N, C·S) tensor it applies the same map to each of the S positions. Being linear and
bias-free, the product a^{t→s}_l ∘ a^{s→t}_l is a C_s×C_s matrix that folds *exactly* into the next
student block's first layers (Eq. 6), even next to zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAdapter(nn.Module):
    """A bias-free linear map from ``in_channels`` to ``out_channels`` applied at every position."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # Stored as a 1×1 conv kernel so checkpoints read like the paper's adapters.
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He et al. 2015 initialisation, as the paper states (fan_in of a 1×1 conv = in_channels).
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")

    @torch.no_grad()
    def set_channel_selection(self, channels: torch.Tensor) -> None:
        """Make the map the channel choice that pruning made: ``channels`` index the wide side.

        A wide→narrow adapter then picks those channels of its input, a narrow→wide one writes its input
        back to them (zeros elsewhere), so a (narrow→wide, wide→narrow) pair composes to the identity.
        """
        wide, narrow = max(self.in_channels, self.out_channels), min(self.in_channels, self.out_channels)
        channels = torch.as_tensor(channels, dtype=torch.long).flatten().cpu()
        if len(channels) != narrow or len(set(channels.tolist())) != narrow or not (
                0 <= int(channels.min()) and int(channels.max()) < wide):
            raise ValueError(f"a {self.in_channels}->{self.out_channels} adapter needs {narrow} distinct channel "
                             f"indices in [0, {wide}), got {channels.tolist()}")
        choice = torch.zeros(narrow, wide)
        choice[torch.arange(narrow), channels] = 1.0
        matrix = choice if self.out_channels == narrow else choice.T
        self.weight.copy_(matrix.view_as(self.weight).to(self.weight))

    @property
    def matrix(self) -> torch.Tensor:
        return self.weight.view(self.out_channels, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, self.weight)
        if x.dim() == 2:
            n, features = x.shape
            positions = features // self.in_channels
            # Flattened layout is channel-major (C, S): mix channels independently at each position.
            y = torch.matmul(self.matrix, x.view(n, self.in_channels, positions))
            return y.reshape(n, self.out_channels * positions)
        raise ValueError(f"ChannelAdapter expects a 2-D or 4-D tensor, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, bias=False"


class Scion(nn.Module):
    """The wrapped scion H_l = a^{s→t}_l ∘ h_l ∘ a^{t→s}_{l-1} (Eq. 2); either adapter may be absent (Eq. 3)."""

    def __init__(self, block: nn.Module, adapter_in: nn.Module | None, adapter_out: nn.Module | None) -> None:
        super().__init__()
        self.adapter_in = adapter_in if adapter_in is not None else nn.Identity()
        self.block = block
        self.adapter_out = adapter_out if adapter_out is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_out(self.block(self.adapter_in(x)))

