"""Moved to the embedded world's package: ``python -m galip.world.train_judge``. This name says so, then goes."""

import sys

MESSAGE = "galip: galip.train_judge moved with the embedded world: python -m galip.world.train_judge"
if __name__ == "__main__":
    sys.exit(MESSAGE)
raise ImportError(MESSAGE)
