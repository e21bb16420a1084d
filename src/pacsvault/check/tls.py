"""Check section 'tls': what each TLS listener really negotiates, and its certificates.

Handshake probes (``tlsprobe``) against the running server's DICOM TLS and HTTPS ports,
on the address it bound (loopback for a wildcard bind): an obsolete protocol version
accepted (TLS 1.0/1.1) is critical, a weak suite family accepted is a warning, per the
ANSSI TLS recommendations. The certificates come from the same handshakes: expired is
critical, 30 days or less a warning, an RSA key under 2048 bits or an EC key under 256
bits critical. When no server runs, the certificate files are read instead (what the
next start will serve) and the protocols are said unverified (info).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from pacsvault.check import tlsprobe
from pacsvault.check.model import CheckContext, Finding, Localized, Severity
from pacsvault.status.report import running_state

SECTION = "tls"
EXPIRY_WARNING_DAYS = 30
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
ANSSI = "ANSSI, Recommandations de sécurité relatives à TLS (ANSSI-PA-035)"
GDPR_32 = "GDPR art. 32(1)(a) (encryption)"
LABEL = {"dicom_tls": "DICOM TLS", "https": "HTTPS"}


def _finding(fid: str, severity: Severity, title: Localized, evidence: Localized,
             fix: Localized, data: dict[str, Any], requirement: str = "") -> Finding:
    return Finding(f"{SECTION}.{fid}", SECTION, severity, title,
                   requirement or f"{ANSSI}; {GDPR_32}", evidence, fix, data)


def listeners(ctx: CheckContext) -> list[tuple[str, str, int]]:
    """(kind, address to probe, port) of the running server's TLS listeners."""
    state = running_state(ctx.vault.layout)
    if state is None:
        return []
    bind = str(state.get("bind") or ctx.vault.settings.server.bind or "127.0.0.1")
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "", "private") else bind  # noqa: S104
    found = []
    for kind, key in (("dicom_tls", "dicom_tls_port"), ("https", "https_port")):
        port = state.get(key)
        if isinstance(port, int) and port > 0:
            found.append((kind, host, port))
    return found


def certificate_findings(where: str, der: bytes, now: dt.datetime) -> list[Finding]:
    """Expiry and key strength of one served (or configured) certificate."""
    cert = x509.load_der_x509_certificate(der)
    found: list[Finding] = []
    expires = cert.not_valid_after_utc
    days = (expires - now).total_seconds() / 86400
    data = {"where": where, "expires": expires.isoformat(), "serial": f"{cert.serial_number:x}"}
    when = expires.strftime("%Y-%m-%d")
    renew = Localized("Renew it (`pacsvault tls rotate-ca` re-issues the vault's own; install "
                      "your provider's new certificate otherwise) and restart.",
                      "Renouvelez-le (`pacsvault tls rotate-ca` réémet ceux du coffre ; sinon "
                      "installez le nouveau certificat de votre prestataire) puis redémarrez.")
    if days < 0:
        found.append(_finding(
            "certificate-expired", Severity.CRITICAL,
            Localized("A served certificate has expired", "Un certificat présenté a expiré"),
            Localized(f"{where}: expired on {when}.", f"{where} : expiré le {when}."),
            renew, data))
    elif days <= EXPIRY_WARNING_DAYS:
        found.append(_finding(
            "certificate-expiring", Severity.WARNING,
            Localized("A served certificate expires soon",
                      "Un certificat présenté expire bientôt"),
            Localized(f"{where}: expires on {when} ({int(days)} days).",
                      f"{where} : expire le {when} ({int(days)} jours)."),
            renew, data))
    key = cert.public_key()
    weak = ""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        weak = f"RSA {key.key_size} bits (< {MIN_RSA_BITS})"
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        weak = f"EC {key.curve.name} {key.curve.key_size} bits (< {MIN_EC_BITS})"
    elif isinstance(key, dsa.DSAPublicKey):
        weak = f"DSA {key.key_size} bits"
    if weak:
        found.append(_finding(
            "weak-key", Severity.CRITICAL,
            Localized("A served certificate has a weak key",
                      "Un certificat présenté a une clé trop faible"),
            Localized(f"{where}: {weak}.", f"{where} : {weak}."),
            Localized("Issue a new certificate with an ECDSA P-256 or RSA 3072-bit key.",
                      "Émettez un nouveau certificat avec une clé ECDSA P-256 ou RSA 3072 "
                      "bits."),
            {**data, "key": weak}))
    return found


