"""`python -m ddim_fast.cli` (and torchrun -m ddim_fast.cli) runs the command line."""

import sys

from .main import main

sys.exit(main())
