"""Section 3 (certificates): unit tests of the SAN / chain logic, and the notebook on the lab."""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import pathlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from runbook_lib import certs

from conftest import outputs_text

from conftest import TEST_REGISTRY as REGISTRY  # noqa: E402


# ------------------------------------------------------------------ unit
def test_parse_sans_dedups_and_refuses_junk():
    assert certs.parse_sans(" a.example, 10.0.0.1,a.example ,") == ["a.example", "10.0.0.1"]
    with pytest.raises(ValueError):
        certs.parse_sans("ok, bad name")
    with pytest.raises(ValueError):
        certs.parse_sans("local")


def test_default_sans_order_and_127():
    assert certs.default_sans(["10.0.0.3"], ["reg1"], ["extra.example"]) == \
        ["10.0.0.3", "reg1", "127.0.0.1", "extra.example"]
    assert certs.default_sans(["127.0.0.1"]) == ["127.0.0.1"]


def test_issue_has_the_documents_properties():
    ca, ca_key = certs.make_ca()
    cert, key = certs.issue(ca, ca_key, certs.subject_of(), ["10.0.0.3", "reg1", "127.0.0.1"], 825)
    assert certs.signed_by(cert, ca) and certs.key_matches(cert, key)
    assert cert.subject.rfc4514_string() == certs.DEFAULT_SUBJECT
    assert key.key_size == 2048
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.3") in sans.get_values_for_type(x509.IPAddress)
    assert "reg1" in sans.get_values_for_type(x509.DNSName)
    assert (cert.not_valid_after_utc - certs.now()).days in (824, 825)


def test_missing_sans_compares_ips_and_names():
    ca, ca_key = certs.make_ca()
    cert, _ = certs.issue(ca, ca_key, certs.subject_of(), ["10.0.0.3", "Reg1.Example"], 30)
    assert certs.missing_sans(cert, ["10.0.0.3", "reg1.example"]) == []
    assert certs.missing_sans(cert, ["10.0.0.4", "10.0.0.3"]) == ["10.0.0.4"]


def test_reissue_reasons():
    ca, ca_key = certs.make_ca()
    other, other_key = certs.make_ca()
    subj = certs.subject_of()
    cert, key = certs.issue(ca, ca_key, subj, ["10.0.0.3", "127.0.0.1"], 825)
    assert certs.reissue_reasons(cert, key, ca, ["10.0.0.3", "127.0.0.1"], subj, 30) == []
    assert any("SANs differ" in r for r in certs.reissue_reasons(cert, key, ca, ["10.0.0.4", "127.0.0.1"], subj, 30))
    assert any("another CA" in r for r in certs.reissue_reasons(cert, key, other, ["10.0.0.3", "127.0.0.1"], subj, 30))
    assert any("expires" in r for r in certs.reissue_reasons(cert, key, ca, ["10.0.0.3", "127.0.0.1"], subj, 900))
    assert any("subject" in r for r in certs.reissue_reasons(cert, key, ca, ["10.0.0.3", "127.0.0.1"],
                                                             certs.subject_of("other"), 30))
    _, key2 = certs.issue(ca, ca_key, subj, ["10.0.0.3"], 1)
    assert any("key does not match" in r for r in certs.reissue_reasons(cert, key2, ca, ["10.0.0.3", "127.0.0.1"], subj, 30))
    assert certs.reissue_reasons(None, None, ca, [], subj, 30) == ["no certificate yet"]


def test_not_after_never_beyond_the_ca():
    ca, ca_key = certs.make_ca(days=10)
    cert, _ = certs.issue(ca, ca_key, certs.subject_of(), ["10.0.0.3"], 825)
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


def test_summary_has_no_key_material():
    ca, ca_key = certs.make_ca()
    cert, key = certs.issue(ca, ca_key, certs.subject_of(), ["10.0.0.3"], 30)
    s = str(certs.summary(cert, "registry"))
    assert "PRIVATE" not in s and "SHA256:" in s and "10.0.0.3" in s


# ------------------------------------------------------------------ helpers for the lab tests
def write_pair(d: pathlib.Path, name: str, cert, key) -> tuple[str, str]:
    c, k = d / f"{name}.pem", d / f"{name}-key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(certs.key_pem(key))
    os.chmod(k, 0o600)
    return str(c), str(k)


def digest(path) -> str | None:
    p = pathlib.Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def secret_lines(pem_path) -> list[str]:
    """The base64 body lines of a private key (none may appear in a notebook)."""
    lines = pathlib.Path(pem_path).read_text().splitlines()
    return [l for l in lines if l and not l.startswith("-----")]


