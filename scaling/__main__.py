"""``python -m scaling``: see scaling/cli.py."""

import sys

from scaling.cli import main

sys.exit(main())
