"""The caption texts of a run's data set, parsed once and cached: what TAGS-DC and the swap test read beside the
cached features (data sets of precomputed features have no texts)."""

from __future__ import annotations

from dataclasses import dataclass

from fne_fast.data import RawSplit, load_raw_split
from fne_fast.tags.spans import ParsedCaption, cached_parse
from fne_fast.tags.vocab import Vocabulary, build_vocabulary

__all__ = ["SplitTexts", "Corpus"]


@dataclass
class SplitTexts:
    """One split's captions in the rows of its ``FeatureSplit``."""

    captions: list[str]
    caption_image: list[int]
    image_group: list[int] | None  # group number of each image
    image_names: list[str]
    parsed: list[ParsedCaption]


def _group_numbers(names: list[str] | None) -> list[int] | None:
    if names is None:
        return None
    numbering: dict[str, int] = {}
    return [numbering.setdefault(name, len(numbering)) for name in names]


class Corpus:
    """``Corpus(dataset, data_options, cache_dir, limit, eval_limit)[split]`` -> SplitTexts, parsed on first use;
    the limits keep the first images of each split as ``fne_fast.training.data.load_splits`` does (``eval_limit``:
    of the validation and test splits only)."""

    def __init__(self, dataset: str, data_options: dict, cache_dir: str, limit: int | None = None,
                 progress: bool = True, eval_limit: int | None = None):
        if dataset == "features":
            raise ValueError("the 'features' data set has no caption texts to parse")
        self.dataset, self.data_options, self.cache_dir = dataset, data_options, cache_dir
        self.limit, self.eval_limit = limit, eval_limit
        self.progress = progress
        self._splits: dict[str, SplitTexts] = {}
        self._vocabularies: dict[int | None, Vocabulary] = {}

    def _raw(self, split: str) -> RawSplit:
        return load_raw_split(self.dataset, split, **self.data_options)

    def __getitem__(self, split: str) -> SplitTexts:
        if split not in self._splits:
            raw = self._raw(split)
            limits = [self.limit, self.eval_limit if split != "train" else None]
            images = min([len(raw.images), *(limit for limit in limits if limit is not None)])
            keep = [row for row, image in enumerate(raw.caption_image) if image < images]
            captions = [raw.captions[row] for row in keep]
            groups = None if raw.image_group is None else raw.image_group[:images]
            names = (raw.image_names or [str(image) for image in range(len(raw.images))])[:images]
            parsed = cached_parse(captions, self.cache_dir, f"{self.dataset}-{split}", progress=self.progress)
            self._splits[split] = SplitTexts(captions, [raw.caption_image[row] for row in keep],
                                             _group_numbers(groups), names, parsed)
        return self._splits[split]

    def vocabulary(self, max_size: int | None = None) -> Vocabulary:
        """The training captions' words: the ``max_size`` most frequent, or all of them."""
        if max_size not in self._vocabularies:
            parsed = self["train"].parsed
            self._vocabularies[max_size] = build_vocabulary(parsed, max_size or 1 + sum(len(p.words) for p in parsed))
        return self._vocabularies[max_size]
