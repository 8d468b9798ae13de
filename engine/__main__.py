"""``python -m engine``: the command line; also what ``accelerate launch -m engine batch`` runs."""
import sys

from .cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
