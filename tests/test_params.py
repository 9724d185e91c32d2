"""Parameter validation: every problem named, before any host is touched."""
import pytest

from runbook_lib import ParameterError, begin, params as P

ANN = {"rgw_host": str, "rgw_port": int, "registry_host": str, "registry_port": int, "uid": str, "dry_run": bool,
       "image_name": str, "method": str, "ssh_key": str}


def ns(**over):
    base = {"rgw_host": "198.18.0.2", "rgw_port": 7480, "registry_host": "198.18.0.3", "uid": "demo",
            "dry_run": False, "image_name": "prom/node-exporter:v0.16.0", "method": "packages", "ssh_key": ""}
    base.update(over)
    d = dict(base)
    d["__annotations__"] = dict(ANN)
    return d


def problems(**over):
    values, unknown = P.collect(ns(**over))
    return P.check(values, ANN, unknown, reach=False)


def test_good_parameters_have_no_problem():
    assert problems() == []


@pytest.mark.parametrize("over, named", [
    ({"rgw_port": "7480x"}, "rgw_port: expected int"),
    ({"rgw_port": 70000}, "rgw_port: 70000 is out of range"),
    ({"dry_run": "yes"}, "dry_run: expected bool"),
    ({"rgw_host": "no such host!"}, "rgw_host:"),
    ({"registry_host": "198.18.0.3,bad_host!"}, "registry_host:"),
    ({"uid": "bad uid!"}, "uid:"),
    ({"image_name": "Prom/Node Exporter"}, "image_name:"),
    ({"method": "ansible"}, "method: 'ansible' is not one of"),
    ({"ssh_key": "/nonexistent/key"}, "ssh_key: file"),
])
def test_each_bad_value_is_named(over, named):
    got = problems(**over)
    assert len(got) == 1 and got[0].startswith(named.split(":")[0]) and named in got[0], got


def test_unknown_parameter_is_an_error_naming_it():
    d = ns()
    d["bogus"] = 1  # what papermill's injected cell adds for -p bogus 1
    d["json"] = __import__("json")  # modules and callables in the namespace are not parameters
    with pytest.raises(ParameterError) as ei:
        begin("test", d, reach=False)
    assert "unknown parameter 'bogus'" in str(ei.value) and "json" not in str(ei.value).split("takes:")[0]


def test_all_problems_are_listed_at_once():
    with pytest.raises(ParameterError) as ei:
        begin("test", ns(rgw_port=0, uid="a b"), reach=False)
    assert len(ei.value.problems) == 2 and "nothing was changed" in str(ei.value)


@pytest.mark.lab
def test_unreachable_host_is_reported_not_hung(lab):
    # 198.18.0.250 is on the lab's bridge, and no lab host has it.  (Without the lab's
    # route, this machine's network answers TCP for any address: never test that way.)
    got = P.reachability({"rgw_host": "198.18.0.250"}, timeout=1)
    assert len(got) == 1 and got[0].startswith("rgw_host: cannot reach 198.18.0.250:22")


def test_registry_host_may_be_a_list():
    assert P.as_list("a, b") == ["a", "b"] and P.as_list(["a"]) == ["a"]


def test_a_failed_verdict_names_the_faq_with_the_same_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(tmp_path))
    ctx = begin("04-registry", ns(registry_port=8000), reach=False)
    with pytest.raises(Exception) as ei:
        ctx.verdict(False, "GET /v2/ answered 503")
    text = str(ei.value)
    assert "notebooks/07-faq.ipynb" in text and "-p rgw_host 198.18.0.2" in text and "-p registry_host 198.18.0.3" in text
    ctx = begin("03-certs", ns(), reach=False)
    with pytest.raises(Exception) as ei:
        ctx.verdict(False, "SANs miss an address")
    assert "07-faq" not in str(ei.value)  # not a failure the FAQ knows


def test_empty_swift_subuser_is_derived_from_uid_so_sections_agree_with_deploy():
    assert P.derive({"uid": "bench", "swift_subuser": ""})["swift_subuser"] == "bench:swift"
    assert P.derive({"uid": "bench", "swift_subuser": "bench:ro"})["swift_subuser"] == "bench:ro"
    assert "swift_subuser" not in P.derive({"uid": "bench"})  # only where the notebook declares it
    assert P.check({"swift_subuser": ""}, {"swift_subuser": "str"}, reach=False) == []
