"""`encfs-gw convert`: turn a plaintext directory into a volume in place, file by file.

The directory DIR becomes the volume's backing directory. Its plaintext tree first moves
aside into DIR/.egw-convert.d/tree (one rename per top-level entry: no data is copied),
the volume is made in DIR, and then every file is written into the volume through the
engine's public methods, read back and compared with a digest of its plaintext, and only
then is its plaintext unlinked. Extra space: the format's overhead for the tree plus the
files in flight (one batch, at most the largest file or 16 MiB), checked before starting.

Crash safety (docs/FORMAT.md section 8 gives the whole argument): DIR/.egw-convert, made
atomically (O_TMPFILE + linkat) before the first change and removed after the last,
marks a conversion in progress, and from the moment the volume is made its
authenticated config records it too (`conversion`, which older readers refuse as an
unknown field); every other encfs-gw command refuses such a directory. The config's
record goes first at the end, the marker last.
DIR/.egw-convert.d/state (replaced atomically) names the batch in flight: before its
encrypted copies are verified and synced, a resume removes them (the plaintext is
intact); after, a resume finishes unlinking the plaintext. A directory's original
metadata is in the state before anything in it changes.

Only the engine's public API is used (create, write, read, mkdir, symlink, mknod, link,
setattr, setxattr, lookup, unlink), with `create_volume` and `Volume.unlock`.

The modules, one job each (imports point down this list):
  tree      reading the plaintext tree (paths, O_NOATIME opens, xattrs, data extents)
  in_use    is the directory in use (processes' files, mounts below it)
  plan      the scan, the space and inode estimate, what a volume cannot keep
  records   the marker, the state file, the count of changes (test-only crash hooks)
  staging   the staging directory: lock, stage the tree, open the state, remove
  report    progress, the census of the finished volume, the plan's description
  sides     a path on the plaintext side and on the volume side
  transfer  one unit into the volume, read back and compared
  walk      the walk and its batches (commit, undo, resolve after a crash)
  driver    `convert` and the phases in order
"""

from encfs.convert.driver import convert
from encfs.convert.in_use import users_of
from encfs.convert.plan import Plan, scan
from encfs.convert.records import CRASH_AFTER_ENV, STOP_AFTER_ENV
from encfs.convert.report import Progress, describe_plan

__all__ = [
    "CRASH_AFTER_ENV",
    "STOP_AFTER_ENV",
    "Plan",
    "Progress",
    "convert",
    "describe_plan",
    "scan",
    "users_of",
]
