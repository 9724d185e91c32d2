"""Section 2 (02-accounts): unit tests of JSON parsing and the SigV4 signer, then the
notebook on the real lab.  Leaves the demo account in place (later sections use it)."""
from __future__ import annotations

import datetime as dt
import json
import re
import secrets

import pytest

from runbook_lib import accounts, masking
from runbook_lib.host import cmd

from helpers import lab_host  # noqa: E402
from conftest import outputs_text

CEPH1 = "198.18.0.2"

# Shaped like the document's output, with keys made at run time (never commit or reuse secrets).
S3_SECRET = "unit/test+" + secrets.token_hex(15)
SWIFT_SECRET = "unitTestSwiftSecretKey" + secrets.token_hex(9)
USER_JSON = json.dumps({
    "user_id": "demo", "display_name": "ceph rgw demo user", "email": "", "suspended": 0, "max_buckets": 1000,
    "subusers": [{"id": "demo:swift", "permissions": "full-control"}],
    "keys": [{"user": "demo", "access_key": "AKUNITTESTACCESS0001", "secret_key": S3_SECRET}],
    "swift_keys": [{"user": "demo:swift", "secret_key": SWIFT_SECRET}],
    "caps": [], "op_mask": "read, write, delete",
}, indent=4)


# -- unit ------------------------------------------------------------------------------

def test_parse_user_info():
    info = accounts.parse_user_info(USER_JSON)
    assert info["uid"] == "demo" and info["display_name"] == "ceph rgw demo user"
    assert info["subusers"] == {"demo:swift": "full-control"}
    assert accounts.swift_key_of(info, "demo:swift") == SWIFT_SECRET
    assert accounts.swift_key_of(info, "demo:other") is None
    assert accounts.s3_key_of(info, "demo") == ("AKUNITTESTACCESS0001", S3_SECRET)
    assert accounts.s3_key_of(info, "other") is None


def test_parse_user_info_without_keys():
    info = accounts.parse_user_info('{"user_id": "x", "display_name": "X", "keys": [], "swift_keys": []}')
    assert info["s3_keys"] == [] and info["swift_keys"] == [] and info["subusers"] == {}


@pytest.mark.parametrize("text", ["", "could not fetch user info: no user info saved", "[]", '{"a": 1}'])
def test_parse_user_info_rejects_what_is_not_a_user(text):
    with pytest.raises(ValueError):
        accounts.parse_user_info(text)


def test_register_secrets_masks_every_key():
    info = accounts.register_secrets(accounts.parse_user_info(USER_JSON))
    out = masking.mask(USER_JSON)
    for _, a, s in info["s3_keys"]:
        assert a not in out and s not in out
    assert "unitTestSwiftSecretKey" not in out
    # the JSON-escaped form too (a / in a secret is \\/ in some JSON)
    assert masking.mask('{"k": "%s"}' % S3_SECRET.replace("/", "\\/")) == '{"k": "****"}'


def test_permissions_map_access_to_what_user_info_shows():
    assert accounts.PERMISSIONS["full"] == "full-control"
    assert accounts.PERMISSIONS["readwrite"] == "read-write"


# AWS's published SigV4 examples (S3 API reference, "Signature Calculations ... Authorization Header").
AWS_ACCESS, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("url,signature", [
    ("https://examplebucket.s3.amazonaws.com/?lifecycle",
     "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J",
     "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
])
def test_sigv4_matches_aws_examples(url, signature):
    h = accounts.sigv4_headers("GET", url, AWS_ACCESS, AWS_SECRET,
                               now=dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc))
    assert h["x-amz-date"] == "20130524T000000Z"
    assert h["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}")


