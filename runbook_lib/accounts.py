"""Section 2: the RGW account the registry stores its data as.

The document's commands, each run only when needed (radosgw-admin on rgw_host):
user create, subuser create (Swift, full access), key create --gen-secret (Swift),
plus S3 keys for the registry's s3 driver.  Every command whose output holds a key
runs with no_log, and every key is registered for masking before anything prints.

Later sections re-read the secrets from RGW on demand: `swift_credentials(ctx)`
and `s3_credentials(ctx)`; they are never stored in a notebook or a parameter.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import re
from urllib.parse import quote, urlsplit

from . import masking
from .errors import CheckFailed, CommandFailed, RunbookError
from .host import cmd
from .rgw import endpoint, http
from .steps import fact, note, row, step

# radosgw-admin --access values -> what `user info` shows as the subuser's permissions.
PERMISSIONS = {"read": "read", "write": "write", "readwrite": "read-write", "full": "full-control"}
ENOENT_USER = 22  # `user info` for an unknown uid exits 22 (EINVAL)
CHECK_BUCKET = "runbook-check"


class AccountError(RunbookError):
    """The RGW account cannot be created or used."""


# -- pure helpers (unit-tested) -----------------------------------------------------

def parse_user_info(text: str) -> dict:
    """radosgw-admin's user JSON -> {uid, display_name, subusers{id: perm}, s3_keys[(user, access,
    secret)], swift_keys[(user, secret)]}.  Raises ValueError on anything else."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"radosgw-admin did not print JSON ({e.msg})") from None
    if not isinstance(d, dict) or "user_id" not in d:
        raise ValueError("radosgw-admin's JSON has no user_id")
    return {
        "uid": d["user_id"],
        "display_name": d.get("display_name", ""),
        "suspended": bool(d.get("suspended", 0)),
        "subusers": {s["id"]: s.get("permissions", "") for s in d.get("subusers", [])},
        "s3_keys": [(k.get("user", ""), k.get("access_key", ""), k.get("secret_key", ""))
                    for k in d.get("keys", [])],
        "swift_keys": [(k.get("user", ""), k.get("secret_key", "")) for k in d.get("swift_keys", [])],
    }


def register_secrets(info: dict) -> dict:
    """Register every key of a parsed user for masking; returns info.
    radosgw-admin's JSON writes / as \\/: that form is registered too."""
    values = [v for _, a, s in info["s3_keys"] for v in (a, s)] + [s for _, s in info["swift_keys"]]
    for v in filter(None, values):
        masking.register(v)
        if "/" in v:
            masking.register(v.replace("/", "\\/"))
    return info


def swift_key_of(info: dict, subuser: str) -> str | None:
    for user, secret in info["swift_keys"]:
        if user == subuser and secret:
            return secret
    return None


def s3_key_of(info: dict, uid: str) -> tuple[str, str] | None:
    for user, access, secret in info["s3_keys"]:
        if user == uid and access and secret:
            return access, secret
    return None


def sigv4_headers(method: str, url: str, access_key: str, secret_key: str, *, payload: bytes = b"",
                  region: str = "us-east-1", now: _dt.datetime | None = None, service: str = "s3") -> dict:
    """Headers (Host, x-amz-date, x-amz-content-sha256, Authorization) signing a request
    with AWS Signature V4, path-style.  Small on purpose: no boto3 just to prove the keys."""
    u = urlsplit(url)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    payload_hash = hashlib.sha256(payload).hexdigest()
    path = quote(u.path or "/", safe="/-_.~")
    pairs = []
    for part in filter(None, u.query.split("&")):
        k, _, v = part.partition("=")
        pairs.append((quote(k, safe="-_.~"), quote(v, safe="-_.~")))
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    headers = {"host": u.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, canonical_query,
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload_hash])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])

    def h(key, msg):
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = h(h(h(h(("AWS4" + secret_key).encode(), date), region), service), "aws4_request")
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"Host": u.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
                             f"Signature={sig}"}


# -- reading the account ------------------------------------------------------------

def _subuser(ctx) -> str:
    return ctx.params.get("swift_subuser") or f"{ctx.params['uid']}:swift"


def _seen(ctx) -> dict:
    """The users as this run of the section last saw them, by uid: a fresh read, or the user
    radosgw-admin printed after a change (user/subuser/key create and modify all print it).
    The steps decide from it instead of one `user info` each (~0.07 s of radosgw-admin CPU)."""
    return ctx.__dict__.setdefault("_accounts", {})


