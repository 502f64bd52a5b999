"""The daemon (layer L6): `mount` (the composition root of a mounted volume), its
`supervisor` (key health, rotation policy, resume, online rotation), the `control`
socket's protocol, `systemd` notification, key `health`, the `mountpoint`, the
`request_loop` that serves the mount (accelerated or pyfuse3's stock loop), and
`runtime` (where a daemon is found: mount table, runtime directory, lock holder)."""
