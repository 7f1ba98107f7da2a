"""``python -m illm``: the command line (see `illm.cli`)."""

from illm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
