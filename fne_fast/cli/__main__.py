"""``python -m fne_fast.cli …`` (what torchrun runs: ``torchrun --nproc_per_node 2 -m fne_fast.cli train …``)."""

import sys

from fne_fast.cli import main

sys.exit(main())
