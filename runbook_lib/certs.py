"""Section 3: the registry's TLS certificate.

The document reuses its Kubernetes CA (`/etc/kubernetes/cert/ca.pem` + `ca-key.pem`)
and signs a CSR with cfssl.  We do the same with `cryptography`: an existing CA
(`ca_cert`/`ca_key` on the control node) or our own CA kept in `<state_dir>/ca/`,
and a server certificate (RSA 2048, as the document's CSR) in `<state_dir>/certs/`
whose SANs list every address and host name clients use.  A certificate issued
elsewhere can be brought instead (`server_cert`/`server_key`): it is checked, not
re-issued.  Section 4 copies these files to the registry hosts; section 5 gives
`ca_path(ctx)` to clients.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import masking, params as P, steps
from .errors import ParameterError, RunbookError
from .host import cmd
from .steps import step

# The document's CSR names (C=CN, ST/L=BeiJing, O=k8s, OU=4Paradigm, CN=registry).
DEFAULT_SUBJECT = "CN=registry,OU=4Paradigm,O=k8s,L=BeiJing,ST=BeiJing,C=CN"
CA_SUBJECT = "CN=runbook registry CA,O=k8s"
CA_DAYS = 3650
KEY_BITS = 2048


class CertError(RunbookError):
    """A certificate input is unusable (names the parameter)."""


# -- paths -------------------------------------------------------------------------
def ca_dir(ctx) -> str:
    return os.path.join(ctx.state_dir, "ca")


def cert_dir(ctx) -> str:
    return os.path.join(ctx.state_dir, "certs")


def ca_path(ctx) -> str:
    """The CA certificate clients must trust (docker certs.d, requests verify=)."""
    p = os.path.join(ca_dir(ctx), "ca.pem")
    if not os.path.exists(p):
        raise CertError(f"no CA certificate at {p}", "run notebooks/03-certs.ipynb first (same state_dir)")
    return p


def cert_path(ctx) -> str:
    return os.path.join(cert_dir(ctx), "registry.pem")


def key_path(ctx) -> str:
    return os.path.join(cert_dir(ctx), "registry-key.pem")


# -- pure helpers ---------------------------------------------------------------------
def parse_sans(values) -> list[str]:
    """'a, 10.0.0.1,a' -> ['a', '10.0.0.1'] (order kept, duplicates dropped); refuses junk."""
    out = []
    for v in P.as_list(values):
        p = P.host_problem(v)
        if p or v == "local":
            raise ValueError(p or "'local' is not a certificate name")
        if v not in out:
            out.append(v)
    return out


def default_sans(addresses, hostnames=(), extra=()) -> list[str]:
    """Every registry address, each host's name, 127.0.0.1 (as the document), then extras."""
    out = []
    for v in list(addresses) + list(hostnames) + ["127.0.0.1"] + list(extra):
        if v and v not in out:
            out.append(v)
    return out


def san_entries(names) -> list[x509.GeneralName]:
    out = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n.lower()))
    return out


def cert_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.IPAddress)] + ext.get_values_for_type(x509.DNSName)


def missing_sans(cert: x509.Certificate, required) -> list[str]:
    """Required names the certificate does not cover (IPs compared as addresses, DNS case-insensitively)."""
    have = {s.lower() for s in cert_sans(cert)}
    missing = []
    for r in required:
        try:
            key = str(ipaddress.ip_address(r))
        except ValueError:
            key = r.lower()
        if key not in have:
            missing.append(r)
    return missing


