"""Entry point of ``python -m diffusion.demo.oracle``."""

import sys

from diffusion.demo.oracle.cli import main

sys.exit(main())
