"""The trainable projection heads, with the backbone tops ``--finetune`` trains below them, and their momentum
copies (torch's ``AveragedModel`` with an exponential moving average), which produce the bank's keys."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ProjectionHead", "Tower", "MatchingHeads", "momentum_copy"]

_MOMENTUM_COPIES = ("image_head_momentum", "text_head_momentum")


class ProjectionHead(nn.Module):
    """Backbone features -> unit vectors in the joint space: LayerNorm (the two backbones' feature scales differ
    by orders of magnitude), a two-layer MLP, and L2 normalisation."""

    def __init__(self, in_dim: int, joint_dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                    nn.Linear(hidden_dim, joint_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.layers(features), dim=-1)


class Tower(nn.Module):
    """A trained backbone top (``fne_fast.models.tops``) and the projection head over it: the frozen trunk's
    outputs -> unit vectors in the joint space."""

    def __init__(self, top: nn.Module, projection: ProjectionHead):
        super().__init__()
        self.top, self.projection = top, projection

    def forward(self, trunk_outputs: torch.Tensor) -> torch.Tensor:
        return self.projection(self.top(trunk_outputs))


def momentum_copy(module: nn.Module, momentum: float) -> AveragedModel:
    """An exponential moving average of ``module`` (parameters and buffers, so BatchNorm statistics follow too),
    not trained by the optimiser: ``copy.update_parameters(module)`` moves it by ``1 - momentum`` towards the
    module. It starts equal to the module and counts as one average already, so the first update is a moving
    average step (AveragedModel's first update would copy the module instead)."""
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(momentum), use_buffers=True)
    averaged.update_parameters(module)
    return averaged.requires_grad_(False)


class MatchingHeads(nn.Module):
    """The image and text heads and their momentum copies, which are not trained by the optimiser and produce
    the keys: the positives' ``s⁺`` and the bank's features.

    Without tops each head maps the backbone's features; with ``image_top`` and ``text_top`` (``--finetune``)
    each is a ``Tower`` of the top and the head over the trunk's outputs, and the momentum copies cover the tops
    too. The heads are initialised by the same draws either way."""

    def __init__(self, image_dim: int, text_dim: int, joint_dim: int, hidden_dim: int, momentum: float, *,
                 image_top: nn.Module | None = None, text_top: nn.Module | None = None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if (image_top is None) != (text_top is None):
            raise ValueError("image_top and text_top: give both or neither")
        self.momentum = momentum
        self.image_head, self.text_head = ProjectionHead(image_dim, joint_dim, hidden_dim), ProjectionHead(
            text_dim, joint_dim, hidden_dim)
        if image_top is not None:
            self.image_head, self.text_head = Tower(image_top, self.image_head), Tower(text_top, self.text_head)
        self.image_head_momentum = momentum_copy(self.image_head, momentum)
        self.text_head_momentum = momentum_copy(self.text_head, momentum)

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        """Also loads the state of heads saved before the momentum copies were ``AveragedModel``s (their
        parameters were the copies' own: ``image_head_momentum.layers.0.weight``)."""
        state = dict(state)
        for copy in _MOMENTUM_COPIES:
            legacy = {name: value for name, value in state.items() if name.startswith(f"{copy}.")
                      and not name.startswith((f"{copy}.module.", f"{copy}.n_averaged"))}
            for name, value in legacy.items():
                state[f"{copy}.module.{name[len(copy) + 1:]}"] = state.pop(name)
            if legacy:
                state[f"{copy}.n_averaged"] = torch.tensor(1, dtype=torch.long)
        return super().load_state_dict(state, strict=strict, assign=assign)

    @property
    def has_tops(self) -> bool:
        return isinstance(self.image_head, Tower)

    @classmethod
    def from_state_dict(cls, state: dict, *, image_top: nn.Module | None = None,
                        text_top: nn.Module | None = None) -> "MatchingHeads":
        """The heads of a checkpoint's ``heads`` state, with the widths its weights have; a fine-tuned run's needs
        its tops' modules (``fne_fast.models.tops.backbone_tops``), whose weights the state then replaces."""
        prefix = "projection." if image_top is not None else ""
        image_dim = state[f"image_head.{prefix}layers.0.weight"].shape[0]
        text_dim = state[f"text_head.{prefix}layers.0.weight"].shape[0]
        hidden_dim = state[f"image_head.{prefix}layers.1.weight"].shape[0]
        joint_dim = state[f"image_head.{prefix}layers.3.weight"].shape[0]
        heads = cls(image_dim, text_dim, joint_dim, hidden_dim, momentum=0.0,  # served heads do not train
                    image_top=image_top, text_top=text_top)
        heads.load_state_dict(state)
        return heads

    def _projections(self) -> tuple[ProjectionHead, ProjectionHead]:
        heads = (self.image_head, self.text_head)
        return tuple(head.projection for head in heads) if self.has_tops else heads

    @property
    def joint_dim(self) -> int:
        return self._projections()[0].layers[-1].out_features

    def head_parameters(self) -> list[nn.Parameter]:
        """The projection heads' parameters (the tops' excluded)."""
        return [parameter for head in self._projections() for parameter in head.parameters()]

    def top_parameters(self) -> list[nn.Parameter]:
        """The trained backbone layers' parameters (none without tops)."""
        tops = (self.image_head.top, self.text_head.top) if self.has_tops else ()
        return [parameter for top in tops for parameter in top.parameters()]

    @torch.no_grad()
    def update_momentum(self) -> None:
        self.image_head_momentum.update_parameters(self.image_head)
        self.text_head_momentum.update_parameters(self.text_head)

    def forward(self, image_inputs: torch.Tensor, text_inputs: torch.Tensor):
        """Online embeddings (with autograd) and momentum keys (without) of a batch of pairs: backbone features,
        or the trunks' outputs when the tops train."""
        image, text = self.image_head(image_inputs), self.text_head(text_inputs)
        with torch.no_grad():
            image_key = self.image_head_momentum(image_inputs)
            text_key = self.text_head_momentum(text_inputs)
        return image, text, image_key, text_key
