"""The backbones' top layers that ``--finetune N`` trains: MiniLM's top N transformer layers with its mean pooling,
and EfficientNet-Lite0's top N blocks with its head convolution and pooling. Each maps what the frozen trunk below
it gives (``fne_fast.models.backbones``: cached like features) to the backbone's feature vector, which the
projection head then maps into the joint space.

The tops always run in eval mode, also while they train: no dropout, no drop-connect, BatchNorm with the pretrained
statistics. Batch statistics and random masks would make a process's step depend on which other pairs share its
batch (W processes × B pairs would no longer follow one process × W·B) and add draws to the random state a resumed
run must replay; with batches of 32 pairs, BatchNorm's batch statistics would also be noisy.

With ``precision="bfloat16"`` a top's matrix products and convolutions run in bfloat16 under autocast (the
weights, their gradients' sums, the optimiser and everything outside the tops stay float32): on a CPU with
AVX-512 BF16 or AMX, and on a GPU, those products are 2-3× faster (emoji's shapes, 2 AMD EPYC threads: 390
against 150-165 GFLOP/s). The attention stays float32: its bfloat16 backward took 7.4 ms instead of 1.1 ms a call
on that CPU, at a tenth of the products' arithmetic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fne_fast.models.backbones import (ImageEncoder, TextEncoder, backbone_depth, shared_image_encoder,
                                       shared_text_encoder)

__all__ = ["TextTop", "ImageTop", "backbone_tops", "image_side_modality", "trim_token_padding", "TOP_PRECISIONS"]

# What a top's matrix products compute in (float32: no autocast).
TOP_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Data sets whose "images" are texts: both sides go through the text backbone.
_TEXT_IMAGE_DATASETS = ("wordnet",)


def image_side_modality(dataset: str) -> str:
    """What the image side of a data set's pairs is: "text" (WordNet's lemmas) or "image"."""
    return "text" if dataset in _TEXT_IMAGE_DATASETS else "image"


def trim_token_padding(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of packed token states [n, L, 385] cut to its longest text (texts are padded at the end to the
    longest of their split; the padding contributes exact zeros to attention and pooling); other inputs (image
    maps, features) unchanged. Emoji's training captions hold 38 token slots, a batch's longest about half that.
    It reads the length where the tensor is: on the host, before a batch goes to a GPU, it costs no
    synchronisation."""
    if inputs.dim() != 3 or inputs.shape[0] == 0:
        return inputs
    return inputs[:, :int(inputs[..., -1].sum(dim=1).max())]


class _EvalModeTop(nn.Module):
    """A trained top that stays in eval mode whatever ``train()`` is asked, and computes in its ``precision``
    (see the module's docstring): ``forward`` runs ``encode`` under autocast and returns float32."""

    def __init__(self, precision: str):
        super().__init__()
        if precision not in TOP_PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(TOP_PRECISIONS)}, got {precision!r}")
        self.precision = precision

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        dtype = TOP_PRECISIONS[self.precision]
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.encode(inputs).float()

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.children():
            module.eval()
        return self


