"""Check section 'network': could someone on the Internet reach this server today?

The two sanctioned practices were exposed by a port mapping on their internet box and by
settings nobody looked at again. This section looks where an inspector would: the
sockets actually listening (``/proc/net/tcp*``), the trail's ``exposure`` events (a
connection from outside the trusted networks *did* reach a port), the box's port mapping
table (UPnP IGD, read-only) and NAT-PMP/PCP, the nodes talking plain DICOM, and the two
settings that open the server on purpose (``remote_access``, ``tls_from_anywhere``).

Active questions to the gateway go to the LAN only (SSDP multicast with TTL 2, NAT-PMP to
the default gateway). ``ctx.options`` (or ``PACSVAULT_CHECK_GATEWAY``) points them at a
unicast test gateway, or turns them off: ``off`` or ``ssdp=HOST:PORT,natpmp=HOST:PORT``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pacsvault.audit.query import AuditFilter, select_records
from pacsvault.check import natpmp, upnp
from pacsvault.check.model import CheckContext, Finding, Localized, Severity
from pacsvault.status.report import LISTEN, running_state

SECTION = "network"
EXPOSURE_DAYS = 30
GATEWAY_ENV = "PACSVAULT_CHECK_GATEWAY"
GDPR_32 = "GDPR art. 32(1)(b)"
CNIL_NETWORK = ("CNIL, Guide de la sécurité des données personnelles (2024), "
                "fiche « Protéger le réseau informatique »")
PS3_15 = "DICOM PS3.15 Annex B (secure transport connection profiles)"
Address = tuple[str, int]


@dataclass(frozen=True)
class Socket:
    address: str
    port: int


def _finding(fid: str, severity: Severity, title: Localized, requirement: str,
             evidence: Localized, fix: Localized, data: dict[str, Any]) -> Finding:
    return Finding(f"{SECTION}.{fid}", SECTION, severity, title, requirement, evidence, fix,
                   data)


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    six = ipaddress.IPv6Address(words)
    return str(six.ipv4_mapped or six)


def listening_sockets(proc: Path = Path("/proc/net")) -> list[Socket]:
    found: list[Socket] = []
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                host, _, port = fields[1].rpartition(":")
                found.append(Socket(_hex_address(host), int(port, 16)))
    return found


def local_addresses() -> set[str]:
    """Every address of this host's interfaces (what a mapping may point at)."""
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.add(entry.address.split("%", 1)[0])
    return found


def _public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_global


def our_ports(ctx: CheckContext, state: dict[str, Any] | None) -> dict[int, str]:
    """Port -> listener kind, from the settings and the running server's state."""
    settings = ctx.vault.settings
    ports: dict[int, str] = {}
    if settings.dicom.plain_enabled and settings.dicom.port:
        ports[settings.dicom.port] = "dicom"
    if settings.dicom.tls_port:
        ports[settings.dicom.tls_port] = "dicom_tls"
    if settings.web.enabled and settings.web.https_port:
        ports[settings.web.https_port] = "https"
    for key, kind in (("dicom_port", "dicom"), ("dicom_tls_port", "dicom_tls"),
                      ("https_port", "https")):
        value = (state or {}).get(key)
        if isinstance(value, int) and value > 0:
            ports[value] = kind
    return ports


