"""The daemon (layer L6): `mount` (the composition root of a mounted volume), its
`supervisor` (key health, rotation policy, resume, online rotation), the `control`
socket's protocol, `systemd` notification, key `health` and the `mountpoint`."""
