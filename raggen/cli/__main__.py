"""``python -m raggen.cli``: the ``raggen`` command."""

import sys

from raggen.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