def _public_listeners(ctx: CheckContext, state: dict[str, Any] | None,
                      ports: dict[int, str]) -> list[Finding]:
    public_here = sorted(a for a in local_addresses() if _public(a))
    exposed: list[dict[str, Any]] = []
    if state is not None:
        running = {int(v) for k, v in state.items()
                   if k.endswith("_port") and isinstance(v, int) and v > 0}
        for sock in listening_sockets():
            if sock.port not in running:
                continue
            bound = ipaddress.ip_address(sock.address)
            if bound.is_unspecified:  # every interface: 0.0.0.0 the IPv4 ones, :: all
                reach = [a for a in public_here
                         if bound.version == 6 or ipaddress.ip_address(a).version == 4]
            else:
                reach = [sock.address] if _public(sock.address) else []
            exposed.extend({"listener": ports.get(sock.port, "?"), "bound": sock.address,
                            "port": sock.port, "public_address": a} for a in reach)
    bind = ctx.vault.settings.server.bind
    if _public(bind) and not exposed:
        exposed.append({"listener": "settings", "bound": bind, "port": None,
                        "public_address": bind})
    if not exposed:
        return []
    where = ", ".join(sorted({f"{e['public_address']}:{e['port'] or '*'}" for e in exposed}))
    return [_finding(
        "public-listener", Severity.CRITICAL,
        Localized("A listener is bound to a public Internet address",
                  "Un port d'écoute est ouvert sur une adresse Internet publique"),
        f"{GDPR_32}; {CNIL_NETWORK}",
        Localized(f"Reachable on public address(es): {where}.",
                  f"Joignable sur une ou des adresses publiques : {where}."),
        Localized("Set [server] bind to the LAN address of this machine (or put it behind the "
                  "internet box's NAT) and restart pacsvault.",
                  "Réglez [server] bind sur l'adresse de cette machine dans le réseau local "
                  "(ou placez-la derrière le NAT de la box) puis redémarrez pacsvault."),
        {"listeners": exposed})]


def _exposures(ctx: CheckContext) -> list[Finding]:
    since = ctx.now - dt.timedelta(days=EXPOSURE_DAYS)
    records = [r for r in select_records(ctx.vault, AuditFilter(action="exposure", since=since))
               if r.action == "exposure"]
    if not records:
        return []
    addresses = sorted({r.actor_address for r in records if r.actor_address})
    ports = sorted({str(r.detail.get("port", "")) for r in records} - {""})
    last = max(r.time for r in records)[:19].replace("T", " ")
    shown = ", ".join(addresses[:5]) + (" …" if len(addresses) > 5 else "")
    return [_finding(
        "exposure-events", Severity.CRITICAL,
        Localized("Connections from outside the trusted networks reached the server",
                  "Des connexions venues de l'extérieur des réseaux de confiance ont atteint "
                  "le serveur"),
        f"{GDPR_32}; GDPR art. 33 (assess whether this is a breach); {CNIL_NETWORK}",
        Localized(f"{len(records)} exposure event(s) in the last {EXPOSURE_DAYS} days from "
                  f"{len(addresses)} address(es) ({shown}) on port(s) {', '.join(ports)}; "
                  f"last at {last} UTC.",
                  f"{len(records)} événement(s) d'exposition sur les {EXPOSURE_DAYS} derniers "
                  f"jours depuis {len(addresses)} adresse(s) ({shown}) sur le(s) port(s) "
                  f"{', '.join(ports)} ; dernier le {last} UTC."),
        Localized("Find and remove the port forwarding or DMZ rule on the internet box; then "
                  "review `pacsvault audit show --action exposure` and open a breach record "
                  "if data may have been reached.",
                  "Trouvez et supprimez la redirection de port ou la règle DMZ sur la box ; "
                  "puis examinez `pacsvault audit show --action exposure` et ouvrez une fiche "
                  "de violation si des données ont pu être atteintes."),
        {"events": len(records), "addresses": addresses[:50], "ports": ports, "last": last})]


def _parse_address(text: str) -> Address:
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port)


def gateway_targets(ctx: CheckContext) -> tuple[Address | None, Address | None]:
    """Where to send SSDP and NAT-PMP: options, then the environment, then the LAN."""
    ssdp: Any = ctx.options.get("ssdp_address")
    pmp: Any = ctx.options.get("natpmp_gateway")
    env = os.environ.get(GATEWAY_ENV, "").strip()
    if ssdp is None and pmp is None and env:
        if env == "off":
            return None, None
        parts = dict(p.split("=", 1) for p in env.split(",") if "=" in p)
        ssdp = _parse_address(parts["ssdp"]) if "ssdp" in parts else "off"
        pmp = _parse_address(parts["natpmp"]) if "natpmp" in parts else "off"
    if ssdp is None:
        ssdp = upnp.SSDP_MULTICAST
    if pmp is None:
        gateway = natpmp.default_gateway()
        pmp = (gateway, natpmp.NATPMP_PORT) if gateway else "off"
    return (None if ssdp == "off" else (str(ssdp[0]), int(ssdp[1])),
            None if pmp == "off" else (str(pmp[0]), int(pmp[1])))


