"""`python -m medgpt`: the `medgpt` command."""

import sys

from medgpt.cli import main

sys.exit(main())