def _probe_findings(p: tlsprobe.ListenerProbe, now: dt.datetime) -> list[Finding]:
    name = f"{LABEL.get(p.kind, p.kind)} {p.host}:{p.port}"
    data: dict[str, Any] = {"listener": p.kind, "address": p.host, "port": p.port,
                            "protocols": dict(p.protocols), "weak_suites": dict(p.weak),
                            "inconclusive": list(p.inconclusive)}
    if p.error or not p.protocols:
        return [_finding(
            "probe-failed", Severity.WARNING,
            Localized("A TLS listener could not be probed",
                      "Un port TLS n'a pas pu être sondé"),
            Localized(f"{name}: {p.error or 'no handshake succeeded'}.",
                      f"{name} : {p.error or 'aucune négociation réussie'}."),
            Localized("Check that pacsvault is running and its listeners are up "
                      "(`pacsvault status`).",
                      "Vérifiez que pacsvault tourne et que ses ports écoutent "
                      "(`pacsvault status`)."), {**data, "error": p.error})]
    found: list[Finding] = []
    if p.inconclusive:
        dropped = ", ".join(p.inconclusive)
        found.append(_finding(
            "probe-incomplete", Severity.WARNING,
            Localized("Some TLS probes got no answer", "Des sondages TLS sont restés sans "
                      "réponse"),
            Localized(f"{name} closed the connection without a TLS answer for: {dropped}.",
                      f"{name} a fermé la connexion sans réponse TLS pour : {dropped}."),
            Localized("Run the check again in a minute (the server's per-address connection "
                      "limit may have been reached); a TLS proxy in front may hang up instead "
                      "of refusing: check it with a TLS scanner.",
                      "Relancez la vérification dans une minute (la limite de connexions par "
                      "adresse du serveur a pu être atteinte) ; un proxy TLS en frontal peut "
                      "raccrocher au lieu de refuser : vérifiez-le avec un scanner TLS."),
            {**data, "inconclusive": list(p.inconclusive)}))
    obsolete = sorted(set(p.protocols) & tlsprobe.OBSOLETE)
    if obsolete:
        found.append(_finding(
            "obsolete-protocol", Severity.CRITICAL,
            Localized("A listener accepts an obsolete TLS version",
                      "Un port accepte une version obsolète de TLS"),
            Localized(f"{name} negotiated {', '.join(obsolete)}.",
                      f"{name} a négocié {', '.join(obsolete)}."),
            Localized("Only TLS 1.2 and 1.3 must be accepted: remove whatever lowered the "
                      "minimum (a proxy in front, a test switch) and restart pacsvault.",
                      "Seuls TLS 1.2 et 1.3 doivent être acceptés : retirez ce qui a abaissé "
                      "le minimum (un proxy en frontal, un réglage de test) puis redémarrez "
                      "pacsvault."), data))
    if p.weak:
        listed = "; ".join(f"{family} ({suite})" for family, suite in sorted(p.weak.items()))
        found.append(_finding(
            "weak-suites", Severity.WARNING,
            Localized("A listener accepts weak cipher suites",
                      "Un port accepte des suites cryptographiques faibles"),
            Localized(f"{name} negotiated: {listed}.", f"{name} a négocié : {listed}."),
            Localized("Keep only forward-secret AEAD suites (ECDHE with AES-GCM or "
                      "ChaCha20-Poly1305); a legacy node opted in to the retired DICOM AES "
                      "profile should move to the BCP 195 profile.",
                      "Ne gardez que des suites AEAD à confidentialité persistante (ECDHE "
                      "avec AES-GCM ou ChaCha20-Poly1305) ; un nœud ancien resté sur l'ancien "
                      "profil DICOM AES doit passer au profil BCP 195."), data))
    if "TLSv1.3" not in p.protocols:
        found.append(_finding(
            "no-tls13", Severity.INFO,
            Localized("A listener does not offer TLS 1.3",
                      "Un port ne propose pas TLS 1.3"),
            Localized(f"{name} negotiated only {', '.join(sorted(p.protocols))}.",
                      f"{name} n'a négocié que {', '.join(sorted(p.protocols))}."),
            Localized("Use an OpenSSL with TLS 1.3 (any current system).",
                      "Utilisez un OpenSSL avec TLS 1.3 (tout système à jour)."), data))
    seen: set[bytes] = set()
    for cert_kind, der in p.certificates.items():
        if der in seen:
            continue
        seen.add(der)
        label = f"{name} ({cert_kind} certificate)" if cert_kind != "default" else name
        found.extend(certificate_findings(label, der, now))
    return found


