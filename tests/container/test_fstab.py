"""/etc/fstab lines of type fuse.encfs-gw, made before the container booted
(fstab_setup.py): systemd-fstab-generator turns them into mount units, the one without
`noauto` is mounted at boot after the key-file service it requires, and the
`noauto,x-systemd.automount` one on first access."""

from __future__ import annotations

import pytest

from tests.container.fstab_setup import CONTENT
from tests.container.test_service import mounts_at
from tests.helpers.container import Container

pytestmark = pytest.mark.container


def monotonic(box: Container, unit: str, prop: str) -> int:
    return int(box.show(unit, prop)[prop])


def test_fstab_line_is_mounted_at_boot_after_its_key_service(container):
    box = container
    shown = box.show("srv-fa.mount", "ActiveState", "Result", "Requires", "After", "What",
                     "Type")
    assert shown["ActiveState"] == "active" and shown["Result"] == "success"
    assert shown["Type"] == "fuse.encfs-gw" and shown["What"] == "/srv/fa.backing"
    assert "encfs-gw-keyfile@fa.service" in shown["Requires"].split()
    assert "encfs-gw-keyfile@fa.service" in shown["After"].split()
    keys_done = monotonic(box, "encfs-gw-keyfile@fa.service", "ExecMainExitTimestampMonotonic")
    mounted = monotonic(box, "srv-fa.mount", "ActiveEnterTimestampMonotonic")
    assert 0 < keys_done <= mounted
    assert "srv-fa.mount" in box.show("local-fs.target", "Wants")["Wants"].split()
    assert mounts_at(box, "/srv/fa") == [
        ("tmpfs", "encfs-gw-guard:/srv/fa.backing"), ("fuse.encfs-gw", "/srv/fa.backing")]
    assert box.run("cat", "/srv/fa/before-boot.txt").stdout == CONTENT
    # The key file exists only on the tmpfs /run, from the encrypted credential.
    assert box.run("stat", "-c", "%a %U", "/run/encfs-gw-keys/fa.key").stdout == "600 root\n"


def test_noauto_line_mounts_on_demand_with_its_key_service_and_stops_cleanly(container):
    """What an access to the automount point does (below): start srv-fb.mount, which
    pulls in the key-file service it requires. Then a stop: systemd unmounts (and
    repeats the umount while anything is left on the path) and the daemon takes its
    guard away; the mount unit ends inactive with Result=success either way."""
    box = container
    assert box.show("srv-fb.mount", "ActiveState")["ActiveState"] == "inactive"
    assert box.show("encfs-gw-keyfile@fb.service", "ActiveState")["ActiveState"] == "inactive"
    box.run("systemctl", "start", "srv-fb.mount")
    assert box.show("encfs-gw-keyfile@fb.service", "ActiveState")["ActiveState"] == "active"
    assert box.show("srv-fb.mount", "ActiveState", "Result") == {
        "ActiveState": "active", "Result": "success"}
    assert box.run("cat", "/srv/fb/before-boot.txt").stdout == CONTENT
    box.sh("echo second > /srv/fb/after-boot.txt")
    for _ in range(2):
        box.run("systemctl", "stop", "srv-fb.mount")
        assert box.show("srv-fb.mount", "ActiveState", "Result") == {
            "ActiveState": "inactive", "Result": "success"}
        assert mounts_at(box, "/srv/fb") == []
        box.run("systemctl", "start", "srv-fb.mount")
        assert box.run("cat", "/srv/fb/after-boot.txt").stdout == "second\n"
    box.run("systemctl", "stop", "srv-fb.mount")


def kernel_has_autofs() -> bool:
    with open("/proc/filesystems") as filesystems:
        return any(line.split()[-1] == "autofs" for line in filesystems if line.strip())


@pytest.mark.skipif(not kernel_has_autofs(),
                    reason="this kernel has no autofs (CONFIG_AUTOFS_FS unset): "
                           "x-systemd.automount cannot work on it, in a container or not")
def test_automount_line_mounts_on_first_access(container):
    box = container
    assert box.show("srv-fb.automount", "ActiveState")["ActiveState"] == "active"
    assert box.show("srv-fb.mount", "ActiveState")["ActiveState"] == "inactive"
    assert box.run("cat", "/srv/fb/before-boot.txt").stdout == CONTENT  # the first access
    assert box.show("srv-fb.mount", "ActiveState")["ActiveState"] == "active"
    assert [fstype for fstype, _ in mounts_at(box, "/srv/fb")] == [
        "autofs", "tmpfs", "fuse.encfs-gw"]
    box.run("systemctl", "stop", "srv-fb.mount")
    assert [fstype for fstype, _ in mounts_at(box, "/srv/fb")] == ["autofs"]
