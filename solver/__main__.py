"""`python -m solver`: the `solver` command through the running interpreter (no PATH needed)."""

import sys

from .cli import main

sys.exit(main())
