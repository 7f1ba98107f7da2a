"""Export a run or checkpoint as a plain weights file: python scripts/export.py RUN -o weights.pt"""

import sys

from illm.export import main

if __name__ == "__main__":
    sys.exit(main())
