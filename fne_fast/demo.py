"""A short report of the sampler on a synthetic bank with planted false negatives.

Bank items come in semantic groups (a shared centre plus noise): items of the anchor's group other than its own
are false negatives. The report shows how often each rule picks one, what a call costs beside the bare matmul
and the eager oracle, and that the op and the oracle agree.
"""

from __future__ import annotations

import argparse

import torch

import fne_fast
from fne_fast.ops.testing import median_seconds
from fne_fast.training import TrainConfig


def planted_bank(num_anchors: int, bank_size: int, dim: int, group_size: int, seed: int):
    """Items share a topic (64 items: hard negatives) and a group (false negatives); anchors are noisy views
    of bank items, so their positives sit near 0.75, false negatives near 0.65 and hard negatives near 0.5."""
    generator = torch.Generator().manual_seed(seed)

    def directions(count):
        return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)

    item = torch.arange(bank_size)
    group, topic = item // group_size, item // 64
    bank = torch.nn.functional.normalize(0.8 * directions(int(topic.max()) + 1)[topic]
                                         + 0.5 * directions(int(group.max()) + 1)[group]
                                         + 0.3 * directions(bank_size), dim=1)
    anchor_items = torch.randperm(bank_size, generator=generator)[:num_anchors]
    anchors = torch.nn.functional.normalize(bank[anchor_items] + 0.9 * directions(num_anchors), dim=1)
    return anchors, bank, anchor_items, group


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training = TrainConfig()  # the demo's batch and bank are a training run's
    parser.add_argument("--batch", type=int, default=training.batch_size)
    parser.add_argument("--bank-size", type=int, default=training.bank_size)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    anchors, bank, anchor_items, bank_group = planted_bank(args.batch, args.bank_size, args.dim, args.group_size,
                                                           args.seed)
    anchor_ids, bank_ids = anchor_items, torch.arange(args.bank_size)
    positive_sim = (anchors * bank[anchor_items]).sum(dim=1)
    sim = anchors @ bank.T
    same_group = bank_group.reshape(1, -1) == bank_group[anchor_items].reshape(-1, 1)
    # As the running statistics do: negatives are the hardest of a batch-sized random subset of non-group items.
    subset = torch.randint(0, args.bank_size, (args.batch, 4 * args.batch),
                           generator=torch.Generator().manual_seed(args.seed))
    negatives = torch.where(same_group.gather(1, subset), -1.0, sim.gather(1, subset)).max(dim=1).values
    stats = torch.tensor([positive_sim.mean(), positive_sim.var(), negatives.mean(), negatives.var(), 1000.0])
    inputs = (anchors, bank, positive_sim, anchor_ids, bank_ids, stats)
    options = dict(k=1, tau=5.0, seed=args.seed)

    print(f"fne_fast {fne_fast.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print(f"bank {args.bank_size} x {args.dim} float32, batch {args.batch}, groups of {args.group_size} "
          f"({args.group_size - 1} false negatives per anchor)")
    print(f"stats: mu+={stats[0]:.3f} var+={stats[1]:.4f} mu-={stats[2]:.3f} var-={stats[3]:.4f}\n")
    print(f"{'rule':<10}{'false-neg picked':>18}{'mean sim':>10}{'ms/call':>10}")
    for mode in ("hardest", "fne", "uniform"):
        picked = []
        for step in range(50):
            index, chosen_sim, valid = fne_fast.sample_negatives(*inputs, mode=mode, step=step, **options)
            picked.append(same_group.gather(1, index.clamp(min=0))[valid].float())
        rate = torch.cat(picked).mean().item()
        ms = 1e3 * median_seconds(lambda: fne_fast.sample_negatives(*inputs, mode=mode, **options), args.repeats)
        print(f"{mode:<10}{100 * rate:>17.1f}%{chosen_sim.mean().item():>10.3f}{ms:>10.2f}")

    matmul_ms = 1e3 * median_seconds(lambda: anchors @ bank.T, args.repeats)
    oracle_ms = 1e3 * median_seconds(lambda: fne_fast.sample_negatives(*inputs, backend="reference", **options),
                                     args.repeats)
    fused_ms = 1e3 * median_seconds(lambda: fne_fast.sample_negatives(*inputs, **options), args.repeats)
    print(f"\nfne call {fused_ms:.2f} ms = {fused_ms / matmul_ms:.2f}x the bare matmul ({matmul_ms:.2f} ms), "
          f"{oracle_ms / fused_ms:.1f}x faster than the eager oracle ({oracle_ms:.2f} ms)")
    ours = fne_fast.sample_negatives(*inputs, **options)[0]
    theirs = fne_fast.sample_negatives(*inputs, backend="reference", **options)[0]
    print(f"agreement with the eager oracle: {100 * (ours == theirs).all(dim=1).float().mean().item():.1f}% "
          "of rows identical")


if __name__ == "__main__":
    main()