# ------------------------------------------------------------------ lab
@pytest.mark.lab
def test_notebook_issues_then_keeps(lab, nb_run, state_dir):
    nb, out, _ = nb_run("03-certs")
    text = outputs_text(nb)
    assert "VERDICT 03-certs: PASS" in text
    cert = x509.load_pem_x509_certificate((state_dir / "certs" / "registry.pem").read_bytes())
    assert certs.missing_sans(cert, [REGISTRY, "127.0.0.1"]) == []
    assert oct(os.stat(state_dir / "certs" / "registry-key.pem").st_mode & 0o777) == "0o600"
    assert oct(os.stat(state_dir / "ca" / "ca-key.pem").st_mode & 0o777) == "0o600"
    before = digest(state_dir / "certs" / "registry.pem")
    nb2, out2, _ = nb_run("03-certs")
    t2 = outputs_text(nb2)
    assert "0 changed, 0 would change" in t2, t2[-800:]
    assert digest(state_dir / "certs" / "registry.pem") == before
    raw = out.read_text() + out2.read_text()
    for line in secret_lines(state_dir / "certs" / "registry-key.pem") + secret_lines(state_dir / "ca" / "ca-key.pem"):
        assert line not in raw
    # a new SAN re-issues (with the same CA), and only the server certificate changes
    ca_before = digest(state_dir / "ca" / "ca.pem")
    nb3, _, _ = nb_run("03-certs", cert_sans="registry.lab.example")
    assert "SANs differ" in outputs_text(nb3)
    cert = x509.load_pem_x509_certificate((state_dir / "certs" / "registry.pem").read_bytes())
    assert "registry.lab.example" in certs.cert_sans(cert)
    assert digest(state_dir / "ca" / "ca.pem") == ca_before
    nb_run("03-certs")  # back to the default SANs


@pytest.mark.lab
def test_ca_key_not_matching_is_refused(lab, nb_run, state_dir, tmp_path):
    a, a_key = certs.make_ca("CN=ca a")
    b, b_key = certs.make_ca("CN=ca b")
    ca_cert, _ = write_pair(tmp_path, "a", a, a_key)
    _, wrong_key = write_pair(tmp_path, "b", b, b_key)
    before = digest(state_dir / "certs" / "registry.pem"), digest(state_dir / "ca" / "ca.pem")
    nb, _, err = nb_run("03-certs", expect_error=True, ca_cert=ca_cert, ca_key=wrong_key)
    assert "ca_key" in str(err) and "is not the key of ca_cert" in str(err)
    assert (digest(state_dir / "certs" / "registry.pem"), digest(state_dir / "ca" / "ca.pem")) == before


@pytest.mark.lab
def test_given_cert_missing_the_registry_address_is_refused(lab, nb_run, state_dir, tmp_path):
    a, a_key = certs.make_ca("CN=ca a")
    ca_cert, _ = write_pair(tmp_path, "a", a, a_key)
    cert, key = certs.issue(a, a_key, certs.subject_of(), ["198.18.0.99", "127.0.0.1"], 30)
    sc, sk = write_pair(tmp_path, "server", cert, key)
    before = digest(state_dir / "certs" / "registry.pem")
    nb, _, err = nb_run("03-certs", expect_error=True, ca_cert=ca_cert, server_cert=sc, server_key=sk)
    assert "server_cert" in str(err) and f"does not cover registry address(es) {REGISTRY}" in str(err)
    assert digest(state_dir / "certs" / "registry.pem") == before


@pytest.mark.lab
def test_missing_file_is_a_parameter_error(lab, nb_run, tmp_path):
    nb, _, err = nb_run("03-certs", expect_error=True, ca_cert=str(tmp_path / "nope.pem"),
                              ca_key=str(tmp_path / "nope-key.pem"))
    assert "ca_cert: file" in str(err) and "does not exist" in str(err)


@pytest.mark.lab
def test_given_ca_and_cert_are_used(lab, nb_run, state_dir, tmp_path):
    """An existing CA (like the document's Kubernetes CA) issues our certificate; then back to our own."""
    a, a_key = certs.make_ca("CN=kubernetes,O=k8s")
    ca_cert, ca_key = write_pair(tmp_path, "k8s-ca", a, a_key)
    nb, _, _ = nb_run("03-certs", ca_cert=ca_cert, ca_key=ca_key)
    assert "VERDICT 03-certs: PASS" in outputs_text(nb)
    cert = x509.load_pem_x509_certificate((state_dir / "certs" / "registry.pem").read_bytes())
    assert certs.signed_by(cert, a)
    assert digest(state_dir / "ca" / "ca.pem") == digest(ca_cert)
    assert not (state_dir / "ca" / "ca-key.pem").exists()  # our old CA key moved aside, never deleted
    assert list((state_dir / "ca").glob("retired-*/ca-key.pem"))
    # back to our own CA (a new one: the old one was retired)
    nb, _, _ = nb_run("03-certs")
    assert "VERDICT 03-certs: PASS" in outputs_text(nb)
    cert = x509.load_pem_x509_certificate((state_dir / "certs" / "registry.pem").read_bytes())
    assert not certs.signed_by(cert, a)