def _mapping_findings(gateways: list[upnp.Gateway], ports: dict[int, str]) -> list[Finding]:
    mine = local_addresses()
    ours: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for gateway in gateways:
        for m in gateway.mappings:
            if m.internal_client not in mine or not m.enabled:
                continue
            entry = {**m.as_json(), "gateway": gateway.location}
            if m.protocol == "TCP" and m.internal_port in ports:
                ours.append({**entry, "listener": ports[m.internal_port]})
            else:
                others.append(entry)
    found: list[Finding] = []
    if ours:
        shown = "; ".join(f"Internet port {m['external_port']}/TCP → {m['internal_client']}:"
                          f"{m['internal_port']} ({m['listener']})" for m in ours)
        found.append(_finding(
            "upnp-mapping", Severity.CRITICAL,
            Localized("The internet box forwards a pacsvault port to this machine",
                      "La box Internet redirige un port de pacsvault vers cette machine"),
            f"{GDPR_32}; {CNIL_NETWORK}",
            Localized(f"The gateway's port mapping table has: {shown}.",
                      f"La table de redirections de la box contient : {shown}."),
            Localized("Delete this port mapping in the internet box's administration page and "
                      "disable UPnP there; use a VPN for remote access.",
                      "Supprimez cette redirection dans l'interface d'administration de la box "
                      "et désactivez-y UPnP ; utilisez un VPN pour l'accès à distance."),
            {"mappings": ours}))
    if others:
        found.append(_finding(
            "upnp-mapping-other", Severity.WARNING,
            Localized("The internet box forwards other ports to this machine",
                      "La box Internet redirige d'autres ports vers cette machine"),
            f"{GDPR_32}; {CNIL_NETWORK}",
            Localized(f"{len(others)} mapping(s) to this machine on ports pacsvault does not "
                      "use.", f"{len(others)} redirection(s) vers cette machine sur des ports "
                      "que pacsvault n'utilise pas."),
            Localized("Check why each exists; remove those nobody needs.",
                      "Vérifiez pourquoi chacune existe ; supprimez celles qui ne servent pas."),
            {"mappings": others}))
    for gateway in gateways:
        if gateway.error:
            found.append(_finding(
                "gateway-unreadable", Severity.WARNING,
                Localized("The internet box's port mappings could not be read to the end",
                          "Les redirections de la box n'ont pas pu être lues en entier"),
                CNIL_NETWORK,
                Localized(f"{gateway.location}: {gateway.error}",
                          f"{gateway.location} : {gateway.error}"),
                Localized("Look at the box's port forwarding page by hand.",
                          "Consultez à la main la page des redirections de la box."),
                {"gateway": gateway.location, "error": gateway.error}))
    if gateways:
        found.append(_finding(
            "upnp-enabled", Severity.INFO,
            Localized("The internet box accepts UPnP port mapping requests",
                      "La box Internet accepte les demandes de redirection UPnP"),
            CNIL_NETWORK,
            Localized(f"UPnP IGD answered at {', '.join(g.location for g in gateways)}.",
                      f"UPnP IGD a répondu à {', '.join(g.location for g in gateways)}."),
            Localized("Any program on the LAN may open a port without asking: disable UPnP "
                      "on the box if nothing needs it.",
                      "N'importe quel programme du réseau local peut ouvrir un port sans rien "
                      "demander : désactivez UPnP sur la box si rien n'en a besoin."),
            {"gateways": [g.location for g in gateways]}))
    return found


def _natpmp_finding(answer: natpmp.PublicAddress) -> Finding:
    if answer.protocol == "PCP":
        what = "PCP ANNOUNCE " + ("answered" if answer.result == 0
                                  else f"answered with result {answer.result}")
    else:
        what = "NAT-PMP public address " + (
            answer.address if answer.result == 0
            else natpmp.RESULT_TEXT.get(answer.result, str(answer.result)))
    return _finding(
        "natpmp-enabled", Severity.INFO,
        Localized("The default gateway answers NAT-PMP or PCP",
                  "La passerelle par défaut répond à NAT-PMP ou PCP"),
        CNIL_NETWORK,
        Localized(f"Gateway {answer.gateway}: {what}.",
                  f"Passerelle {answer.gateway} : {what}."),
        Localized("Programs on the LAN may open ports through it: disable NAT-PMP/PCP on the "
                  "box if nothing needs it.",
                  "Des programmes du réseau local peuvent ouvrir des ports par elle : "
                  "désactivez NAT-PMP/PCP sur la box si rien n'en a besoin."),
        {"gateway": answer.gateway, "protocol": answer.protocol, "result": answer.result,
         "public_address": answer.address})


