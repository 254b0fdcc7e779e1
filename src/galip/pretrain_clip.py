"""Moved to the embedded world's package: ``python -m galip.world.pretrain_clip``. This name says so, then goes."""

import sys

MESSAGE = "galip: galip.pretrain_clip moved with the embedded world: python -m galip.world.pretrain_clip"
if __name__ == "__main__":
    sys.exit(MESSAGE)
raise ImportError(MESSAGE)
