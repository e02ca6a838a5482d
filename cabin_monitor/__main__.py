"""``python -m cabin_monitor``."""

import sys

from cabin_monitor.cli import main

sys.exit(main())