def _gateway(ctx: CheckContext, ports: dict[int, str]) -> list[Finding]:
    if not ctx.probe:
        return []
    ssdp, pmp = gateway_targets(ctx)
    timeout = float(ctx.options.get("gateway_timeout", 3.0))
    found: list[Finding] = []
    if ssdp is not None:
        found.extend(_mapping_findings(upnp.read_gateways(ssdp, timeout), ports))
    if pmp is not None:
        answer = natpmp.public_address(pmp, min(timeout, 2.0))
        if answer is not None:
            found.append(_natpmp_finding(answer))
    return found


def _nodes_and_settings(ctx: CheckContext) -> list[Finding]:
    settings = ctx.vault.settings
    found: list[Finding] = []
    plain = [n for n in ctx.vault.nodes.all() if not n.tls]
    if plain:
        listed = ", ".join(f"{n.ae_title}@{n.host}" for n in plain[:20])
        found.append(_finding(
            "plain-dicom-nodes", Severity.WARNING,
            Localized("Nodes exchange images in plain (unencrypted) DICOM",
                      "Des nœuds échangent des images en DICOM non chiffré"),
            f"{GDPR_32} (encryption in transit); {PS3_15}",
            Localized(f"{len(plain)} node(s) without TLS: {listed}.",
                      f"{len(plain)} nœud(s) sans TLS : {listed}."),
            Localized("Enable TLS on these devices and re-register them with "
                      "`pacsvault node add --tls`; keep plain DICOM to the practice's LAN.",
                      "Activez TLS sur ces appareils et réenregistrez-les avec "
                      "`pacsvault node add --tls` ; limitez le DICOM non chiffré au réseau "
                      "local."),
            {"nodes": [{"ae_title": n.ae_title, "host": n.host} for n in plain]}))
    if settings.web.remote_access == "internet":
        found.append(_finding(
            "remote-access-internet", Severity.WARNING,
            Localized("The web interface accepts sign-ins from the Internet",
                      "L'interface web accepte les connexions depuis Internet"),
            f"{GDPR_32}; {CNIL_NETWORK}",
            Localized('[web] remote_access = "internet": anyone who reaches the port may try '
                      "passwords (administration still refuses outside sources).",
                      '[web] remote_access = "internet" : quiconque atteint le port peut '
                      "essayer des mots de passe (l'administration refuse toujours "
                      "l'extérieur)."),
            Localized('Set remote_access = "lan" and use a VPN for remote reading, unless every '
                      "account has a second factor.",
                      'Réglez remote_access = "lan" et utilisez un VPN pour lire à distance, '
                      "sauf si tous les comptes ont un second facteur."),
            {"remote_access": "internet"}))
    if settings.dicom.tls_from_anywhere:
        found.append(_finding(
            "tls-from-anywhere", Severity.WARNING,
            Localized("DICOM TLS is accepted from any address",
                      "DICOM TLS est accepté depuis n'importe quelle adresse"),
            f"{GDPR_32}; {PS3_15}",
            Localized("[dicom] tls_from_anywhere = true: the TLS port answers outside the "
                      "trusted networks (node certificates still required).",
                      "[dicom] tls_from_anywhere = true : le port TLS répond hors des "
                      "réseaux de confiance (certificats des nœuds toujours exigés)."),
            Localized("Turn it off unless a partner outside the practice sends images; then "
                      "restrict the box's forwarding to that partner's address.",
                      "Désactivez-le sauf si un partenaire extérieur envoie des images ; "
                      "limitez alors la redirection de la box à l'adresse de ce partenaire."),
            {"tls_from_anywhere": True}))
    return found


def check(ctx: CheckContext) -> list[Finding]:
    state = running_state(ctx.vault.layout)
    ports = our_ports(ctx, state)
    return [*_public_listeners(ctx, state, ports), *_exposures(ctx),
            *_gateway(ctx, ports), *_nodes_and_settings(ctx)]
