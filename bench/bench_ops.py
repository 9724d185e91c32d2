"""Operations at scale: runbook_lib.operations.RegistryClient (keep-alive, concurrent) vs a curl
process per request (the document's way), on a filesystem-storage registry on the bench host
(creating 2000 repositories through RGW would take minutes; the API work is the same).

  * resolve 1000 tags (HEAD manifest -> Docker-Content-Digest), then delete them: 1000 tags made by
    PUTting one small image's manifest under 1000 tag names.  They share ONE digest, and a DELETE by
    digest removes every tag on it, so each delete round uses 1000 distinct manifests (the same layer,
    a config blob per tag) to have 1000 real DELETE requests.
  * list a 2000-repository catalog (one tiny image mounted into each repository).

    .venv/bin/python bench/bench_ops.py [--tags 1000] [--repos 2000]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import _common as C
import _registry as R
from runbook_lib.operations import ACCEPT, RegistryClient, pmap

TARGET = 10.0


def curl_conf(reg) -> str:
    """-K file: credentials off the command line (as a careful operator would)."""
    f = tempfile.NamedTemporaryFile("w", delete=False, prefix="bench-curl-", suffix=".conf")
    f.write(f'user = "{reg.user}:{reg.password}"\ncacert = "{reg.ca}"\nsilent\n')
    f.close()
    os.chmod(f.name, 0o600)
    return f.name


def curl(conf: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-K", conf, *args], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})


def make_tags(reg, repo: str, n: int, distinct: bool) -> dict:
    """n tags in repo; distinct=True: one manifest per tag (own config blob), else one shared manifest."""
    s = reg.session()
    man, mt = R.tiny_image(s, reg.url, repo)
    if not distinct:
        pmap(lambda i: R.put_manifest(s, reg.url, repo, f"t{i}", man, mt), range(n), workers=16)
        return {}

    def one(i):
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                          "config": {"Labels": {"n": str(i)}}}).encode()
        d = R.blob_upload(s, reg.url, repo, cfg)
        m = json.loads(man)
        m["config"].update(digest=d, size=len(cfg))
        return R.put_manifest(s, reg.url, repo, f"t{i}", json.dumps(m).encode(), mt)
    return dict(zip((f"t{i}" for i in range(n)), pmap(one, range(n), workers=16)))


def make_repos(reg, n: int) -> None:
    s = reg.session()
    man, mt = R.tiny_image(s, reg.url, "r/src")
    m = json.loads(man)
    blobs = [m["config"]["digest"], m["layers"][0]["digest"]]

    def one(i):
        repo = f"r/repo{i:05d}"
        for b in blobs:
            R.mount_blob(s, reg.url, repo, b, "r/src")
        R.put_manifest(s, reg.url, repo, "v1", man, mt)
    pmap(one, range(n), workers=16)


def main(n_tags: int = 1000, n_repos: int = 2000, keep_host: bool = False) -> dict:
    C.ensure_host()
    work = tempfile.mkdtemp(prefix="bench-ops-")
    res = {}
    try:
        reg = R.start(C.ADDR, work, storage="filesystem")
        conf = curl_conf(reg)
        cli = RegistryClient(reg.url, reg.ca, reg.user, reg.password, pool_size=16)
        base = reg.url
        t0 = time.monotonic()
        make_tags(reg, "ops/tags", n_tags, distinct=False)
        print(f"made {n_tags} tags in {time.monotonic() - t0:.1f} s", flush=True)
        tags = [f"t{i}" for i in range(n_tags)]

        # resolve: interleave the two ways (client first, then curl) on the same tags
        cpu0 = C.cpu_seconds("registry")
        t_cli, got = C.timed(lambda: pmap(lambda t: cli.resolve("ops/tags", t), tags, workers=16))
        res["server_ms"] = (C.cpu_seconds("registry") - cpu0) / n_tags * 1000  # the registry's CPU per request
        assert len(set(got)) == 1 and got[0], got[:3]

        def curl_resolve():
            out = []
            for t in tags:
                r = curl(conf, "-I", "-H", f"Accept: {ACCEPT}", f"{base}/v2/ops/tags/manifests/{t}")
                out.append(next(l.split(":", 1)[1].strip() for l in r.stdout.splitlines()
                                if l.lower().startswith("docker-content-digest")))
            return out
        t_curl, got2 = C.timed(curl_resolve)
        assert got2 == got
        res["resolve"] = (t_cli, t_curl)
        print(f"resolve {n_tags}: client {t_cli:.2f} s, curl {t_curl:.2f} s", flush=True)

        # delete: 1000 distinct manifests per way (a DELETE by digest drops every tag on it)
        digests = make_tags(reg, "ops/del-a", n_tags, distinct=True)
        t_cli_d, _ = C.timed(lambda: pmap(lambda d: cli.delete_manifest("ops/del-a", d), list(digests.values()),
                                          workers=16))
        digests_b = make_tags(reg, "ops/del-b", n_tags, distinct=True)

        def curl_delete():
            for d in digests_b.values():
                r = curl(conf, "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                         f"{base}/v2/ops/del-b/manifests/{d}")
                assert r.stdout == "202", r.stdout
        t_curl_d, _ = C.timed(curl_delete)
        assert not cli.tags("ops/del-a") and not cli.tags("ops/del-b")
        res["delete"] = (t_cli_d, t_curl_d)
        print(f"delete {n_tags}: client {t_cli_d:.2f} s, curl {t_curl_d:.2f} s", flush=True)

        t0 = time.monotonic()
        make_repos(reg, n_repos)
        print(f"made {n_repos} repos in {time.monotonic() - t0:.1f} s", flush=True)
        t_cli_c, (names, pages) = C.timed(lambda: cli.catalog(1000))
        assert len([n for n in names if n.startswith("r/repo")]) == n_repos

        def curl_catalog():
            # the document's curl .../v2/_catalog, following Link pages by hand (n=100, the registry's default)
            out, url = [], f"{base}/v2/_catalog?n=100"
            hfile = conf + ".headers"
            while url:
                r = curl(conf, "-D", hfile, url)
                out += json.loads(r.stdout)["repositories"]
                head = open(hfile).read()
                link = [l for l in head.splitlines() if l.lower().startswith("link:")]
                url = base + link[0].split("<", 1)[1].split(">", 1)[0] if link else None
            return out
        t_curl_c, names2 = C.timed(curl_catalog)
        assert sorted(names2) == sorted(names)

        def curl_catalog_tags():
            for n in names2:
                curl(conf, f"{base}/v2/{n}/tags/list")
        # catalog + the tags of every repository (what the catalog step shows)
        t_cli_ct, _ = C.timed(lambda: pmap(lambda n: cli.tags(n, listed=True), names, workers=16))
        t_curl_ct, _ = C.timed(curl_catalog_tags)
        res["catalog"] = (t_cli_c, t_curl_c)
        res["catalog+tags"] = (t_cli_c + t_cli_ct, t_curl_c + t_curl_ct)
        print(f"catalog {len(names)}: client {t_cli_c:.2f} s ({pages} pages of 1000), curl {t_curl_c:.2f} s; "
              f"+tags: client {t_cli_ct:.2f} s, curl {t_curl_ct:.2f} s", flush=True)
        cli.close()
        os.unlink(conf)
    finally:
        R.stop(C.ADDR)
        if not keep_host:
            C.remove_host()
    rows = ["Filesystem-storage registry (registry:2, TLS, htpasswd cost 5) on the bench host; "
            "client: `RegistryClient` (one keep-alive session, 16 threads) vs `curl -K conf` per request "
            "(sequential, as the document's commands).", "",
            "| operation | RegistryClient | curl per request | speed-up |", "|---|---|---|---|"]
    label = {"resolve": f"resolve {n_tags} tags (HEAD manifest)", "delete": f"delete {n_tags} manifests (DELETE by digest)",
             "catalog": f"list a {n_repos}-repository catalog (client n=1000, curl n=100 + Link)",
             "catalog+tags": f"catalog + tags/list of each of the {n_repos} repositories"}
    server_ms = res.pop("server_ms")
    for k, (a, b) in res.items():
        sp = b / a
        rows.append(f"| {label[k]} | {a:.2f} s | {b:.2f} s | **{sp:.1f}×** "
                    f"({'≥' if sp >= TARGET else '<'} {TARGET:.0f}× target) |")
    t_curl_req = res["resolve"][1] / n_tags * 1000
    ncpu = os.cpu_count() or 1
    rows += ["", f"The bound: the registry itself spends {server_ms:.1f} ms of CPU per authenticated request (it checks "
             f"the bcrypt hash on every request), so {ncpu} core(s) serve at most one request per "
             f"{server_ms / ncpu:.2f} ms whatever the client does; a curl request takes {t_curl_req:.1f} ms, so no "
             f"client can be more than {t_curl_req / (server_ms / ncpu):.1f}× faster here.  "
             "Higher ratios need more cores or token auth (a JWT check instead of bcrypt)."]
    C.append_results("Operations: RegistryClient vs curl per request", "\n".join(rows))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tags", type=int, default=1000)
    ap.add_argument("--repos", type=int, default=2000)
    ap.add_argument("--keep-host", action="store_true")
    a = ap.parse_args()
    main(a.tags, a.repos, a.keep_host)
