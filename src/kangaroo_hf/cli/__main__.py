"""`python -m kangaroo_hf.cli`: the `kangaroo-hf` command."""

import sys

from .main import main

sys.exit(main())
