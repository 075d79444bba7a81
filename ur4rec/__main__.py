"""``python -m ur4rec``: the same command line as ``ur4rec``."""

import sys

from ur4rec.cli import main

sys.exit(main())
