"""`python -m vpmoe ...` is the `vpmoe` command."""
import sys

from vpmoe.cli import main

sys.exit(main())
