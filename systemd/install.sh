#!/bin/sh
# Install or remove encfs-gw, its systemd unit and its mount(8) helper.
#   sh systemd/install.sh install      (what `make install` runs, as root)
#   sh systemd/install.sh uninstall    (what `make uninstall` runs; keeps /etc/encfs-gw)
# Variables: PREFIX=/usr/local, UNITDIR=/etc/systemd/system, SBINDIR=/sbin (the only place
# mount(8) looks for mount.<type> helpers), CONFDIR=/etc/encfs-gw, PYTHON=python3, DESTDIR=
# (staging root). The package goes into its own venv, $PREFIX/lib/encfs-gw/venv, from PyPI
# and this checkout; a venv cannot be moved, so DESTDIR needs NO_PACKAGE=1 (the files
# below only, for packagers who install the Python package themselves). WHEELHOUSE=DIR
# installs it from wheels in DIR instead, with no network (made where there is one:
# `pip wheel . -w DIR`); tests/container installs it that way.
set -eu

PREFIX=${PREFIX:-/usr/local}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SBINDIR=${SBINDIR:-/sbin}
CONFDIR=${CONFDIR:-/etc/encfs-gw}
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
NO_PACKAGE=${NO_PACKAGE:-0}
WHEELHOUSE=${WHEELHOUSE:-}

SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=$PREFIX/lib/encfs-gw/venv
DOCDIR=$PREFIX/share/doc/encfs-gw
HELPER=mount.fuse.encfs-gw
DOCS="docs/systemd.md systemd/example.conf systemd/example-consumer.service systemd/network.conf"

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

install_all() {
    if [ "$NO_PACKAGE" != 1 ]; then
        if [ -n "$DESTDIR" ]; then
            echo "install.sh: DESTDIR needs NO_PACKAGE=1 (a venv cannot be relocated)" >&2
            exit 2
        fi
        "$PYTHON" -m venv "$VENV"
        if [ -n "$WHEELHOUSE" ]; then
            "$VENV/bin/pip" install --quiet --upgrade --no-index --find-links "$WHEELHOUSE" encfs
        else
            "$VENV/bin/pip" install --quiet --upgrade "$SRC"
        fi
        install -d -m 0755 "$PREFIX/bin"
        ln -sfn "$VENV/bin/encfs-gw" "$PREFIX/bin/encfs-gw"
    fi
    install -d -m 0755 "$DESTDIR$SBINDIR" "$DESTDIR$UNITDIR" "$DESTDIR$DOCDIR"
    # encfs-gw run under this name acts as the mount(8) helper.
    ln -sfn "$PREFIX/bin/encfs-gw" "$DESTDIR$SBINDIR/$HELPER"
    sed "s#/usr/local/bin/encfs-gw#$PREFIX/bin/encfs-gw#" "$SRC/systemd/encfs-gw@.service" \
        > "$DESTDIR$UNITDIR/encfs-gw@.service"
    chmod 0644 "$DESTDIR$UNITDIR/encfs-gw@.service"
    install -m 0644 "$SRC/systemd/encfs-gw-keyfile@.service" "$DESTDIR$UNITDIR/"
    install -d -m 0700 "$DESTDIR$CONFDIR"
    for doc in $DOCS; do
        install -m 0644 "$SRC/$doc" "$DESTDIR$DOCDIR/"
    done
    if systemd_running; then systemctl daemon-reload; fi
    echo "installed; next: $DOCDIR/systemd.md"
}

uninstall_all() {
    rm -f "$DESTDIR$UNITDIR/encfs-gw@.service" "$DESTDIR$UNITDIR/encfs-gw-keyfile@.service" \
        "$DESTDIR$SBINDIR/$HELPER"
    for doc in $DOCS; do
        rm -f "$DESTDIR$DOCDIR/$(basename "$doc")"
    done
    rmdir "$DESTDIR$DOCDIR" 2>/dev/null || true
    if [ "$NO_PACKAGE" != 1 ]; then
        rm -f "$PREFIX/bin/encfs-gw"
        rm -rf "$PREFIX/lib/encfs-gw"
    fi
    if systemd_running; then systemctl daemon-reload; fi
    echo "removed; $CONFDIR and /etc/credstore.encrypted are kept"
}

case "${1:-}" in
    install) install_all ;;
    uninstall) uninstall_all ;;
    *) echo "usage: install.sh install|uninstall" >&2; exit 2 ;;
esac
