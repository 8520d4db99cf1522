"""`python -m milter_wkd` is the `milter-wkd` command."""

import sys

from milter_wkd.cli import main

sys.exit(main())
