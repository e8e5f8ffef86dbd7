"""`python -m ddim_fast` runs the `ddim-fast` command line (ddim_fast.cli)."""

import sys

from .cli import main

sys.exit(main())
