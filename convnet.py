"""`python convnet.py ...`: the original's command line, run by distconvnet."""
import sys

from distconvnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
