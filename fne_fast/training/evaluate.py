"""Retrieval evaluation: Recall@1/5/10 both directions and rsum, strict and by semantic group.

Strict recall counts only an item's own captions (image→text) or its own image (text→image) as hits, so a
retrieved variant of the same emoji is a miss; group recall counts any item of the anchor's semantic group as a
hit. Both are reported because strict recall penalises exactly the false negatives FNE is meant to tolerate.

A broken model is never reported as good: recalls of non-finite embeddings are refused (``NonFiniteError``), and
the ranking itself never counts a non-finite score as a hit (a NaN candidate ranks below every other, and a row
whose positives score NaN is ranked last), so even NaN scores cannot raise a recall.
"""

from __future__ import annotations

import torch

from fne_fast.data import FeatureSplit
from fne_fast.errors import NonFiniteError
from fne_fast.models.tops import trim_token_padding
from fne_fast.training.model_selection import run_summary

__all__ = ["retrieval_metrics", "retrieval_ranks", "recalls_from_ranks", "group_precision_from_ranks",
           "embed_split", "final_table",
           "RECALL_KS", "RECALL_KEYS", "raise_if_not_finite_embeddings"]

RECALL_KS = (1, 5, 10)  # Recall@K cut-offs; rsum adds both directions' recalls at these
RECALL_KEYS = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS)
_PRECISION_SUFFIXES = ("_group_rprec", "_group_map_r")  # per-item ECCV metrics beside the group ranks

def raise_if_not_finite_embeddings(image: torch.Tensor, text: torch.Tensor) -> None:
    bad = {name: int((~torch.isfinite(values)).any(dim=1).sum()) for name, values in (("image", image),
                                                                                      ("text", text))}
    if any(bad.values()):
        raise NonFiniteError(f"the model's embeddings are not finite ({bad['image']} of {image.shape[0]} image rows, "
                             f"{bad['text']} of {text.shape[0]} text rows hold NaN or infinity): no recall is "
                             "reported for a broken model")


