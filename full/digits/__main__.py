"""``python -m full.digits``: see :mod:`full.digits.cli`."""
from .cli import main

main()