def _files(ctx: CheckContext) -> list[tuple[str, Path]]:
    paths = [("server.crt", ctx.vault.layout.tls.server_cert),
             ("server-rsa.crt", ctx.vault.layout.tls.server_rsa_cert)]
    if ctx.vault.settings.web.cert_file:
        paths.append(("[web] cert_file", Path(ctx.vault.settings.web.cert_file)))
    return paths


def _offline(ctx: CheckContext, running: bool = False) -> list[Finding]:
    """No probe (no server running, or probes not allowed): the certificate files the
    server serves (or will at its next start)."""
    why = (Localized("probes were not allowed for this run", "sondages non autorisés pour "
                     "cette vérification") if running else
           Localized("no `pacsvault serve` is running", "aucun `pacsvault serve` ne tourne"))
    found: list[Finding] = [_finding(
        "not-probed", Severity.INFO,
        Localized("TLS listeners not probed", "Ports TLS non sondés"),
        Localized(f"Protocols and suites were not verified: {why.en}.",
                  f"Protocoles et suites non vérifiés : {why.fr}."),
        Localized("Run the check while the server runs (the nightly run does).",
                  "Lancez la vérification pendant que le serveur tourne (celle de la nuit "
                  "le fait)."), {})]
    for label, path in _files(ctx):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        from cryptography.hazmat.primitives.serialization import Encoding

        found.extend(certificate_findings(label, cert.public_bytes(Encoding.DER), ctx.now))
    return found


def _legacy_nodes(ctx: CheckContext) -> list[Finding]:
    """Nodes opted in to the retired DICOM AES profile: the DICOM TLS listener offers them
    (and only them, by source address) TLS_RSA_WITH_AES_128_CBC_SHA. A probe from here
    cannot see it, so the registry says it."""
    legacy = [n for n in ctx.vault.nodes.all() if n.tls and n.legacy_tls]
    if not legacy:
        return []
    listed = ", ".join(f"{n.ae_title}@{n.host}" for n in legacy[:20])
    return [_finding(
        "legacy-profile-nodes", Severity.WARNING,
        Localized("Nodes still use the retired DICOM AES TLS profile",
                  "Des nœuds utilisent encore l'ancien profil TLS DICOM AES"),
        Localized(f"{len(legacy)} node(s) get AES128-SHA (no forward secrecy): {listed}.",
                  f"{len(legacy)} nœud(s) reçoivent AES128-SHA (sans confidentialité "
                  f"persistante) : {listed}."),
        Localized("Update these devices to the BCP 195 profile (TLS 1.2 ECDHE with AES-GCM) "
                  "and re-register them with `--tls-profile bcp195`.",
                  "Mettez ces appareils à jour vers le profil BCP 195 (TLS 1.2 ECDHE avec "
                  "AES-GCM) et réenregistrez-les avec `--tls-profile bcp195`."),
        {"nodes": [{"ae_title": n.ae_title, "host": n.host} for n in legacy]},
        requirement=f"{ANSSI}; DICOM PS3.15 Annex B.3 (retired); {GDPR_32}")]


def check(ctx: CheckContext) -> list[Finding]:
    found = listeners(ctx)
    if not ctx.probe or not found:
        return [*_offline(ctx, running=bool(found)), *_legacy_nodes(ctx)]
    timeout = float(ctx.options.get("tls_timeout", 3.0))
    results: list[Finding] = []
    for kind, host, port in found:
        results.extend(_probe_findings(tlsprobe.probe(kind, host, port, timeout), ctx.now))
    return [*results, *_legacy_nodes(ctx)]
