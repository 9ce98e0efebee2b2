"""`python -m condkit` runs the command line, as the `condkit` script does."""

import sys

from condkit.cli import main

sys.exit(main())
