"""Steps of a fine-tuned run whose gradients do not depend on how the global batch is split over processes.

Training the backbone tops amplifies float rounding: a run of W processes of batch B drifted from one of batch
W·B by 1e-3 in an epoch's loss when the ranks' gradients were summed in a different order than one process sums
its rows. So a fine-tuned step fixes the order. Each rank cuts its rows into units of ``UNIT_ROWS`` (a rank's
slice of the global batch starts at a multiple of B, so the units are the same rows whatever W is); each unit
runs the heads forward and backward on its own, and the units' gradients are added in a fixed pairwise tree —
within the rank, then over the ranks after one all_gather. One process with batch W·B adds the same numbers in the
same tree, to the bit, when B / ``UNIT_ROWS`` is a power of two (any W). The loss between the forward and the
backward is ``FNELoss(batch_invariant=True)``'s, whose gradient into each row is one process's to the bit.
"""

from __future__ import annotations

import torch

from fne_fast.models.tops import trim_token_padding
from fne_fast.sampling import distributed

__all__ = ["UNIT_ROWS", "UnitStep", "pairwise_sum"]

# Rows per unit: a batch of B per process reproduces one process's steps when B / UNIT_ROWS is a power of two.
UNIT_ROWS = 16


def pairwise_sum(parts: list, add=torch.add):
    """Adjacent parts added (``add``) level by level, an odd last one carried up a level. A list cut into
    consecutive blocks of a power-of-two length (the last may be shorter) gives the same sum, to the bit, when each
    block is summed this way first and the blocks' sums then are."""
    if not parts:
        raise ValueError("pairwise_sum needs at least one part")
    while len(parts) > 1:
        parts = [add(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _add_into(left: list[torch.Tensor], right: list[torch.Tensor]) -> list[torch.Tensor]:
    """``left`` with ``right`` added in place, tensor by tensor."""
    torch._foreach_add_(left, right)
    return left


class UnitStep:
    """One step's forward over this rank's units (``heads``: ``MatchingHeads``; the inputs on the host, each unit
    moved to ``device``); the online embeddings are leaves for the loss, and ``backward`` takes their gradients
    back through each unit and into ``parameters``' ``.grad`` (the global batch's gradient: the units' and then the
    ranks' sums)."""

    def __init__(self, heads: torch.nn.Module, image_inputs: torch.Tensor, text_inputs: torch.Tensor,
                 device: torch.device | str = "cpu", unit_rows: int = UNIT_ROWS):
        starts = range(0, image_inputs.shape[0], unit_rows)
        # An empty share still runs the heads once, for the embeddings' shapes (its gradient is zero).
        units = [slice(start, start + unit_rows) for start in starts] or [slice(0, 0)]
        # Token states lose their padding per unit, so that a unit's inputs are the same in every split; on the
        # host, where reading a unit's length costs no synchronisation.
        self._outputs = [heads(trim_token_padding(image_inputs[unit]).to(device),
                               trim_token_padding(text_inputs[unit]).to(device)) for unit in units]
        self.image, self.text = (torch.cat([out[which] for out in self._outputs]).detach().requires_grad_()
                                 for which in (0, 1))
        self.image_key, self.text_key = (torch.cat([out[which] for out in self._outputs]) for which in (2, 3))

    def backward(self, parameters: list[torch.nn.Parameter], group=None) -> None:
        """After the loss's backward into ``image`` and ``text``: every parameter's ``.grad`` is the sum of every
        unit's gradient on every rank (``group``), the same on every rank."""
        sizes = [out[0].shape[0] for out in self._outputs]
        image_grads, text_grads = ((leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).split(sizes)
                                   for leaf in (self.image, self.text))
        per_unit = []
        for (image, text, _, _), image_grad, text_grad in zip(self._outputs, image_grads, text_grads):
            grads = torch.autograd.grad((image, text), parameters, (image_grad, text_grad), allow_unused=True)
            per_unit.append([grad if grad is not None else torch.zeros_like(parameter)
                             for grad, parameter in zip(grads, parameters)])
        # Parameter by parameter (one foreach addition per pair of units), without a flat copy of each unit's, and
        # into the left unit's own gradients: a fresh sum per level allocated and faulted in 5 M floats, 6.3 of a
        # bfloat16 step's 78.6 ms at --finetune 1 (emoji, 2 CPU threads). The sums are the same to the bit.
        total = pairwise_sum(per_unit, add=_add_into)
        if distributed.world_size(group) > 1:
            ranks = distributed.world_size(group)
            flat = torch.cat([grad.reshape(-1) for grad in total])
            gathered = distributed.all_gather_rows(flat.unsqueeze(0), [1] * ranks, group, "gradients")
            flat = pairwise_sum(list(gathered.unbind(0)))
            total = [part.view(parameter.shape) for part, parameter in
                     zip(flat.split([parameter.numel() for parameter in parameters]), parameters)]
        for parameter, grad in zip(parameters, total):
            # In the parameter's own layout (strides), as the optimiser and a fused Adam expect.
            parameter.grad = grad if grad.stride() == parameter.stride() else torch.empty_like(parameter).copy_(grad)