def user_info(ctx, uid: str | None = None) -> dict | None:
    """The parsed user (secrets registered), or None when RGW does not know it.  A read of
    RGW every time: runs in dry-run too; its output is never logged."""
    uid = uid or ctx.params["uid"]
    h = ctx.host(ctx.params["rgw_host"])
    r = h.run(cmd("radosgw-admin user info --uid={u}", u=uid), read=True, check=False, no_log=True)
    return _remember(ctx, uid, _info_of(h, r))


def _info_of(h, r) -> dict | None:
    """A `user info` result -> the parsed user (secrets registered), None for no such user."""
    if r.exit_code == ENOENT_USER:
        return None
    if r.exit_code != 0:
        raise CommandFailed(h.name, r.command, r.exit_code, "", r.stderr,
                            hint="radosgw-admin must work on rgw_host (section 1 deploys RGW there)")
    return register_secrets(parse_user_info(r.stdout))


def _remember(ctx, uid: str, info: dict | None) -> dict | None:
    _seen(ctx)[uid] = info
    return info


def known_user(ctx) -> dict | None:
    """The section's user as last seen in this run (read from RGW once if not yet seen).
    In dry-run nothing changes, so what was read stays true for every step."""
    uid = ctx.params["uid"]
    seen = _seen(ctx)
    return seen[uid] if uid in seen else user_info(ctx, uid)


def _admin(ctx, c, what: str):
    """A changing radosgw-admin command: its output holds keys (no_log), which are
    registered before anything is shown; returns the parsed user (None in dry-run)."""
    h = ctx.host(ctx.params["rgw_host"])
    uid = ctx.params["uid"]
    r = h.run(c, no_log=True, check=False)
    if r.skipped:
        return None
    if r.exit_code != 0:
        _seen(ctx).pop(uid, None)  # a failed change may have done part of it: read again
        # stderr of radosgw-admin carries no key; masked anyway.
        raise AccountError(f"{what} failed on {h.name} (exit {r.exit_code}): {masking.mask(r.stderr.strip())[-500:]}",
                           hint="see the message above; radosgw-admin runs on rgw_host")
    try:
        return _remember(ctx, uid, register_secrets(parse_user_info(r.stdout)))
    except ValueError:
        _seen(ctx).pop(uid, None)  # no user printed: the next step reads RGW again
        return None


_READ = object()  # credentials(ctx, info=_READ): read RGW (the default)


def swift_credentials(ctx, info=_READ) -> tuple[str, str]:
    """(swift user, swift key) of the account, re-read from RGW (masked), or from info
    (a user just read by the caller)."""
    subuser = _subuser(ctx)
    info = user_info(ctx) if info is _READ else info
    key = swift_key_of(info, subuser) if info else None
    if not key:
        raise AccountError(f"RGW has no Swift key for {subuser} on {ctx.params['rgw_host']}",
                           hint="run notebooks/02-accounts.ipynb first")
    return subuser, key


def s3_credentials(ctx, info=_READ) -> tuple[str, str]:
    """(access key, secret key) of the account's S3 key, re-read from RGW (masked), or from
    info (a user just read by the caller)."""
    uid = ctx.params["uid"]
    info = user_info(ctx) if info is _READ else info
    keys = s3_key_of(info, uid) if info else None
    if not keys:
        raise AccountError(f"RGW has no S3 key for user {uid} on {ctx.params['rgw_host']}",
                           hint="run notebooks/02-accounts.ipynb first (s3_keys=True)")
    return keys


# -- steps -----------------------------------------------------------------------------

def _validate(ctx):
    uid = ctx.params["uid"]
    sub = _subuser(ctx)
    if sub.partition(":")[0] != uid:
        raise AccountError(f"swift_subuser {sub!r} must belong to uid {uid!r} (e.g. {uid}:swift); nothing was changed",
                           hint="set swift_subuser=UID:NAME with the same UID")
    if ctx.params.get("access", "full") not in PERMISSIONS:
        raise AccountError(f"access {ctx.params.get('access')!r} is not one of {', '.join(PERMISSIONS)}")


@step("Preflight: radosgw-admin on {ctx.params[rgw_host]}")
def preflight(ctx):
    _validate(ctx)
    uid = ctx.params["uid"]
    h = ctx.host(ctx.params["rgw_host"])
    # The user itself, not `user list`: proves radosgw-admin works and is the first read the
    # steps decide from (exit 22: no such user yet, not an error).  Its output holds keys: no_log.
    r = h.run(cmd("timeout 60 radosgw-admin user info --uid={u}", u=uid), read=True, check=False, no_log=True)
    if r.exit_code not in (0, ENOENT_USER):
        raise AccountError(f"radosgw-admin does not work on {h.name} (exit {r.exit_code}): "
                           f"{masking.mask(r.stderr.strip())[-300:]}; nothing was changed",
                           hint="rgw_host needs the Ceph admin keyring and a deployed RGW (notebooks/01-rgw.ipynb)")
    try:
        info = _remember(ctx, uid, _info_of(h, r))
    except ValueError as e:
        raise AccountError(f"radosgw-admin user info --uid={uid} on {h.name}: {e}; nothing was changed",
                           hint="rgw_host needs the Ceph admin keyring and a deployed RGW (notebooks/01-rgw.ipynb)") from None
    fact("user", f"{uid} exists" if info else f"{uid} not yet")
    fact("endpoint", endpoint(ctx))
    return info is not None


