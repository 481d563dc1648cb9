"""Experiments over training runs: ``fne-fast compare`` (arms × seeds, each run selected by validation), the paired
statistics that say whether a difference is beyond noise, and the comparison's plot."""
