"""Export a run or checkpoint as a plain weights file: python scripts/export.py RUN -o weights.pt"""

from illm.export import main

if __name__ == "__main__":
    main()
