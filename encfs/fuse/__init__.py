"""The FUSE adapter (layer L5): `operations` (pyfuse3's handlers over a Volume),
`errno_map` (the one exception -> errno table) and `syncer` (fsync off the trio thread);
they import only the engine and errors. The accelerated request loop is `accel/`, which
nothing here imports: the daemon switches it on (encfs.daemon.request_loop). With the
daemon, the only place that imports pyfuse3."""
