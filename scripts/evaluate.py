"""Evaluate autoencoders on image folders: python scripts/evaluate.py --weights W --data kodak=DIR -o results/"""

import sys

from illm.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
