"""Unit tests (no lab) for issue 17: the haproxy config renderer, its stats parser, the read-only
block GC uses, the registry config options a load balancer brings, and the parameters."""
from __future__ import annotations

from runbook_lib import lb, operations, params as P, push, registry


def test_render_haproxy_pass_through_health_checked():
    text = lb.render_haproxy(["198.18.0.141", "198.18.0.142"], 8000, bind="198.18.0.140")
    assert "mode tcp" in text and "bind 198.18.0.140:8000" in text
    assert "option httpchk GET /v2/" in text and "http-check expect status 401" in text
    assert "check check-ssl verify required ca-file /etc/haproxy/runbook-registry-ca.pem" in text
    assert "retries 3" in text and "option redispatch" in text
    assert "server reg_198_18_0_141 198.18.0.141:8000" in text
    assert "server reg_198_18_0_142 198.18.0.142:8000" in text
    assert f"stats socket {lb.ADMIN_SOCK}" in text
    assert "ssl crt" not in text  # pass-through: no key on the LB
    # pure and stable: the same input renders the same bytes (idempotent writes)
    assert text == lb.render_haproxy(["198.18.0.141", "198.18.0.142"], 8000, bind="198.18.0.140")


def test_render_haproxy_ipv6_and_empty():
    text = lb.render_haproxy(["fd00::2"], 8443, bind="fd00::1")
    assert "bind [fd00::1]:8443" in text and "[fd00::2]:8443" in text
    import pytest
    with pytest.raises(ValueError):
        lb.render_haproxy([], 8000)


def test_parse_stat():
    csv = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,status\n"
           "registry_tls,FRONTEND,,,3,5,,9,OPEN\n"
           "registry,reg_198_18_0_141,0,0,2,3,,7,UP\n"
           "registry,reg_198_18_0_142,0,0,0,1,,2,MAINT\n"
           "registry,BACKEND,0,0,2,3,,9,UP\n")
    st = lb.parse_stat(csv)
    assert st == {"reg_198_18_0_141": {"status": "UP", "scur": 2}, "reg_198_18_0_142": {"status": "MAINT", "scur": 0}}


def test_readonly_block_is_registrys_own():
    ro = operations.readonly_block()
    assert ro == {"readonly": {"enabled": True}, "uploadpurging": {"enabled": False}}
    assert operations.GC_MODES == ("readonly", "stop")


def test_render_config_draintimeout_and_redirect():
    base = dict(port=8000, http_secret="s" * 16, rgw_url="http://r:7480", s3_access="a", s3_secret="b" * 16)
    cfg = registry.render_config("s3", **base)
    assert "draintimeout" not in cfg["http"] and cfg["storage"]["redirect"] == {"disable": True}  # as before
    cfg = registry.render_config("s3", **base, draintimeout="5s", s3_redirect=True)
    assert cfg["http"]["draintimeout"] == "5s" and "redirect" not in cfg["storage"]
    assert registry.validate_config(cfg) == []


def test_lb_host_optional_and_gc_mode_choices():
    ann = {"lb_host": str, "gc_mode": str}
    assert P.check({"lb_host": "", "gc_mode": "readonly"}, ann, reach=False) == []
    assert P.check({"lb_host": "198.18.0.140", "gc_mode": "stop"}, ann, reach=False) == []
    bad = P.check({"lb_host": "not a host!", "gc_mode": "pause"}, ann, reach=False)
    assert any(p.startswith("lb_host:") for p in bad) and any(p.startswith("gc_mode:") for p in bad)


def test_push_explains_readonly_405():
    why = push.explain("unsupported: The operation is unsupported.", "198.18.0.140:8000", "docker")
    assert why[0] == "readonly" and "read-only for GC" in why[1]
    why = push.explain("received unexpected HTTP status: 405 Method Not Allowed", "h:8000", "skopeo")
    assert why[0] == "readonly"


def test_client_address_prefers_lb():
    from runbook_lib import certs
    from runbook_lib.context import Context
    c = Context("t", {"registry_host": "198.18.0.141,198.18.0.142", "registry_port": 8000, "lb_host": "198.18.0.140"})
    assert push.target(c) == "198.18.0.140:8000"
    assert certs.client_addresses(c) == ["198.18.0.141", "198.18.0.142", "198.18.0.140"]
    c = Context("t", {"registry_host": "198.18.0.3", "registry_port": 8000, "lb_host": ""})
    assert push.target(c) == "198.18.0.3:8000" and certs.client_addresses(c) == ["198.18.0.3"]