@step("Create the RGW user {ctx.params[uid]}")
def create_user(ctx):
    uid, name = ctx.params["uid"], ctx.params.get("display_name", "ceph rgw demo user")
    info = known_user(ctx)
    if info is None:
        _admin(ctx, cmd("radosgw-admin user create --uid={u} --display-name={n}", u=uid, n=name), "user create")
        fact("user", f"{uid} created" if not ctx.dry_run else f"{uid} would be created")
    elif info["display_name"] != name:
        _admin(ctx, cmd("radosgw-admin user modify --uid={u} --display-name={n}", u=uid, n=name), "user modify")
        fact("user", f"{uid} exists; display name set to {name!r}")
    else:
        fact("user", f"{uid} exists ({name!r})")
    return uid


@step("Create the Swift subuser {ctx.params[swift_subuser]}")
def create_subuser(ctx):
    uid, sub, access = ctx.params["uid"], _subuser(ctx), ctx.params.get("access", "full")
    info = known_user(ctx)
    have = (info or {}).get("subusers", {}).get(sub)
    if have is None:
        _admin(ctx, cmd("radosgw-admin subuser create --uid {u} --subuser={s} --access={a} --key-type=swift",
                        u=uid, s=sub, a=access), "subuser create")
        fact("subuser", f"{sub} ({PERMISSIONS[access]}) " + ("created" if not ctx.dry_run else "would be created"))
    elif have != PERMISSIONS[access]:
        _admin(ctx, cmd("radosgw-admin subuser modify --uid {u} --subuser={s} --access={a}",
                        u=uid, s=sub, a=access), "subuser modify")
        fact("subuser", f"{sub}: access {have} -> {PERMISSIONS[access]}")
    else:
        fact("subuser", f"{sub} exists ({have})")
    return sub


@step("Create the Swift secret of {ctx.params[swift_subuser]}")
def create_swift_key(ctx):
    """`key create --gen-secret` replaces the key on every run: only when there is none,
    or when rotate_swift_key asks for a new one (whoever uses the old one then gets 401)."""
    sub = _subuser(ctx)
    info = known_user(ctx)
    has = bool(info and swift_key_of(info, sub))
    rotate = bool(ctx.params.get("rotate_swift_key", False))
    if has and not rotate:
        fact("swift key", "exists (****); not regenerated (rotate_swift_key=True makes a new one)")
        return sub
    _admin(ctx, cmd("radosgw-admin key create --subuser={s} --key-type=swift --gen-secret", s=sub), "key create")
    fact("swift key", ("rotated" if has else "generated") + (" (dry-run: not yet)" if ctx.dry_run else " (****)"))
    if has:
        note("the old Swift key no longer works: re-run the registry section so it uses the new one")
    return sub


@step("Create S3 keys for {ctx.params[uid]}")
def create_s3_keys(ctx):
    uid = ctx.params["uid"]
    if not ctx.params.get("s3_keys", True):
        note("s3_keys=False: not needed")
        return None
    info = known_user(ctx)
    if info and s3_key_of(info, uid):
        fact("s3 keys", "exist (****)")
        return uid
    _admin(ctx, cmd("radosgw-admin key create --uid {u} --key-type=s3 --gen-access-key --gen-secret", u=uid),
           "key create (s3)")
    fact("s3 keys", "generated (****)" if not ctx.dry_run else "would be generated")
    return uid


@step("The account {ctx.params[uid]}")
def show(ctx):
    """A table of the account, every key shown as ****."""
    info = known_user(ctx)
    if info is None:
        note("no such user yet (dry run)" if ctx.dry_run else "no such user")
        return None
    fact("uid", info["uid"])
    fact("display name", info["display_name"])
    fact("suspended", "yes" if info["suspended"] else "no")
    for sid, perm in info["subusers"].items():
        row(kind="subuser", user=sid, access=perm, key="")
    for user, _, _ in info["s3_keys"]:
        row(kind="s3 key", user=user, access="access key ****", key="****")
    for user, _ in info["swift_keys"]:
        row(kind="swift key", user=user, access="", key="****")
    return {k: info[k] for k in ("uid", "display_name", "subusers")}