class _FakeRGW:
    """A host whose radosgw-admin is a dict: records every command, answers like the real one
    (user info exits 22 for an unknown uid; each change prints the updated user)."""

    name = "fake-rgw"

    def __init__(self, dry_run=False):
        self.dry_run, self.user, self.ran = dry_run, None, []

    def _json(self):
        u = self.user
        return json.dumps({"user_id": u["uid"], "display_name": u["name"], "suspended": 0,
                           "subusers": [{"id": s, "permissions": "full-control"} for s in u["subs"]],
                           "keys": [{"user": u["uid"], "access_key": "AK" + "x" * 18, "secret_key": S3_SECRET}],
                           "swift_keys": [{"user": s, "secret_key": SWIFT_SECRET} for s in u["subs"]]})

    def run(self, c, read=False, check=True, no_log=False, **kw):
        from runbook_lib.journal import Result
        c = str(c)
        self.ran.append(c)
        if self.dry_run and not read:
            return Result(self.name, c, None, skipped=True)
        if "user info" in c:
            return Result(self.name, c, 0, self._json()) if self.user else Result(self.name, c, 22, "", "no user")
        if "subuser create" in c:
            self.user["subs"].append("demo:swift")
        elif "user create" in c:
            self.user = {"uid": "demo", "name": "ceph rgw demo user", "subs": []}
        return Result(self.name, c, 0, self._json())


class _FakeCtx:
    def __init__(self, h):
        self.h, self.dry_run = h, h.dry_run
        self.params = {"uid": "demo", "rgw_host": "fake", "rgw_port": 7480}

    def host(self, addr):
        return self.h


def _section_steps(ctx):
    accounts.preflight(ctx)
    for s in (accounts.create_user, accounts.create_subuser, accounts.create_swift_key, accounts.create_s3_keys,
              accounts.show):
        s(ctx)


def test_steps_decide_from_one_read_and_the_changes_output():
    h = _FakeRGW()
    _section_steps(_FakeCtx(h))
    assert [c.split(" --")[0] for c in h.ran] == [
        "timeout 60 radosgw-admin user info", "radosgw-admin user create", "radosgw-admin subuser create"]
    # a re-run: the preflight's read is all the steps need
    h.ran.clear()
    ctx = _FakeCtx(h)
    _section_steps(ctx)
    assert h.ran == ["timeout 60 radosgw-admin user info --uid=demo"]
    assert accounts.known_user(ctx)["subusers"] == {"demo:swift": "full-control"}


def test_dry_run_steps_see_the_real_state_not_the_plan():
    h = _FakeRGW(dry_run=True)
    ctx = _FakeCtx(h)
    _section_steps(ctx)
    assert [c.split(" --")[0] for c in h.ran] == [
        "timeout 60 radosgw-admin user info", "radosgw-admin user create", "radosgw-admin subuser create",
        "radosgw-admin key create", "radosgw-admin key create"]  # every key would be made: nothing exists
    assert h.user is None and accounts.known_user(ctx) is None


# -- lab ---------------------------------------------------------------------------------

def ssh_host(lab):
    return lab_host(CEPH1)


def rgw_secrets(lab, uid="demo") -> list[str]:
    """Every key RGW holds for the user, read the way an admin would (never printed)."""
    r = ssh_host(lab).run(cmd("radosgw-admin user info --uid={u}", u=uid), read=True, no_log=True)
    d = json.loads(r.stdout)
    out = [k["secret_key"] for k in d["keys"]] + [k["access_key"] for k in d["keys"]]
    return out + [k["secret_key"] for k in d["swift_keys"]]


def step_counts(nb) -> dict:
    m = re.search(r"steps: (\d+) ok, (\d+) changed, (\d+) would change, (\d+) failed", outputs_text(nb))
    assert m, "no step counts in the verdict output"
    return dict(zip(("ok", "changed", "would change", "failed"), map(int, m.groups())))


@pytest.fixture
def rgw_up(lab, run_notebook):
    """RGW deployed on ceph1 (01-rgw, idempotent: a no-op when it already runs)."""
    import requests
    s = requests.Session()
    s.trust_env = False
    try:
        if s.get("http://198.18.0.2:7480/", timeout=3).status_code == 200:
            return
    except requests.RequestException:
        pass
    run_notebook("01-rgw")


