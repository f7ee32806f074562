"""Entry point of ``python -m diffusion.demo``."""

import sys

from diffusion.demo.cli import main

sys.exit(main())
