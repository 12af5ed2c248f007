"""``python -m full.bench``: see :mod:`full.bench.harness`."""
from .harness import main

main()
