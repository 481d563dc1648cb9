"""A training loop of your own around fne_fast: two encoders you define, their momentum copies from torch's own
``AveragedModel``, two memory banks and ``FNELoss`` — no fne_fast training code (docs/TRAINING.md, "Your own
encoders").

    python examples/own_encoders.py --epochs 4 --checkpoint own.pt

The data is synthetic: items come in semantic groups, an "image" is a noisy vector near its group's centre and its
caption a bag of words, some shared by the group and some the item's own; items of one group are the natural false
negatives of each other, which the loop counts among the negatives FNE draws.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fne_fast


class ImageEncoder(nn.Module):
    def __init__(self, pixels: int, dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(pixels, 128), nn.BatchNorm1d(128), nn.GELU(), nn.Linear(128, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.layers(images), dim=-1)  # FNELoss expects unit vectors


class TextEncoder(nn.Module):
    def __init__(self, vocabulary: int, dim: int):
        super().__init__()
        self.words = nn.EmbeddingBag(vocabulary, 64)
        self.project = nn.Linear(64, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self.words(tokens)), dim=-1)


def synthetic_pairs(items: int, groups: int, pixels: int = 48, words: int = 6, seed: int = 0):
    """(images [items, pixels], captions [items, words] token ids, the group of each item)."""
    generator = torch.Generator().manual_seed(seed)
    group = torch.arange(items) % groups
    centres = torch.randn(groups, pixels, generator=generator)
    images = centres[group] + 0.5 * torch.randn(items, pixels, generator=generator)
    shared = torch.randint(0, 100, (groups, words // 2), generator=generator)  # the group's words
    own = 100 + torch.randint(0, 400, (items, words - words // 2), generator=generator)  # the item's own
    return images, torch.cat([shared[group], own], dim=1), group


def train(*, epochs: int = 4, batch: int = 32, bank_size: int = 512, dim: int = 32, items: int = 640,
          groups: int = 64, seed: int = 0, checkpoint: str | None = None) -> dict:
    """Trains both encoders; returns the per-epoch loss and share of drawn negatives in the anchor's group, and the
    encoders, banks and loss as they end."""
    torch.manual_seed(seed)
    images, captions, group_of_id = synthetic_pairs(items, groups, seed=seed)
    image_encoder, text_encoder = ImageEncoder(images.shape[1], dim), TextEncoder(500, dim)
    # The momentum copies produce the keys (the banks' rows and the positives' s⁺); use_buffers follows BatchNorm.
    ema = get_ema_multi_avg_fn(0.995)
    image_keys = AveragedModel(image_encoder, multi_avg_fn=ema, use_buffers=True)
    text_keys = AveragedModel(text_encoder, multi_avg_fn=ema, use_buffers=True)
    optimizer = torch.optim.Adam([*image_encoder.parameters(), *text_encoder.parameters()], lr=1e-3)
    image_bank, text_bank = fne_fast.MemoryBank(bank_size, dim), fne_fast.MemoryBank(bank_size, dim)
    criterion = fne_fast.FNELoss("fne", fne_fast.SamplerOptions(min_count=20), seed=seed)
    history, step = [], 0
    for epoch in range(epochs):
        criterion.stats.reset()  # the running statistics are the epoch's (the authors' rule)
        order = torch.randperm(items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        losses, drawn, in_group = [], 0, 0
        for ids in order.split(batch):
            image, text = image_encoder(images[ids]), text_encoder(captions[ids])
            with torch.no_grad():
                image_key, text_key = image_keys(images[ids]), text_keys(captions[ids])
            # The keys go into the banks before the loss draws from them (this step's own rows are positives).
            image_bank.enqueue(image_key, ids)
            text_bank.enqueue(text_key, ids)
            loss, sums = criterion(image, text, image_key, text_key, ids, image_bank=image_bank, text_bank=text_bank,
                                   step=step, warmup=epoch == 0, group_of_id=group_of_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            image_keys.update_parameters(image_encoder)
            text_keys.update_parameters(text_encoder)
            # FNELoss's sums (device tensors; .item() here only because this loop is small): the loss, and of the
            # drawn negatives, how many lie in the anchor's group.
            losses.append(sums["loss"].item())
            drawn, in_group = drawn + int(sums["group_slots"]), in_group + int(sums["false_negatives"])
            step += 1
        history.append({"epoch": epoch, "loss": sum(losses) / len(losses),
                        "negatives_in_group": in_group / max(drawn, 1)})
        print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: loss {history[-1]['loss']:.4f}, "
              f"negatives in the anchor's group {100 * history[-1]['negatives_in_group']:.1f}%")
    if checkpoint:
        # Your own state: the encoders, their momentum copies, the optimiser, the banks and the statistics.
        torch.save({"image_encoder": image_encoder.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "image_keys": image_keys.state_dict(), "text_keys": text_keys.state_dict(),
                    "optimizer": optimizer.state_dict(), "image_bank": image_bank.state_dict(),
                    "text_bank": text_bank.state_dict(), "stats": criterion.stats.state_dict(), "step": step},
                   checkpoint)
    return {"history": history, "encoders": (image_encoder, text_encoder), "banks": (image_bank, text_bank),
            "criterion": criterion, "data": (images, captions, group_of_id)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="write the loop's state here (torch.save)")
    args = parser.parse_args(argv)
    train(epochs=args.epochs, seed=args.seed, checkpoint=args.checkpoint)


if __name__ == "__main__":
    main()
