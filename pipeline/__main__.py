"""`python -m pipeline` is the `callmeter` command: child processes (the supervisor's workers, demo,
bench, tests) start it this way, so their command line does not depend on where the CLI module lives."""

import sys

from pipeline.commands.cli import main

sys.exit(main())
