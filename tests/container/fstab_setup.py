"""What the /etc/fstab test needs before the container boots (run inside it by a
non-booting systemd-nspawn, after encfs-gw is installed): two volumes whose key files
exist only as encrypted systemd credentials (`systemd-creds encrypt --with-key=host`), a
file written into each, and their fstab lines: one mounted at boot, one on first access
(`noauto,x-systemd.automount`), both requiring the shipped `encfs-gw-keyfile@.service`
that decrypts the key file into /run at boot."""

from __future__ import annotations

VOLUMES = ("fa", "fb")
OPTIONS = {
    "fa": "nofail",
    "fb": "noauto,x-systemd.automount,nofail",
}
CONTENT = "written before the boot\n"


def fstab_line(name: str) -> str:
    return (f"/srv/{name}.backing /srv/{name} fuse.encfs-gw "
            f"keyfile=/run/encfs-gw-keys/{name}.key,"
            f"x-systemd.requires=encfs-gw-keyfile@{name}.service,{OPTIONS[name]} 0 0")


def _volume_script(name: str) -> str:
    cred = f"/etc/credstore.encrypted/encfs-gw-keyfile@{name}.key"
    return f"""
encfs-gw init /srv/{name}.backing --keyfile /root/fstab-keys/{name}.key >/dev/null
mkdir -p /srv/{name}
encfs-gw mount /srv/{name}.backing /srv/{name} --keyfile /root/fstab-keys/{name}.key
echo -n '{CONTENT}' > /srv/{name}/before-boot.txt
encfs-gw unmount /srv/{name}
systemd-creds encrypt --with-key=host --name=encfs-gw-keyfile@{name}.key \\
    /root/fstab-keys/{name}.key {cred}
echo '{fstab_line(name)}' >> /etc/fstab
"""


BEFORE_BOOT = (
    "install -d -m 0700 /root/fstab-keys /etc/credstore.encrypted\n"
    + "".join(_volume_script(name) for name in VOLUMES)
    + "rm -rf /root/fstab-keys\n"
)