@torch.no_grad()
def embed_split(heads, split: FeatureSplit, device, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-head embeddings of every image and caption of a split (float32, on ``device``)."""
    heads.eval()
    image = torch.cat([heads.image_head(trim_token_padding(chunk).to(device))
                       for chunk in split.image_features.split(batch_size)])
    text = torch.cat([heads.text_head(trim_token_padding(chunk).to(device))
                      for chunk in split.text_features.split(batch_size)])
    heads.train()
    return image, text


def _precision_at_group_size(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ECCV Caption's metrics for rows with several positives (float64 per row): with R the row's positives,
    R-Precision is the share of the top R candidates that are positives, and mAP@R the mean over the top R ranks
    k of P@k at the positives. Candidates are ordered by score (NaN last), ties by index."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    count = positive.sum(dim=1)
    width = int(count.max()) if count.numel() else 0
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :width]
    hits = torch.gather(positive, 1, order).double()
    within = torch.arange(width, device=scores.device).reshape(1, -1) < count.reshape(-1, 1)
    hits = hits * within
    precision_at = hits.cumsum(dim=1) / torch.arange(1, width + 1, device=scores.device, dtype=torch.float64)
    size = count.clamp(min=1).double()
    return hits.sum(dim=1) / size, (hits * precision_at).sum(dim=1) / size


def _ranks_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row, how many candidates score strictly above the row's best positive (0 = retrieved first). A
    NaN score ranks below every other; a row whose best positive is not finite ranks last (never a hit)."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    ranks = (scores > best).sum(dim=1)
    return torch.where(torch.isfinite(best.squeeze(1)), ranks, torch.full_like(ranks, scores.shape[1]))


@torch.no_grad()
def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor,
                    image_group: torch.Tensor | None = None, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Per-item ranks of the best hit (0 = retrieved first), int64 on the CPU, for unit embeddings ``image``
    [I, D] and ``text`` [T, D]: ``i2t`` [I], ``t2i`` [T], and with groups ``i2t_group``, ``t2i_group``. The
    recalls are read from them (``recalls_from_ranks``), and so is the paired bootstrap over test items. With
    groups also each item's R-Precision and AP@R over its group (float64: ``i2t_group_rprec``,
    ``i2t_group_map_r``, ``t2i_…``; ``group_precision_from_ranks``). Raises ``NonFiniteError`` when an embedding
    is not finite."""
    raise_if_not_finite_embeddings(image, text)
    caption_image = caption_image.to(image.device)
    # Strict recall labels each image by itself; group recall by its group. A hit shares the anchor's label. Each
    # chunk of scores is computed once and ranked under every labeling.
    labelings = {"": torch.arange(image.shape[0], device=image.device)}
    if image_group is not None:
        labelings["_group"] = image_group.to(image.device)
    caption_labels = {suffix: labels[caption_image] for suffix, labels in labelings.items()}
    chunks: dict[str, list[torch.Tensor]] = {f"{direction}{suffix}": [] for direction in ("i2t", "t2i")
                                             for suffix in (*labelings, *(_PRECISION_SUFFIXES if image_group
                                                                          is not None else ()))}

    def add(direction, suffix, scores, positive):
        chunks[f"{direction}{suffix}"].append(_ranks_of_best_positive(scores, positive).cpu())
        if suffix == "_group":
            r_precision, map_at_r = _precision_at_group_size(scores, positive)
            chunks[f"{direction}_group_rprec"].append(r_precision.cpu())
            chunks[f"{direction}_group_map_r"].append(map_at_r.cpu())

    for start in range(0, image.shape[0], chunk):
        scores = image[start:start + chunk] @ text.T
        for suffix, labels in labelings.items():
            add("i2t", suffix, scores, labels[start:start + chunk, None] == caption_labels[suffix][None, :])
    for start in range(0, text.shape[0], chunk):
        scores = text[start:start + chunk] @ image.T
        for suffix, labels in labelings.items():
            add("t2i", suffix, scores, caption_labels[suffix][start:start + chunk, None] == labels[None, :])
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def group_precision_from_ranks(ranks: dict[str, torch.Tensor]) -> dict[str, float]:
    """R-Precision and mAP@R over the semantic group in percent, per direction and their mean over both
    (``group_rprec``, ``group_map_r``), from ``retrieval_ranks`` with groups; empty without them."""
    metrics: dict[str, float] = {}
    for name in ("rprec", "map_r"):
        if f"i2t_group_{name}" not in ranks:
            continue
        for direction in ("i2t", "t2i"):
            metrics[f"{direction}_group_{name}"] = 100.0 * ranks[f"{direction}_group_{name}"].mean().item()
        metrics[f"group_{name}"] = (metrics[f"i2t_group_{name}"] + metrics[f"t2i_group_{name}"]) / 2
    return metrics


def recalls_from_ranks(ranks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Recalls in percent (``i2t_r1`` … ``t2i_r10``, ``rsum``, and with group ranks ``i2t_group_r1`` …,
    ``group_rsum``)."""
    metrics: dict[str, float] = {}
    for prefix, suffix in (("", ""), ("group_", "_group")):
        if f"i2t{suffix}" not in ranks:
            continue
        for direction in ("i2t", "t2i"):
            for k in RECALL_KS:
                metrics[f"{direction}_{prefix}r{k}"] = 100.0 * (ranks[direction + suffix] < k).double().mean().item()
        metrics[f"{prefix}rsum"] = sum(metrics[f"{direction}_{prefix}r{k}"] for direction in ("i2t", "t2i")
                                       for k in RECALL_KS)
    return metrics


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor,
                      image_group: torch.Tensor | None = None, chunk: int = 1024) -> dict[str, float]:
    """Recalls in percent (``i2t_r1`` … ``t2i_r10``, ``rsum``, and with groups ``i2t_group_r1`` …,
    ``group_rsum``) for unit embeddings ``image`` [I, D] and ``text`` [T, D]. Raises ``NonFiniteError`` when an
    embedding is not finite."""
    return recalls_from_ranks(retrieval_ranks(image, text, caption_image, image_group, chunk))


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _recall_rows(row: dict, label: str) -> list[str]:
    lines = []
    for view, prefix in (("strict", ""), ("group", "group_")):
        if f"{prefix}rsum" in row:
            cells = [f"{row[f'{direction}_{prefix}r{k}']:.1f}" for direction in ("i2t", "t2i")
                     for k in RECALL_KS]
            lines.append(f"| {label} | {view} | " + " | ".join(cells) + f" | {row[f'{prefix}rsum']:.1f} |")
    return lines


def final_table(history: list[dict], title: str) -> str:
    """Test recalls of the best-validation epoch and of the last epoch as a small Markdown table (what
    `fne-fast train` prints at the end)."""
    if not history:
        return f"{title}: no epoch trained"
    summary = run_summary(history)
    best, last = summary["best"], summary["last"]
    lines = [f"### {title}", "",
             "| epoch | view | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += _recall_rows(best, f"{best['epoch']} (best val rsum {best['val_rsum']:.1f})")
    if last is not best:
        lines += _recall_rows(last, f"{last['epoch']} (last)")
    lines += ["", f"last epoch: FN rate of chosen negatives {_percent(last['fn_rate'])}, of sampled ones "
                  f"{_percent(last.get('fn_rate_sampled'))}, fallback {_percent(last['fallback_rate'])}, mean P_fn "
                  f"{_percent(last['mean_p_fn'])}"]
    if best.get("swap_acc") is not None:
        kinds = ", ".join(f"{kind} {best[f'swap_acc_{kind}']:.1f}%" for kind in ("object", "attribute", "relation")
                          if best.get(f"swap_acc_{kind}") is not None)
        lines.append(f"best epoch: one-word-swap accuracy {best['swap_acc']:.1f}% ({kinds})")
    return "\n".join(lines)
