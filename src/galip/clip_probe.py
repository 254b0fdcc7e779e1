"""Moved to the embedded world's package: ``python -m galip.world.probe``. This name says so, then goes."""

import sys

MESSAGE = "galip: galip.clip_probe moved with the embedded world: python -m galip.world.probe"
if __name__ == "__main__":
    sys.exit(MESSAGE)
raise ImportError(MESSAGE)
