"""`python shownet.py --load-file DIR ...`: the original's plotting tool, run by distconvnet."""
import sys

from distconvnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["show"] + sys.argv[1:]))
