"""The settings of TAGS-DC, one frozen, self-validating record; ``fne-fast train --tags`` builds its
``--tags-*`` flags from these fields (their help is the field's metadata)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["TagsOptions"]


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TagsOptions:
    pool_captions: int = _option(512, "training captions that get synthetic negatives each epoch")
    masked_versions: int = _option(2, "masked versions of each pool caption (authors: 20)")
    samples: int = _option(3, "refills sampled per masked version (authors: 20)")
    keep: int = _option(3, "hardest synthetic sentences kept per caption and step (authors: 31 of 401)")
    captions_per_step: int = _option(8, "pool captions whose synthetic negatives each training step uses")
    mask_probability: float = _option(0.15, "probability that a span is masked")
    temperature: float = _option(1.5, "sampling temperature of the generator")
    margin: float = _option(0.2, "margin of the synthetic ranking hinge")
    rank_weight: float = _option(1.0, "weight of the synthetic ranking loss")
    mlm_weight: float = _option(0.1, "weight of the generator's masked-word loss (authors: 0.01-0.1)")
    discrimination_weight: float = _option(5e-4, "weight of the word discrimination loss (authors: 5e-4)")
    correction_weight: float = _option(5e-4, "weight of the word correction loss (authors: 5e-4)")
    hidden_dim: int = _option(512, "hidden width of the generator and corrector (discriminator: half)")
    vocabulary_size: int = _option(8192, "most frequent training-caption words the generator can write")
    heldout_captions: int = _option(128, "validation captions whose synthetic sentences measure the word-level "
                                         "heads each epoch")
    examples: int = _option(6, "captions shown per epoch in examples.md")

    def __post_init__(self):
        for name in ("pool_captions", "masked_versions", "samples", "keep", "captions_per_step", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"--tags-{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("heldout_captions", "examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--tags-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.vocabulary_size < 2:
            raise ValueError(f"--tags-vocabulary-size must be >= 2, got {self.vocabulary_size}")
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"--tags-mask-probability must be in (0, 1], got {self.mask_probability}")
        if not self.temperature > 0.0:
            raise ValueError(f"--tags-temperature must be > 0, got {self.temperature}")
        for name in ("margin", "rank_weight", "mlm_weight", "discrimination_weight", "correction_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"--tags-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)
