"""On-disk format v1: pure bytes <-> records (layer L2: no I/O, no ciphers, no FUSE).

docs/FORMAT.md specifies every byte; tests/golden keeps this package from drifting.
"""

FORMAT_NAME = "encfs-gw"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

# Feature flags a v1 volume may carry. Every flag in a volume config must be known here,
# otherwise the volume is refused (a newer encfs-gw wrote something we cannot read).
FEATURE_BLOCK_GCM = "aes256gcm-per-block-dek"
FEATURE_SIV_NAMES = "aes-siv-names"
FEATURE_LONG_NAMES = "long-names"
# Symlink targets over 3,055 bytes kept in the symlink store (docs/FORMAT.md 5.3).
FEATURE_LONG_SYMLINKS = "long-symlink-targets"
# The whole config is authenticated (config_mac, generation) and names no provider
# options: those are the operator's (docs/FORMAT.md section 2). Readers without it
# refuse such a volume; volumes without it must be upgraded (`encfs-gw upgrade`).
FEATURE_AUTH_CONFIG = "authenticated-config"
# Directories and symlink targets bound to their place (parent directory id and name),
# as file headers are: docs/FORMAT.md 5.1 and 5.3 (encfs/format/places.py).
FEATURE_BOUND_NAMES = "bound-names"
# All of an object's extended attributes in one sealed set (one backing xattr, or the
# xattr store when too large), also on symlinks and special files: docs/FORMAT.md 5.4.2.
FEATURE_XATTR_SETS = "xattr-sets"
# Each KEK version records the epoch of the volume key it wraps (`volume_key_epoch`,
# bound into the wrap): set by the first `reencrypt` that moves the volume to a new
# volume key (docs/FORMAT.md 2.1, 9.2). Never set at init: only a re-key needs it.
FEATURE_VK_EPOCHS = "volume-key-epochs"
# What a new volume gets, in this order.
DEFAULT_FEATURES = (
    FEATURE_BLOCK_GCM,
    FEATURE_SIV_NAMES,
    FEATURE_LONG_NAMES,
    FEATURE_LONG_SYMLINKS,
    FEATURE_AUTH_CONFIG,
    FEATURE_BOUND_NAMES,
    FEATURE_XATTR_SETS,
)
# What readers know: a new volume's features, and those only a later command sets.
KNOWN_FEATURES = frozenset(DEFAULT_FEATURES) | {FEATURE_VK_EPOCHS}