def subject_of(cn: str = "registry", org: str = "k8s") -> x509.Name:
    """The document's CSR names with CN and O as given (OU, L, ST, C fixed as the document's)."""
    if not cn or not org:
        raise ValueError("cert_cn and cert_org must not be empty")
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
                      x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "BeiJing"),
                      x509.NameAttribute(NameOID.LOCALITY_NAME, "BeiJing"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "4Paradigm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def parse_subject(text) -> x509.Name:
    if isinstance(text, x509.Name):
        return text
    try:
        name = x509.Name.from_rfc4514_string(text)
    except Exception as e:  # cryptography raises ValueError on bad syntax
        raise ValueError(f"{text!r} is not an RFC 4514 name like {DEFAULT_SUBJECT!r} ({e})") from None
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise ValueError(f"{text!r} has no CN=")
    return name


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fingerprint(cert: x509.Certificate) -> str:
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def public_bytes(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(cert: x509.Certificate, key) -> bool:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == public_bytes(key)


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # ValueError (names), InvalidSignature, TypeError (key type)
        return False


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def register_pem(data: bytes) -> None:
    """Mask a private key line by line: each base64 body line is a secret.  (Not the whole
    PEM as one value: its newlines get JSON-escaped forms, and those compound run after run
    in the engine's mask file.)"""
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if len(line) >= 8 and not line.startswith("-----"):
            masking.register(line)


def load_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except Exception:
        raise CertError(f"{what}: not a PEM certificate") from None


def load_key(data: bytes, what: str):
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{what}: the key is encrypted with a passphrase",
                        "give an unencrypted copy (openssl pkey -in KEY -out KEY.plain), kept 0600") from None
    except Exception:
        raise CertError(f"{what}: not a PEM private key") from None
    register_pem(data)
    return key


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def make_ca(subject: str = CA_SUBJECT, days: int = CA_DAYS):
    key = new_key()
    name = x509.Name.from_rfc4514_string(subject)
    t = now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - dt.timedelta(minutes=5)).not_valid_after(t + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca_cert: x509.Certificate, ca_key, subject, sans, days: int):
    """A server certificate for `sans` signed by the CA: (cert, key)."""
    key = new_key()
    t = now()
    not_after = min(t + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    b = (x509.CertificateBuilder().subject_name(parse_subject(subject)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(t - dt.timedelta(minutes=5)).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName(san_entries(sans)), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False))
    return b.sign(ca_key, hashes.SHA256()), key


def reissue_reasons(cert, key, ca_cert, sans, subject, renew_days: int) -> list[str]:
    """Why an existing certificate must be replaced ([] = keep it)."""
    if cert is None or key is None:
        return ["no certificate yet"]
    why = []
    if not key_matches(cert, key):
        why.append("the key does not match the certificate")
    if not signed_by(cert, ca_cert):
        why.append("issued by another CA")
    want = {s.lower() for s in (str(ipaddress.ip_address(s)) if _is_ip(s) else s for s in sans)}
    have = {s.lower() for s in cert_sans(cert)}
    if want != have:
        why.append(f"SANs differ (have {sorted(have)}, want {sorted(want)})")
    if cert.subject != parse_subject(subject):
        why.append("subject differs")
    left = cert.not_valid_after_utc - now()
    if left < dt.timedelta(days=renew_days):
        why.append(f"expires in {left.days} days (renew_days={renew_days})")
    if cert.not_valid_before_utc > now():
        why.append("not valid yet")
    return why


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def summary(cert: x509.Certificate, role: str) -> dict:
    """What a reader may see about a certificate (never key material)."""
    return {"role": role, "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "SANs": ", ".join(cert_sans(cert)) or "-",
            "not after": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
            "fingerprint": fingerprint(cert)}


# -- reading the inputs -------------------------------------------------------------------
def _read(path: str) -> bytes | None:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _p(ctx, name, default=""):
    return ctx.params.get(name, default)


def _load_ca(ctx):
    """(ca_cert, ca_key or None, ours: bool), checking what the user gave.  Raises CertError
    naming the parameter; never changes anything."""
    ca_cert_p, ca_key_p = _p(ctx, "ca_cert"), _p(ctx, "ca_key")
    if ca_cert_p:
        data = _read(ca_cert_p)
        if data is None:
            raise CertError(f"ca_cert: file {ca_cert_p!r} does not exist on the control node")
        ca = load_cert(data, f"ca_cert {ca_cert_p!r}")
        key = None
        if ca_key_p:
            kd = _read(ca_key_p)
            if kd is None:
                raise CertError(f"ca_key: file {ca_key_p!r} does not exist on the control node")
            key = load_key(kd, f"ca_key {ca_key_p!r}")
            if not key_matches(ca, key):
                raise CertError(f"ca_key: {ca_key_p!r} is not the key of ca_cert {ca_cert_p!r} "
                                f"({ca.subject.rfc4514_string()}); nothing was changed",
                                "pass the matching pair, e.g. /etc/kubernetes/cert/ca.pem with ca-key.pem")
        elif not _p(ctx, "server_cert"):
            raise CertError("ca_key: empty, but ca_cert is set and no server_cert is given: "
                            "a certificate cannot be issued without the CA's key",
                            "pass ca_key=PATH (the CA's private key), or server_cert/server_key issued by that CA")
        _check_ca(ca, "ca_cert")
        return ca, key, False
    if ca_key_p:
        raise CertError("ca_key: set without ca_cert", "pass both, or neither (own CA in the state dir)")
    d = _read(os.path.join(ca_dir(ctx), "ca.pem"))
    kd = _read(os.path.join(ca_dir(ctx), "ca-key.pem"))
    if d is None or kd is None:
        return None, None, True
    ca, key = load_cert(d, "own CA"), load_key(kd, "own CA key")
    if not key_matches(ca, key) or ca.not_valid_after_utc < now() + dt.timedelta(days=_p(ctx, "renew_days", 30)):
        return None, None, True  # broken or expiring own CA: make a new one
    return ca, key, True


def _check_ca(ca, param):
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = ca.issuer == ca.subject  # old v1 self-signed roots
    if not is_ca:
        raise CertError(f"{param}: {ca.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA:FALSE)")
    if ca.not_valid_after_utc < now():
        raise CertError(f"{param}: the CA expired on {ca.not_valid_after_utc:%Y-%m-%d}")


# -- steps -------------------------------------------------------------------------------
@step("Names the certificate must cover")
def names(ctx) -> list[str]:
    """Every registry address, each registry host's hostname (asked over SSH), 127.0.0.1, cert_sans."""
    try:
        extra = parse_sans(_p(ctx, "cert_sans"))
    except ValueError as e:
        raise ParameterError([f"cert_sans: {e}"]) from None
    addrs = client_addresses(ctx)
    hostnames = []
    for a in addrs:
        if a not in P.as_list(ctx.registry_host):  # lb_host: its address only (clients use that)
            steps.row(lb_host=a, hostname="(not asked: clients address the LB by this address)")
            continue
        h = ctx.host(a).run(cmd("hostname"), read=True, timeout=30).stdout.strip()
        if h and not P.host_problem(h) and h not in hostnames:
            hostnames.append(h)
        steps.row(registry_host=a, hostname=h)
    sans = default_sans(addrs, hostnames, extra)
    steps.fact("SANs", ", ".join(sans))
    _state(ctx)["sans"] = sans
    return sans


def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_certs", {})


@step("Plan: check the CA and the existing certificate")
def plan(ctx, sans=None) -> dict:
    """Everything decided before anything is written; bad input raises here."""
    if sans is None:
        sans = _state(ctx).get("sans") or names(ctx).value
    try:
        subject = subject_of(_p(ctx, "cert_cn", "registry"), _p(ctx, "cert_org", "k8s"))
    except ValueError as e:
        raise ParameterError([f"cert_cn/cert_org: {e}"]) from None
    ca, ca_key, ours = _load_ca(ctx)
    required = client_addresses(ctx)
    out = {"ca": ca, "ca_key": ca_key, "ours": ours, "subject": subject, "sans": sans, "required": required}
    if _p(ctx, "server_cert") or _p(ctx, "server_key"):
        out.update(_plan_given(ctx, ca, required))
        _state(ctx)["plan"] = out
        return out
    old = _read(cert_path(ctx))
    oldk = _read(key_path(ctx))
    cert = key = None
    try:
        cert = load_cert(old, "existing certificate") if old else None
        key = load_key(oldk, "existing key") if oldk else None
    except CertError:
        pass
    why = ["no CA yet"] if ca is None else reissue_reasons(cert, key, ca, sans, subject, _p(ctx, "renew_days", 30))
    out.update(cert=cert, key=key, reasons=why, given=False)
    _state(ctx)["plan"] = out
    steps.fact("CA", ("own CA in " + ca_dir(ctx)) if ours else _p(ctx, "ca_cert"))
    steps.fact("server certificate", "keep" if not why else "issue: " + "; ".join(why))
    return out


def _plan_given(ctx, ca, required) -> dict:
    cp, kp = _p(ctx, "server_cert"), _p(ctx, "server_key")
    if not (cp and kp):
        raise CertError("server_cert and server_key go together", "pass both (a certificate issued elsewhere), or neither")
    cd, kd = _read(cp), _read(kp)
    if cd is None:
        raise CertError(f"server_cert: file {cp!r} does not exist on the control node")
    if kd is None:
        raise CertError(f"server_key: file {kp!r} does not exist on the control node")
    cert, key = load_cert(cd, f"server_cert {cp!r}"), load_key(kd, f"server_key {kp!r}")
    if not key_matches(cert, key):
        raise CertError(f"server_key: {kp!r} is not the key of server_cert {cp!r}; nothing was changed")
    if ca is None:
        raise CertError("server_cert: given without ca_cert (the CA that issued it, for clients to trust)",
                        "pass ca_cert=PATH too")
    if not signed_by(cert, ca):
        raise CertError(f"server_cert: {cp!r} was not issued by ca_cert ({ca.subject.rfc4514_string()}); "
                        "nothing was changed")
    miss = missing_sans(cert, required)
    if miss:
        raise CertError(f"server_cert: {cp!r} does not cover registry address(es) {', '.join(miss)} "
                        f"(its SANs: {', '.join(cert_sans(cert)) or 'none'}); clients would refuse it; "
                        "nothing was changed",
                        "re-issue it with those addresses, or leave server_cert empty to let this notebook issue one")
    if cert.not_valid_after_utc < now():
        raise CertError(f"server_cert: {cp!r} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    steps.fact("server certificate", f"given: {cp}")
    return {"cert": cert, "key": key, "reasons": [], "given": True, "cert_pem": cd, "key_pem": kd}


@step("CA certificate")
def ensure_ca(ctx, decided: dict | None = None):
    """Our own CA (created once, kept), or a copy of the given CA cert at <state_dir>/ca/ca.pem."""
    decided = decided or _state(ctx).get("plan") or plan(ctx).value
    ca = decided["ca"]
    loc = ctx.local
    caf, kf = os.path.join(ca_dir(ctx), "ca.pem"), os.path.join(ca_dir(ctx), "ca-key.pem")
    if decided["ours"]:
        if ca is None:
            ca, key = make_ca()
            kp = key_pem(key)
            register_pem(kp)
            # key and certificate with one read of both (the key first, as before)
            loc.put_files([(kf, kp, 0o600, True), (caf, ca.public_bytes(serialization.Encoding.PEM), 0o644, False)])
            decided["ca"], decided["ca_key"] = ca, key
            decided["reasons"] = ["new CA"]
        else:
            loc.put_file(caf, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    else:
        if os.path.exists(kf):
            # switching from our own CA to a given one: keep the old pair aside, never delete a key
            old = _read(caf)
            tag = load_cert(old, "old CA").fingerprint(hashes.SHA256()).hex()[:12] if old else "unknown"
            loc.run(cmd("mkdir -p {d} && mv -f {k} {d}/ && mv -f {c} {d}/", d=os.path.join(ca_dir(ctx), "retired-" + tag),
                        k=kf, c=caf), changed=True)
        loc.put_file(caf, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    steps.row(**summary(ca, "CA"))
    return ca


@step("Server certificate for the registry")
def ensure_cert(ctx, decided: dict | None = None):
    """Issue (or keep, or take the given) server certificate: registry.pem + registry-key.pem (0600)."""
    decided = decided or _state(ctx).get("plan") or plan(ctx).value
    loc = ctx.local
    if decided.get("given"):
        cert, kp = decided["cert"], decided["key_pem"]
        cp = decided["cert_pem"]
    elif decided["reasons"]:
        cert, key = issue(decided["ca"], decided["ca_key"], decided["subject"], decided["sans"], _p(ctx, "cert_days", 825))
        kp = key_pem(key)
        cp = cert.public_bytes(serialization.Encoding.PEM)
        steps.note("issued: " + "; ".join(decided["reasons"]))
    else:
        cert = decided["cert"]
        cp = _read(cert_path(ctx))
        kp = _read(key_path(ctx))
    register_pem(kp)
    loc.put_files([(key_path(ctx), kp, 0o600, True), (cert_path(ctx), cp, 0o644, False)])  # one read for both
    steps.row(**summary(cert, "registry"))
    return cert


def issue_all(ctx):
    """names -> plan -> CA -> server certificate (for deploy.ipynb and tests)."""
    sans = names(ctx).value
    p = plan(ctx, sans).value
    ensure_ca(ctx, p)
    return ensure_cert(ctx, p)


# -- verification -------------------------------------------------------------------------
def verify(ctx) -> list[str]:
    """Problems with the files in the state dir ([] = good): chain, dates, SANs, key, modes."""
    problems = []
    caf = os.path.join(ca_dir(ctx), "ca.pem")
    cd, kd, cad = _read(cert_path(ctx)), _read(key_path(ctx)), _read(caf)
    if cad is None or cd is None or kd is None:
        return [f"missing: {', '.join(p for p, d in ((caf, cad), (cert_path(ctx), cd), (key_path(ctx), kd)) if d is None)}"]
    try:
        ca, cert, key = load_cert(cad, "CA"), load_cert(cd, "certificate"), load_key(kd, "key")
    except CertError as e:
        return [str(e)]
    if not signed_by(cert, ca):
        problems.append("the certificate's signature does not verify with the CA")
    t = now()
    for c, what in ((ca, "CA"), (cert, "certificate")):
        if not c.not_valid_before_utc <= t <= c.not_valid_after_utc:
            problems.append(f"the {what} is not valid now ({c.not_valid_before_utc:%Y-%m-%d} .. {c.not_valid_after_utc:%Y-%m-%d})")
    miss = missing_sans(cert, client_addresses(ctx))
    if miss:
        problems.append(f"SANs miss registry address(es) {', '.join(miss)}")
    if not key_matches(cert, key):
        problems.append("the key does not match the certificate")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            problems.append("extendedKeyUsage lacks serverAuth")
    except x509.ExtensionNotFound:
        pass
    for p in (key_path(ctx), os.path.join(ca_dir(ctx), "ca-key.pem")):
        if os.path.exists(p) and os.stat(p).st_mode & 0o077:
            problems.append(f"{p} is readable by others (mode {os.stat(p).st_mode & 0o777:o}, want 600)")
    return problems


def load_server(ctx) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for the registry hosts; the key is registered as a secret."""
    cd, kd = _read(cert_path(ctx)), _read(key_path(ctx))
    if cd is None or kd is None:
        raise CertError(f"no registry certificate in {cert_dir(ctx)}", "run notebooks/03-certs.ipynb first (same state_dir)")
    register_pem(kd)
    return cd, kd


def check(ctx):
    """Verdict: chain and dates valid, SANs cover every registry address."""
    if ctx.dry_run and not os.path.exists(cert_path(ctx)):
        ctx.verdict(True, "dry run: nothing issued")
        return
    problems = verify(ctx)
    facts = {}
    cd = _read(cert_path(ctx))
    if cd:
        try:
            cert = load_cert(cd, "certificate")
            facts = {"subject": cert.subject.rfc4514_string(), "SANs cover": ", ".join(client_addresses(ctx)),
                     "days left": f">= {_p(ctx, 'renew_days', 30)}" if
                     (cert.not_valid_after_utc - now()).days >= _p(ctx, "renew_days", 30) else "RENEW"}
        except CertError:
            pass
    ok = not problems
    ctx.verdict(ok, "certificate chain valid, SANs cover every registry address" if ok else "; ".join(problems),
                       hint="re-run this notebook (it re-issues what is wrong)", **facts)


def client_addresses(ctx) -> list[str]:
    """Every address clients use: each registry_host, and lb_host when there is a load balancer
    (TLS passes through it: the registry's one certificate must name the LB address too)."""
    addrs = P.as_list(ctx.registry_host)
    lb = (ctx.params.get("lb_host") or "").strip()
    return addrs + ([lb] if lb and lb not in addrs else [])
