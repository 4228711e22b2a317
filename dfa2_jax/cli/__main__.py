"""``python -m dfa2_jax.cli``."""

import sys

from dfa2_jax.cli import main

sys.exit(main())