class TextTop(_EvalModeTop):
    """MiniLM's top ``layers`` transformer layers and its pooling: ``TextEncoder.encode_trunk``'s packed token
    states [n, L, 385] (channel 384 the attention mask) -> [n, 384] unit-norm sentence embeddings."""

    def __init__(self, encoder: TextEncoder, layers: int, precision: str = "float32"):
        super().__init__(precision)
        self.dim = encoder.dim
        self.layers = copy.deepcopy(encoder.network.encoder.layer[-layers:])
        self.train()

    def encode(self, packed: torch.Tensor) -> torch.Tensor:
        if packed.shape[0] == 0:
            # No texts (a process's share of an epoch's last batch): the layers run on one dropped token, so that
            # the embeddings have their width and every parameter gets its (zero) gradient from the backward pass.
            return self.encode(torch.ones(1, 1, packed.shape[2], dtype=packed.dtype, device=packed.device))[:0]
        packed, positions = _kept_slots(packed)
        return self.encode_tokens(packed, positions)

    def forward_with_tokens(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """What ``forward`` gives, and the token states it pooled: (embeddings [n, 384], the top's output state
        [T, 384] of each kept slot, those slots' flat positions [T] in the batch cut to L slots per text, L),
        float32, with autograd. TAGS-DC's word heads read these states."""
        dtype = TOP_PRECISIONS[self.precision]
        with torch.autocast(packed.device.type, dtype=dtype, enabled=dtype != torch.float32):
            packed, positions = _kept_slots(packed)
            tokens = self._top_tokens(packed, positions)
            embeddings = self._pooled(tokens, packed, positions)
        return embeddings.float(), tokens.float(), positions, packed.shape[1]

    def encode_tokens(self, packed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The embeddings of packed token states [n, L, 385], computed over the flat slots ``positions`` (of
        n·L): every real token's, and any padding slots that are kept are weighted out of the pooling."""
        return self._pooled(self._top_tokens(packed, positions), packed, positions)

    def _top_tokens(self, packed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The top layers' output states [T, 384] of the slots ``positions`` of packed token states [n, L, 385]."""
        texts, length = packed.shape[:2]
        states, mask = packed[..., :-1].reshape(texts * length, -1), packed[..., -1].reshape(-1)
        tokens = states[positions]
        # The additive mask of the attention's keys: 0 for a token, the dtype's minimum for padding.
        additive = ((1.0 - mask.view(texts, length)) * torch.finfo(states.dtype).min)[:, None, None, :]
        for layer in self.layers:
            tokens = _bert_layer(layer, tokens, positions, texts, length, additive)
        return tokens

    def _pooled(self, tokens: torch.Tensor, packed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The masked mean of the slots' states ``tokens`` per text, L2-normalised."""
        texts, length = packed.shape[:2]
        weights = packed[..., -1].reshape(-1)[positions]
        text_of_token = torch.div(positions, length, rounding_mode="floor")
        pooled = tokens.new_zeros(texts, tokens.shape[1]).index_add_(0, text_of_token, tokens * weights[:, None])
        counts = weights.new_zeros(texts).index_add_(0, text_of_token, weights)
        return nn.functional.normalize(pooled / counts.clamp(min=1e-9)[:, None], dim=-1)


def _kept_slots(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch, the flat slots the layers' dense maps run over). The layers' dense maps run over the real
    tokens only (on emoji's batches, 55 % of the trimmed slots), the attention over the batch cut to its longest
    text: a forward and backward of one layer over 32 captions took 24 ms instead of 41 ms (2 CPU threads). Both
    read the mask, a host synchronisation on a GPU, so there the caller trims the batch on the host first
    (trim_token_padding) and every slot is kept, padding weighted out as in the attention."""
    if packed.device.type == "cpu":
        packed = trim_token_padding(packed)
        return packed, packed[..., -1].reshape(-1).nonzero().squeeze(1)
    return packed, torch.arange(packed.shape[0] * packed.shape[1], device=packed.device)


def _bert_layer(layer: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, texts: int, length: int,
                additive: torch.Tensor) -> torch.Tensor:
    """One BERT layer (eval mode: no dropout) over the tokens at ``positions`` of ``texts`` × ``length`` slots:
    the dense maps over those tokens alone, the attention over the slots (padding's keys masked by ``additive``,
    padding's queries discarded)."""
    attention = layer.attention.self
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    projections = (attention.query, attention.key, attention.value)
    qkv = nn.functional.linear(tokens, torch.cat([projection.weight for projection in projections]),
                               torch.cat([projection.bias for projection in projections]))
    slots = qkv.new_zeros(texts * length, qkv.shape[1]).index_copy(0, positions, qkv)
    query, key, value = slots.to(tokens.dtype).view(texts, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    with torch.autocast(tokens.device.type, enabled=False):  # float32 under a bfloat16 top (the module's docstring)
        context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=additive)
    context = context.transpose(1, 2).reshape(texts * length, heads * head_dim)[positions]
    attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + tokens)
    hidden = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended))
    return layer.output.LayerNorm(layer.output.dense(hidden) + attended)


class ImageTop(_EvalModeTop):
    """EfficientNet-Lite0's top ``blocks`` MBConv blocks, its head convolution, BatchNorm and activation, and the
    global average pool: ``ImageEncoder.encode_trunk``'s feature maps -> [n, 1280] features."""

    def __init__(self, encoder: ImageEncoder, blocks: int, precision: str = "float32"):
        super().__init__(precision)
        network = encoder.network
        self.dim = encoder.dim
        self.blocks = copy.deepcopy(network._blocks[-blocks:])
        self.head = nn.Sequential(copy.deepcopy(network._conv_head), copy.deepcopy(network._bn1),
                                  copy.deepcopy(network._swish))
        self.train()

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        # Each convolution runs with its BatchNorm folded in (eval mode: a per-channel affine map of its output),
        # and the 1×1 ones as matrix products over the positions, channels last: a forward and backward over 32
        # of emoji's 4×4 maps took 33 ms instead of 42 ms as modules (2 CPU threads).
        features = maps.permute(0, 2, 3, 1)  # [n, H, W, C]
        for block in self.blocks:
            features = _mbconv_block(block, features)
        head_conv, head_norm, activation = self.head
        return activation(_pointwise(head_conv, head_norm, features)).mean(dim=(1, 2))


def _folded(conv: nn.Module, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight, flattened to [out, in·k·k], and the bias of ``conv`` followed by ``norm`` in eval mode. The
    weight is scaled flat, so that its gradient reaches the parameter in the parameter's own layout whatever layout
    the convolution's gradient has (a fine-tuned step would otherwise copy it into that layout each step)."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight.flatten(1) * scale[:, None], bias


def _pointwise(conv: nn.Module, norm: nn.BatchNorm2d, features: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution and its BatchNorm on channels-last features [n, H, W, C]."""
    weight, bias = _folded(conv, norm)
    # As one matrix product over the positions: a non-contiguous 4-d input would go through a batched product
    # (4.3 ms instead of 1.9 ms for the depthwise convolution's output at emoji's shapes).
    flat = features.reshape(-1, features.shape[-1])
    return nn.functional.linear(flat, weight, bias).view(*features.shape[:-1], weight.shape[0])


def _symmetric_padding(static_padding: nn.Module) -> tuple[int, int] | None:
    """The (height, width) zero padding a convolution can add itself in place of ``static_padding`` when it pads
    both sides alike (a padded copy of the maps and its backward cost 2 ms of a step at emoji's shapes), else
    None; (0, 0) for none."""
    if isinstance(static_padding, nn.Identity):
        return 0, 0
    left, right, top, bottom = static_padding.padding
    return (top, left) if left == right and top == bottom else None


def _mbconv_block(block: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite's MBConv block (eval mode: no drop-connect; Lite's blocks have no squeeze-and-excitation)
    on channels-last features [n, H, W, C]."""
    arguments = block._block_args
    hidden = features
    if arguments.expand_ratio != 1:
        hidden = block._swish(_pointwise(block._expand_conv, block._bn0, hidden))
    depthwise = block._depthwise_conv
    weight, bias = _folded(depthwise, block._bn1)
    maps, padding = hidden.permute(0, 3, 1, 2), _symmetric_padding(depthwise.static_padding)
    if padding is None:  # one side more than the other: a padded copy
        maps, padding = depthwise.static_padding(maps).contiguous(memory_format=torch.channels_last), depthwise.padding
    maps = nn.functional.conv2d(maps, weight.view(depthwise.weight.shape), bias, depthwise.stride, padding,
                                depthwise.dilation, depthwise.groups)
    hidden = block._swish(maps).permute(0, 2, 3, 1)
    output = _pointwise(block._project_conv, block._bn2, hidden)
    if block.id_skip and arguments.stride == 1 and arguments.input_filters == arguments.output_filters:
        output = output + features
    return output


def backbone_tops(finetune: int, dataset: str, image_size: int, device="cpu",
                  precision: str = "float32") -> tuple[nn.Module, nn.Module]:
    """(image-side top, text top) with the pretrained weights of the ``finetune`` top layers, on ``device``,
    computing in ``precision`` (``TOP_PRECISIONS``)."""
    if not 1 <= finetune <= min(backbone_depth("image"), backbone_depth("text")):
        raise ValueError(f"finetune must be in [1, {min(backbone_depth('image'), backbone_depth('text'))}], "
                         f"got {finetune}")
    text = TextTop(shared_text_encoder(str(device)), finetune, precision)
    image = (TextTop(shared_text_encoder(str(device)), finetune, precision)
             if image_side_modality(dataset) == "text"
             else ImageTop(shared_image_encoder(image_size, str(device)), finetune, precision))
    return image.to(device), text.to(device)