@pytest.mark.lab
def test_account_authenticates_and_rerun_changes_nothing(lab, rgw_up, run_notebook):
    nb, path, _ = run_notebook("02-accounts")
    text = outputs_text(nb)
    assert "VERDICT 02-accounts: PASS — demo authenticates over Swift (demo:swift) and S3 on 198.18.0.2:7480" in text
    assert "swift_auth_v1: 204, X-Storage-Url http://198.18.0.2:7480/swift/v1, X-Auth-Token ****" in text
    assert "bucket runbook-check created, listed, deleted" in text

    nb2, path2, _ = run_notebook("02-accounts")
    c = step_counts(nb2)
    assert c["changed"] == 0 and c["would change"] == 0 and c["failed"] == 0
    assert "VERDICT 02-accounts: PASS" in outputs_text(nb2)

    secrets = rgw_secrets(lab)
    assert len(secrets) == 3
    for p in (path, path2):
        raw = p.read_text()
        leaked = [s[:4] + "…" for s in secrets if s in raw or json.dumps(s)[1:-1] in raw]
        assert not leaked, f"{p.name} holds secrets: {leaked}"
    assert "****" in outputs_text(nb2)


@pytest.mark.lab
def test_rotate_in_dry_run_shows_the_command_and_keeps_the_key(lab, rgw_up, run_notebook):
    run_notebook("02-accounts")
    before = rgw_secrets(lab)
    nb, path, _ = run_notebook("02-accounts", dry_run=True, rotate_swift_key=True)
    text = outputs_text(nb)
    assert "radosgw-admin key create --subuser=demo:swift --key-type=swift --gen-secret" in text
    assert "would run" in text and "VERDICT 02-accounts: DRY-RUN" in text
    assert rgw_secrets(lab) == before
    assert not [s for s in before if s in path.read_text()]


@pytest.mark.lab
def test_credentials_for_later_sections(lab, rgw_up, run_notebook):
    """What the registry section calls: the secrets re-read from RGW, registered for masking."""
    from runbook_lib.context import Context
    from runbook_lib import rgw

    run_notebook("02-accounts")
    params = dict(rgw_host=CEPH1, rgw_port=7480, uid="demo", ssh_key=str(lab.SSH_KEY),
                  known_hosts=str(lab.KNOWN_HOSTS), ssh_user=lab.SSH_USER, become=True, ssh_port=22)
    ctx = Context("test", params)
    try:
        user, key = accounts.swift_credentials(ctx)
        access, secret = accounts.s3_credentials(ctx)
        assert user == "demo:swift"
        assert sorted([key, access, secret]) == sorted(rgw_secrets(lab))
        for v in (key, access, secret):
            assert masking.mask(f"x {v} y") == "x **** y"
        assert rgw.endpoint(ctx) == "http://198.18.0.2:7480"
        url, token = accounts.swift_auth(ctx, user, key)
        assert url == "http://198.18.0.2:7480/swift/v1" and masking.mask(token) == "****"
    finally:
        ctx.close()


@pytest.mark.lab
def test_invalid_uid_is_a_parameter_error_before_any_change(lab, run_notebook):
    h = ssh_host(lab)
    before = h.run(cmd("radosgw-admin user list"), read=True).stdout
    nb, _, err = run_notebook("02-accounts", expect_error=True, uid="bad uid!")
    text = outputs_text(nb)
    assert "ParameterError" in text and "uid: 'bad uid!' is not a valid RGW user id" in text
    assert "nothing was changed" in text
    assert h.run(cmd("radosgw-admin user list"), read=True).stdout == before


@pytest.mark.lab
def test_subuser_of_another_uid_is_refused_before_any_change(lab, rgw_up, run_notebook):
    h = ssh_host(lab)
    before = h.run(cmd("radosgw-admin user list"), read=True).stdout
    nb, _, err = run_notebook("02-accounts", expect_error=True, uid="other", swift_subuser="demo:swift")
    assert "swift_subuser 'demo:swift' must belong to uid 'other'" in outputs_text(nb)
    assert h.run(cmd("radosgw-admin user list"), read=True).stdout == before


@pytest.mark.lab
def test_unreachable_host_is_a_parameter_error(lab, run_notebook):
    nb, _, err = run_notebook("02-accounts", expect_error=True, rgw_host="198.18.0.250")
    assert "rgw_host: cannot reach 198.18.0.250:22" in outputs_text(nb)
