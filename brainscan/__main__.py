"""``python -m brainscan``: the ``brainscan`` command, for machines where the package is not installed."""

import sys

from brainscan.cli.main import main

sys.exit(main())
