"""`python -m nlc ...`: the same as the `nlc` command."""
import sys

from nlc.cli import main

sys.exit(main())
