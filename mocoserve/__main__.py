"""`python -m mocoserve` (also what `torchrun -m mocoserve` runs)."""

from mocoserve.cli import main

main()