def swift_auth(ctx, user: str, key: str) -> tuple[str, str]:
    """Swift auth v1: (storage URL, token); the token is registered for masking."""
    r = http("GET", endpoint(ctx) + "/auth/v1", headers={"X-Auth-User": user, "X-Auth-Key": key},
             what=f"GET {endpoint(ctx)}/auth/v1 (X-Auth-User: {user}, X-Auth-Key: ****)")
    token = r.headers.get("X-Auth-Token", "")
    if token:
        masking.register(token)
    if r.status_code not in (200, 204) or not token:
        raise CheckFailed(f"Swift auth v1 as {user} failed: HTTP {r.status_code}",
                          hint="the key may have been rotated: re-run create_swift_key, or check the subuser")
    return r.headers.get("X-Storage-Url", ""), token


def s3_request(ctx, method: str, path: str, access: str, secret: str, what: str = ""):
    url = endpoint(ctx) + path
    return http(method, url, headers=sigv4_headers(method, url, access, secret), what=what or f"{method} {url} (S3 v4)")


@step("Prove the account works on {ctx.params[rgw_host]}")
def _probe(ctx, info=_READ):
    """Verification reads RGW itself (never what the steps remembered): one `user info` gives
    both the Swift and the S3 keys (info: that read, when check() just made it)."""
    out = {}
    info = user_info(ctx) if info is _READ else info
    user, key = swift_credentials(ctx, info)
    storage_url, token = swift_auth(ctx, user, key)
    fact("swift auth v1", f"204, X-Storage-Url {storage_url}, X-Auth-Token ****")
    r = http("HEAD", storage_url, headers={"X-Auth-Token": token}, what=f"HEAD {storage_url} (X-Auth-Token: ****)")
    if r.status_code not in (200, 204):
        raise CheckFailed(f"the Swift token does not work: HEAD {storage_url} -> {r.status_code}")
    fact("swift account", f"HEAD -> {r.status_code}")
    out["swift"] = storage_url
    if ctx.params.get("s3_keys", True):
        access, secret = s3_credentials(ctx, info)
        b = f"/{CHECK_BUCKET}"
        r = s3_request(ctx, "PUT", b, access, secret)
        if r.status_code not in (200, 409) or (r.status_code == 409 and "BucketAlreadyOwnedByYou" not in r.text):
            raise CheckFailed(f"S3: creating bucket {CHECK_BUCKET} failed: HTTP {r.status_code} "
                              f"{_s3_code(r.text)}", hint="a 403 SignatureDoesNotMatch means wrong keys; "
                              "416 see notebooks/07-faq.ipynb (PGs per OSD)")
        r = s3_request(ctx, "GET", "/", access, secret)
        if r.status_code != 200 or f"<Name>{CHECK_BUCKET}</Name>" not in r.text:
            raise CheckFailed(f"S3: the bucket list does not show {CHECK_BUCKET}: HTTP {r.status_code} {_s3_code(r.text)}")
        r = s3_request(ctx, "DELETE", b, access, secret)
        if r.status_code not in (200, 204):
            raise CheckFailed(f"S3: deleting bucket {CHECK_BUCKET} failed: HTTP {r.status_code} {_s3_code(r.text)}")
        fact("s3", f"bucket {CHECK_BUCKET} created, listed, deleted")
        out["s3"] = True
    return out


def _s3_code(text: str) -> str:
    m = re.search(r"<Code>([^<]+)</Code>", text or "")
    return m.group(1) if m else ""


def check(ctx) -> None:
    """The section's outcome: the account authenticates over Swift (and S3).
    Prints the verdict (raises CheckFailed when it does not hold)."""
    uid, sub = ctx.params["uid"], _subuser(ctx)
    addr = f"{ctx.params['rgw_host']}:{ctx.params.get('rgw_port', 7480)}"
    info = _READ
    if ctx.dry_run:
        info = user_info(ctx)  # fresh: the verdict is about RGW, not about what the steps saw
        if info is None:
            ctx.verdict(True, f"nothing created (dry run); {uid} would authenticate on {addr}")
            return
    try:
        res = _probe(ctx, info).value
    except CheckFailed as e:
        ctx.verdict(False, e.what, hint=e.hint)
        return
    how = f"Swift ({sub})" + (" and S3" if res.get("s3") else "")
    facts = {"swift_auth_v1": f"204, X-Storage-Url {res['swift']}, X-Auth-Token ****"}
    if res.get("s3"):
        facts["s3"] = f"bucket {CHECK_BUCKET} created, listed, deleted (SigV4)"
    ctx.verdict(True, f"{uid} authenticates over {how} on {addr}", **facts)
