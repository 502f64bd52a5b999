"""`python -m encfs` runs the command line."""

import sys

from encfs.cli import main

sys.exit(main())
