"""Key providers: where KEKs come from (layer L2; never imports format/, volume or fuse/)."""
