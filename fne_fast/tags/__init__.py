"""TAGS-DC (Fan et al., 2021, "Negative Sample is Negative in Its Own Way"): tailored negative sentences made
from each caption, with word discrimination and correction, trained beside any sampler (``fne-fast train --tags``).

spans (spaCy) -> masking -> generator refills (temperature 1.5) -> filter (copies, duplicates, synonym swaps) ->
scoring by the current model, m hardest kept -> synthetic ranking hinge, word discrimination, word correction.
The one-word-swap test (``swap``) scores every run, with or without TAGS-DC.
"""

from fne_fast.tags.options import TagsOptions

__all__ = ["TagsOptions"]
