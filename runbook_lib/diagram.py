"""The topology as a picture: pure Python producing SVG text (no dependency, works
offline), shown inline in JupyterLab and in the nbconvert HTML of a run.

    from runbook_lib import diagram
    svg_text = diagram.svg(rgw_host="198.18.0.2", registry_host="198.18.0.3", storage="swift")
    diagram.Topology(**params)        # in a notebook: the picture; as text: a description
"""
from __future__ import annotations

from html import escape

from .params import as_list

# Colors per protocol (also the legend).
SSH, HTTPS, HTTP, RADOS = "#6e7781", "#0969da", "#1a7f37", "#8250df"
_FONT = "font-family:DejaVu Sans,Helvetica,Arial,sans-serif"

W = 960
COL_A, COL_B, COL_C = 20, 370, 710  # x of the three columns
BOX_W = 230
TOP = 150  # y where host boxes start


def _t(x, y, text, size=12, weight="normal", color="#24292f", anchor="start", halo=False):
    # halo: a white outline so a label stays readable where it crosses a line
    halo = ' paint-order="stroke" stroke="#ffffff" stroke-width="4" stroke-linejoin="round"' if halo else ""
    return (f'<text x="{x}" y="{y}" font-size="{size}" font-weight="{weight}" fill="{color}" '
            f'text-anchor="{anchor}" style="{_FONT}"{halo}>{escape(str(text))}</text>')


def _box(x, y, w, h, lines, fill="#f6f8fa", stroke="#57606a", dashed=False):
    """A rounded box; lines[0] is the bold title, the rest smaller."""
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    out = [f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" stroke="{stroke}" '
           f'stroke-width="1.5"{dash}/>']
    for i, line in enumerate(lines):
        if i == 0:
            out.append(_t(x + 10, y + 20, line, size=14, weight="bold"))
        else:
            out.append(_t(x + 10, y + 20 + 17 * i, line, size=12))
    return "\n".join(out)


