"""The `encfs-gw` command line (layer L7): `app` (parser, main, error reporting),
`common` (what the commands share), and the commands by subject: `mounting`, `keys`,
`rotating`, `checking`. Every failure is one line on stderr and a stable exit code
(docs/EXITCODES.md)."""

from encfs.cli.app import main

__all__ = ["main"]
