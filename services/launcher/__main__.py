"""`python -m services.launcher`: see services/launcher/cli.py."""

import sys

from services.launcher.cli import main

sys.exit(main())
