"""The embedded world's Hydra configs, on the root configs' search path (``pkg://galip.world.conf``)."""
