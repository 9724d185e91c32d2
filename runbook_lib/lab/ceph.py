"""A single-node Ceph (pacific, cephx on) inside one lab host: mon `a`, mgr `x`, memstore osd.0.

bootstrap(): on a host with systemd, as an admin node would: keyrings owned by ceph, the stock
units `ceph-mon@a`, `ceph-mgr@x`, `ceph-osd@0` enabled and started (they come back after a
reboot), plus two ordering drop-ins that make a reboot fast (LAB.md).  start(): the same cluster
with every daemon run directly (a legacy host, no systemd).  Keys are made here (the cephx key
format) and the mgr key is put in the mon keyring at mkfs, so the only `ceph` CLI call before
the health wait is `ceph osd new`.
"""
from __future__ import annotations

import base64
import json
import os
import re
import struct
import time
import uuid

from .proc import LabError, wait_for


def gen_key() -> str:
    """A cephx secret, as `ceph-authtool --gen-print-key` prints it."""
    return base64.b64encode(struct.pack("<hiih", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


def ceph_conf(fsid: str, addr: str, network: str, overrides: dict | None = None) -> str:
    """[global]; overrides {"osd pool default pg num": 128} replace or add options (e.g. to
    reproduce the FAQ's 416 in a separate cluster)."""
    text = f"""\
[global]
fsid = {fsid}
mon host = [v2:{addr}:3300,v1:{addr}:6789]
public network = {network}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon allow pool size one = true
mon warn on pool no redundancy = false
# a lab host's root is an overlay on this machine's disk: its free space is not Ceph's to warn about
mon data avail warn = 5
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
osd fast shutdown = false
# memstore's default 1 GiB filled up in one bench session (RGW keeps deleted data for its own GC):
# a full OSD blocks every write, so pushes hang.  RAM is only used as data is written.
memstore device bytes = 4294967296
# RGW frees deleted objects' data after rgw_gc_obj_min_wait (default 2 h): minutes here
rgw gc obj min wait = 60
rgw gc processor period = 60
# speed-ups (LAB.md: 13-19 s -> 4-6 s to HEALTH_OK)
paxos propose interval = 0.1
mgr stats period = 1
mgr tick period = 1
osd mon report interval = 1
"""
    for key, value in (overrides or {}).items():
        line = f"{key} = {value}"
        pat = re.compile(rf"^{re.escape(key)} = .*$", re.M)
        text = pat.sub(line, text) if pat.search(text) else text + line + "\n"
    return text


def _keyring(entries: dict[str, tuple[str, dict[str, str]]]) -> str:
    out = []
    for name, (key, caps) in entries.items():
        out.append(f"[{name}]\n\tkey = {key}\n")
        for k, v in caps.items():
            out.append(f'\tcaps {k} = "{v}"\n')
    return "".join(out)


ADMIN_CAPS = {"mds": "allow *", "mgr": "allow *", "mon": "allow *", "osd": "allow *"}
MGR_CAPS = {"mds": "allow *", "mon": "allow profile mgr", "osd": "allow *"}


def _write_cluster_files(root, addr: str, network: str, conf_overrides: dict | None) -> dict:
    """ceph.conf, the admin keyring, the mon keyring (mgr key included: one CLI call less before
    the health wait) and the daemons' keyrings.  Returns {"fsid", "osd_uuid", "osd_key"}."""
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    admin_key, mon_key, mgr_key, osd_key = gen_key(), gen_key(), gen_key(), gen_key()
    for d in ("/var/lib/ceph/tmp", "/var/lib/ceph/mon/ceph-a", "/var/lib/ceph/mgr/ceph-x",
              "/var/lib/ceph/osd/ceph-0"):
        os.makedirs(root(d), exist_ok=True)
    _write(root, "/etc/ceph/ceph.conf", ceph_conf(fsid, addr, network, conf_overrides))
    _write(root, "/etc/ceph/ceph.client.admin.keyring", _keyring({"client.admin": (admin_key, ADMIN_CAPS)}), 0o600)
    _write(root, "/var/lib/ceph/tmp/mon.keyring", _keyring({
        "mon.": (mon_key, {"mon": "allow *"}),
        "client.admin": (admin_key, ADMIN_CAPS),
        "mgr.x": (mgr_key, MGR_CAPS),
    }), 0o600)
    _write(root, "/var/lib/ceph/mgr/ceph-x/keyring", _keyring({"mgr.x": (mgr_key, {})}), 0o600)
    _write(root, "/var/lib/ceph/osd/ceph-0/keyring", _keyring({"osd.0": (osd_key, {})}), 0o600)
    return {"fsid": fsid, "osd_uuid": osd_uuid, "osd_key": osd_key}


def _write(root, path: str, text: str, mode: int = 0o644):
    os.makedirs(os.path.dirname(root(path)), exist_ok=True)
    with open(root(path), "w") as f:
        f.write(text)
    os.chmod(root(path), mode)


def _monmap_argv(fsid: str, addr: str) -> list[str]:
    return ["monmaptool", "--create", "--enable-all-features", "--fsid", fsid,
            "--addv", "a", f"[v2:{addr}:3300,v1:{addr}:6789]", "/var/lib/ceph/tmp/monmap"]


def _new_osd(hx, k: dict):
    out = hx(["ceph", "--connect-timeout", "30", "osd", "new", k["osd_uuid"], "-i", "-"],
             input=json.dumps({"cephx_secret": k["osd_key"]})).stdout.strip()
    if out != "0":
        raise LabError(f"ceph osd new returned id {out!r}, expected 0 (stale cluster?)")


def start(hx, root, addr: str, network: str, log=print, conf_overrides: dict | None = None):
    """Create and start the cluster on a host WITHOUT systemd (a legacy host): the daemons
    daemonize themselves.  hx(argv, **kw) runs in the host; root(path) -> path seen from here.
    conf_overrides: ceph.conf options replacing the defaults (see ceph_conf)."""
    for d in ("/var/log/ceph", "/run/ceph"):  # no package scripts or tmpfiles.d made them here
        os.makedirs(root(d), exist_ok=True)
    k = _write_cluster_files(root, addr, network, conf_overrides)
    hx(_monmap_argv(k["fsid"], addr))
    hx(["ceph-mon", "--mkfs", "-i", "a", "--monmap", "/var/lib/ceph/tmp/monmap",
        "--keyring", "/var/lib/ceph/tmp/mon.keyring"])
    hx(["ceph-mon", "-i", "a"])
    log("  mon.a started")
    hx(["ceph-mgr", "-i", "x"])
    log("  mgr.x started")
    _new_osd(hx, k)
    hx(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", k["osd_uuid"]])
    hx(["ceph-osd", "-i", "0"])
    log("  osd.0 started")
    return k["fsid"]


# Without these, systemd stops mon, osd and rgw in the same millisecond at poweroff: the OSD
# cannot mark itself down and radosgw stalls ~10 s at the next start (LAB.md).
DROPINS = {
    "/etc/systemd/system/ceph-osd@.service.d/order.conf": "[Unit]\nAfter=ceph-mon.target\n",
    "/etc/systemd/system/ceph-radosgw@.service.d/order.conf": "[Unit]\nAfter=ceph-mon.target ceph-osd.target\n",
}


def bootstrap(hx, root, addr: str, network: str, log=print, conf_overrides: dict | None = None):
    """Create the cluster on a systemd host and enable + start its units, as an admin node would.
    hx(argv, **kw) runs as root in the host; root(path) -> that path seen from here."""
    for path, text in DROPINS.items():
        _write(root, path, text)
    hx(["systemctl", "daemon-reload"])
    k = _write_cluster_files(root, addr, network, conf_overrides)
    hx(["chown", "-R", "ceph:ceph", "/var/lib/ceph"])
    hx(_monmap_argv(k["fsid"], addr))
    hx(["chown", "ceph:ceph", "/var/lib/ceph/tmp/monmap"])
    hx(["ceph-mon", "--mkfs", "-i", "a", "--monmap", "/var/lib/ceph/tmp/monmap",
        "--keyring", "/var/lib/ceph/tmp/mon.keyring", "--setuser", "ceph", "--setgroup", "ceph"])
    hx(["systemctl", "enable", "ceph.target", "ceph-mon.target", "ceph-mgr.target", "ceph-osd.target"])
    hx(["systemctl", "enable", "--now", "ceph-mon@a"])
    log("  ceph-mon@a started")
    hx(["systemctl", "enable", "--now", "ceph-mgr@x"])   # its key is already in the mon's auth db
    log("  ceph-mgr@x started")
    _new_osd(hx, k)
    hx(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", k["osd_uuid"], "--setuser", "ceph", "--setgroup", "ceph"])
    hx(["chown", "-R", "ceph:ceph", "/var/lib/ceph/osd/ceph-0"])
    hx(["systemctl", "enable", "--now", "ceph-osd@0"])
    log("  ceph-osd@0 started")
    hx(["rm", "-f", "/var/lib/ceph/tmp/mon.keyring", "/var/lib/ceph/tmp/monmap"])
    return k["fsid"]


UNITS = ["ceph-mon@a", "ceph-mgr@x", "ceph-osd@0"]


def ready(hx) -> dict | None:
    """The cluster's status when it is HEALTH_OK with the osd up+in, a mgr and all PGs clean."""
    cp = hx(["ceph", "--connect-timeout", "5", "status", "--format", "json"], check=False, timeout=20)
    if cp.returncode != 0:
        return None
    s = json.loads(cp.stdout)
    osdmap = s.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)  # pre-pacific nesting
    pgmap = s.get("pgmap", {})
    states = pgmap.get("pgs_by_state", [])
    clean = sum(x["count"] for x in states if x["state_name"] == "active+clean")
    ok = (s.get("health", {}).get("status") == "HEALTH_OK"
          and osdmap.get("num_up_osds") == 1 and osdmap.get("num_in_osds") == 1
          and s.get("mgrmap", {}).get("available")
          and pgmap.get("num_pgs", 0) > 0 and clean == pgmap.get("num_pgs"))
    return s if ok else None


def wait_healthy(hx, timeout: float = 90.0):
    def detail():
        cp = hx(["ceph", "--connect-timeout", "5", "-s"], check=False, timeout=20)
        return "ceph -s:\n" + (cp.stdout or cp.stderr)
    return wait_for(lambda: ready(hx), timeout, "Ceph HEALTH_OK (osd up, mgr active, PGs active+clean)",
                    interval=0.3, detail=detail)
