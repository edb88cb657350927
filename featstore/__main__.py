"""`python -m featstore` (and `torchrun -m featstore build ...`) runs the command line."""

import sys

from featstore.cli import main

sys.exit(main())