def _arrow(points, color, label="", label_at=None, dashed=False, both=False, anchor="middle"):
    pts = " ".join(f"{x},{y}" for x, y in points)
    dash = ' stroke-dasharray="6,4"' if dashed else ""
    mid = color.lstrip("#")
    start = f' marker-start="url(#rbs{mid})"' if both else ""
    out = [f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}{start} '
           f'marker-end="url(#rbe{mid})"/>']
    if label:
        lx, ly = label_at or points[len(points) // 2]
        for i, part in enumerate(label.split("\n")):
            out.append(_t(lx, ly + 14 * i, part, size=11, weight="bold" if i == 0 else "normal", color=color,
                          anchor=anchor, halo=True))
    return "\n".join(out)


def _markers():
    out = ["<defs>"]
    for c in (SSH, HTTPS, HTTP, RADOS):
        m = c.lstrip("#")
        out.append(f'<marker id="rbe{m}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                   f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>')
        out.append(f'<marker id="rbs{m}" viewBox="0 0 10 10" refX="1" refY="5" markerWidth="7" markerHeight="7" '
                   f'orient="auto"><path d="M10,0 L0,5 L10,10 z" fill="{c}"/></marker>')
    out.append("</defs>")
    return "\n".join(out)


# -p runtime / -p client -> how the picture names them (docker: the document's own words)
RUNTIMES = {"docker": "registry:2", "podman": "registry:2 in podman", "systemd": "registry (systemd unit)"}
CLIENTS = {"docker": "docker / skopeo", "podman": "podman / skopeo", "skopeo": "skopeo"}


def _certs_dir(client: str) -> str:
    """Where the client trusts the CA (push.trust): docker's directory, or containers' (podman, skopeo)."""
    return "/etc/docker" if client == "docker" else "/etc/containers"


def svg(rgw_host="198.18.0.2", rgw_port=7480, registry_host="198.18.0.3", registry_port=8000,
        ssh_port=22, storage="swift", registry_user="foo", uid="demo", control="this machine",
        clients=None, title="Topology", runtime="docker", client="docker", **_ignored) -> str:
    """The topology for these parameters as one SVG document (text).

    registry_host may be several hosts ("a,b" or a list).  storage: swift | s3 | filesystem.
    Extra keyword arguments (a notebook's other parameters) are ignored."""
    regs = as_list(registry_host) or ["?"]
    clients = clients or CLIENTS.get(client, client)
    reg_h = 100
    reg_gap = 14
    reg_total = len(regs) * reg_h + (len(regs) - 1) * reg_gap
    rgw_h, ceph_h = 100, 86
    rgw_y = TOP
    ceph_y = rgw_y + rgw_h + 50
    body_h = max(reg_total, rgw_h + 50 + ceph_h, 240)
    legend_y = TOP + body_h + 34
    H = legend_y + 40
    uses_rgw = storage in ("swift", "s3")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{escape(title)}" class="runbook-topology">',
           f"<title>{escape(title)}</title>", _markers(),
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
           _t(W / 2, 24, title, size=16, weight="bold", anchor="middle")]

    # control node, top left; the SSH "bus" runs right from it and drops into every host.
    out.append(_box(COL_A, 40, BOX_W, 78, ["control node", f"{control}", "JupyterLab / papermill run",
                                           "runbook_lib: commands over SSH"],
                    fill="#fff8c5", stroke="#9a6700"))
    bus_y = 62
    reg_x_mid = COL_B + BOX_W // 2
    rgw_x_mid = COL_C + BOX_W // 2
    out.append(f'<polyline points="{COL_A + BOX_W},{bus_y} {rgw_x_mid},{bus_y}" fill="none" stroke="{SSH}" '
               f'stroke-width="2" stroke-dasharray="6,4"/>')
    out.append(_arrow([(reg_x_mid, bus_y), (reg_x_mid, TOP)], SSH, dashed=True))
    out.append(_arrow([(rgw_x_mid, bus_y), (rgw_x_mid, rgw_y)], SSH, dashed=True))
    out.append(_t(reg_x_mid + 6, bus_y + 40, f"SSH :{ssh_port}", size=11, weight="bold", color=SSH))
    out.append(_t(rgw_x_mid + 6, bus_y + 40, f"SSH :{ssh_port}", size=11, weight="bold", color=SSH))

    # registry host(s), middle column
    data_line = {"swift": f"data in RGW (swift, user {uid})", "s3": f"data in RGW (s3, user {uid})",
                 "filesystem": "data on its local disk"}.get(storage, f"storage: {storage}")
    reg_boxes = []
    for i, h in enumerate(regs):
        y = TOP + i * (reg_h + reg_gap)
        reg_boxes.append(y)
        out.append(_box(COL_B, y, BOX_W, reg_h, ["registry host", h, f"{RUNTIMES.get(runtime, runtime)}  :{registry_port}",
                                                 "TLS + htpasswd (bcrypt)", data_line],
                        fill="#ddf4ff", stroke=HTTPS))

    # RGW host with Ceph behind it, right column
    rgw_lines = ["RGW host", rgw_host, f"radosgw  :{rgw_port}", "Swift (/auth/v1) + S3 APIs", "deployed by 01-rgw"]
    if not uses_rgw:
        rgw_lines[3:] = ["not used by the registry", f"(storage={storage})"]
    out.append(_box(COL_C, rgw_y, BOX_W, rgw_h, rgw_lines,
                    fill="#dafbe1" if uses_rgw else "#f6f8fa", stroke=HTTP if uses_rgw else "#8c959f",
                    dashed=not uses_rgw))
    out.append(_box(COL_C, ceph_y, BOX_W, ceph_h, ["Ceph cluster", "mon (3300/6789) + OSDs",
                                                   "pools default.rgw.*", "admin keyring on the RGW host"],
                    fill="#fbefff", stroke=RADOS))
    out.append(_arrow([(rgw_x_mid, rgw_y + rgw_h), (rgw_x_mid, ceph_y)], RADOS, "RADOS",
                      label_at=(rgw_x_mid + 8, rgw_y + rgw_h + 29), anchor="start"))

    # registry -> RGW (its storage driver)
    for y in reg_boxes:
        if uses_rgw:
            proto = "Swift auth v1" if storage == "swift" else "S3 API"
            out.append(_arrow([(COL_B + BOX_W, y + 40), (COL_C, rgw_y + 40 + (y - TOP) // 4)], HTTP,
                              f"{proto}\nHTTP :{rgw_port}",
                              label_at=((COL_B + BOX_W + COL_C) / 2, y + 22)))

    # clients, bottom left -> registry
    cy = TOP + 120
    out.append(_box(COL_A, cy, BOX_W, 78, ["clients", clients, f"trust the CA in {_certs_dir(client)}/",
                                           "certs.d/HOST:PORT/ca.crt"], fill="#f6f8fa", stroke="#57606a"))
    for i, y in enumerate(reg_boxes):
        out.append(_arrow([(COL_A + BOX_W, cy + 40), (COL_B, y + 60)], HTTPS,
                          "" if i else f"HTTPS :{registry_port}\nlogin {registry_user},\npush, pull",
                          label_at=((COL_A + BOX_W + COL_B) / 2, cy + 62)))
    # the control node also talks to the registry API (06-operations) and runs docker/skopeo in the lab
    out.append(_t(COL_A + 10, cy + 96, "(in the lab: the control node is the client)", size=10, color="#6e7781"))

    # legend
    lx = COL_A
    for color, text, dashed in ((SSH, f"SSH :{ssh_port} (commands)", True),
                                (HTTPS, f"HTTPS :{registry_port} (registry API)", False),
                                (HTTP, f"HTTP :{rgw_port} (RGW {storage if uses_rgw else 'swift/s3'})", False),
                                (RADOS, "RADOS (Ceph)", False)):
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 34}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(_t(lx + 40, legend_y + 4, text, size=11, color=color))
        lx += 240
    out.append("</svg>")
    return "\n".join(out)


def describe(rgw_host="198.18.0.2", rgw_port=7480, registry_host="198.18.0.3", registry_port=8000,
             ssh_port=22, storage="swift", registry_user="foo", uid="demo", runtime="docker", client="docker",
             **_ignored) -> str:
    """The same topology as plain text (for terminals, papermill logs, screen readers)."""
    regs = ", ".join(as_list(registry_host))
    lines = [f"control node (this machine) --SSH :{ssh_port}--> registry host {regs}, RGW host {rgw_host}",
             f"clients ({CLIENTS.get(client, client)}; CA in {_certs_dir(client)}/certs.d) --HTTPS "
             f":{registry_port} (login {registry_user}, push, pull)--> registry {regs} "
             f"({RUNTIMES.get(runtime, runtime)})"]
    if storage in ("swift", "s3"):
        lines.append(f"registry --{'Swift auth v1' if storage == 'swift' else 'S3'} over HTTP :{rgw_port} "
                     f"(RGW user {uid})--> radosgw {rgw_host}:{rgw_port}")
    else:
        lines.append(f"registry stores its data on its local filesystem (storage={storage}); RGW not used by it")
    lines.append(f"radosgw {rgw_host} --RADOS--> Ceph cluster (mon, OSDs; pools default.rgw.*)")
    return "\n".join(lines)


class Topology:
    """Displays as the SVG picture in Jupyter, as text elsewhere."""

    def __init__(self, **params):
        self.params = params

    def _repr_svg_(self):
        return svg(**self.params)

    def __repr__(self):
        return describe(**self.params)

    __str__ = __repr__


def _main(argv=None):
    import argparse
    import sys

    import yaml
    ap = argparse.ArgumentParser(description="Write the topology picture (SVG) for a params file.")
    ap.add_argument("-f", "--params", default=None, help="params YAML (default: lab values)")
    ap.add_argument("-o", "--output", default="-", help="SVG file to write (- = stdout)")
    a = ap.parse_args(argv)
    p = yaml.safe_load(open(a.params)) if a.params else {}
    text = svg(**p)
    if a.output == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(a.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    _main()
