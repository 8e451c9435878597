"""`python -m services` starts the whole stack (the same as `python -m services.launcher`)."""

import sys

from services.launcher.cli import main

sys.exit(main())
