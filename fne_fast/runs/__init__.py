"""A run's folder and the files it trusts: verified checkpoints (``checkpoint``), the folder's lock and clean
interruption (``folder``), the record of the data by content (``fingerprint``) and the names and readers of the
files a training run writes (``artifacts``)."""
