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

__all__ = ["retrieval_metrics", "embed_split", "final_table", "comparison_table", "RECALL_KEYS", "NonFiniteError",
           "raise_if_not_finite_embeddings"]

_KS = (1, 5, 10)
RECALL_KEYS = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in _KS)


class NonFiniteError(RuntimeError):
    """A model, loss or embedding holds NaN or infinity: there is no result to report."""


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
    image = torch.cat([heads.image_head(chunk.to(device)) for chunk in split.image_features.split(batch_size)])
    text = torch.cat([heads.text_head(chunk.to(device)) for chunk in split.text_features.split(batch_size)])
    heads.train()
    return image, text


def _ranks_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row, how many candidates score strictly above the row's best positive (0 = retrieved first). A
    NaN score ranks below every other; a row whose best positive is not finite ranks last (never a hit)."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    ranks = (scores > best).sum(dim=1)
    return torch.where(torch.isfinite(best.squeeze(1)), ranks, torch.full_like(ranks, scores.shape[1]))


@torch.no_grad()
def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor,
                      image_group: torch.Tensor | None = None, chunk: int = 1024) -> dict[str, float]:
    """Recalls in percent (``i2t_r1`` … ``t2i_r10``, ``rsum``, and with groups ``i2t_group_r1`` …,
    ``group_rsum``) for unit embeddings ``image`` [I, D] and ``text`` [T, D]. Raises ``NonFiniteError`` when an
    embedding is not finite."""
    raise_if_not_finite_embeddings(image, text)
    caption_image = caption_image.to(image.device)
    # Strict recall labels each image by itself; group recall by its group. A hit shares the anchor's label.
    labelings = {"": torch.arange(image.shape[0], device=image.device)}
    if image_group is not None:
        labelings["group_"] = image_group.to(image.device)
    metrics: dict[str, float] = {}
    for prefix, label_of_image in labelings.items():
        caption_label = label_of_image[caption_image]
        i2t_ranks = torch.cat([
            _ranks_of_best_positive(image[start:start + chunk] @ text.T,
                                    label_of_image[start:start + chunk, None] == caption_label[None, :])
            for start in range(0, image.shape[0], chunk)])
        t2i_ranks = torch.cat([
            _ranks_of_best_positive(text[start:start + chunk] @ image.T,
                                    caption_label[start:start + chunk, None] == label_of_image[None, :])
            for start in range(0, text.shape[0], chunk)])
        for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
            for k in _KS:
                metrics[f"{direction}_{prefix}r{k}"] = 100.0 * (ranks < k).double().mean().item()
        metrics[f"{prefix}rsum"] = sum(metrics[f"{direction}_{prefix}r{k}"] for direction in ("i2t", "t2i")
                                       for k in _KS)
    return metrics


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def final_table(history: list[dict], title: str) -> str:
    """The last epoch's recalls as a small Markdown table (what `fne-fast train` prints at the end)."""
    if not history:
        return f"{title}: no epoch trained"
    last = history[-1]
    lines = [f"### {title}: epoch {last['epoch']}", "",
             "| view | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |",
             "|---|---|---|---|---|---|---|---|"]
    for label, prefix in (("strict", ""), ("group", "group_")):
        if f"{prefix}rsum" in last:
            cells = [f"{last[f'{direction}_{prefix}r{k}']:.1f}" for direction in ("i2t", "t2i") for k in _KS]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {last[f'{prefix}rsum']:.1f} |")
    lines += ["", f"FN rate of chosen negatives {_percent(last['fn_rate'])}, fallback "
                  f"{_percent(last['fallback_rate'])}, mean P_fn {_percent(last['mean_p_fn'])}"]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    tensor = torch.tensor(values, dtype=torch.float64)
    std = tensor.std().item() if len(values) > 1 else 0.0
    return f"{tensor.mean().item():.1f} ± {std:.1f}"


def comparison_table(histories: dict[tuple[str, int], list[dict]], *, dataset: str, command: str) -> str:
    """Samplers × seeds -> Markdown: mean ± std over seeds of the last epoch's R@1, rsum, group rsum, and the
    false-negative rate (all chosen negatives; those the sampler drew itself, without the fallbacks) and the
    fallback rate of the last epoch's chosen negatives (in percent)."""
    samplers = list(dict.fromkeys(sampler for sampler, _ in histories))
    lines = [f"#### {dataset}", "", f"`{command}`", "",
             "| sampler | seeds | R@1 i2t | R@1 t2i | rsum | group rsum | FN rate % | FN rate sampled % | "
             "fallback % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sampler in samplers:
        lasts = [history[-1] for (name, _), history in histories.items() if name == sampler and history]

        def column(key, scale=1.0):
            return _mean_std([row[key] * scale for row in lasts if row.get(key) is not None])

        lines.append(f"| {sampler} | {len(lasts)} | {column('i2t_r1')} | {column('t2i_r1')} | {column('rsum')} | "
                     f"{column('group_rsum')} | {column('fn_rate', 100)} | {column('fn_rate_sampled', 100)} | "
                     f"{column('fallback_rate', 100)} |")
    return "\n".join(lines) + "\n"
