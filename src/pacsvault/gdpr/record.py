"""The record of processing activities (GDPR art. 30(1)) as a ``documents.Document``.

Why pre-filled from the live configuration rather than a template: the sanctioned
practices could not say who received their patients' data nor which protections were on;
the product knows both (``facts``) and states them as they are *now*, a measure that is off
appearing as off. What only the controller knows (its name, its DPO, the legal basis) is
left as lines to fill. French and English: the regulator reads French, the practice's IT
provider may not.

No patient data: counts and configuration only (node AE titles and hosts, role counts,
user *counts*, hosts of backup and alert services).
"""

from __future__ import annotations

import datetime as dt

from pacsvault.documents import Document, Fields, Heading, Paragraph, Table
from pacsvault.gdpr.facts import BackupFact, Facts

LANGUAGES = ("en", "fr")
BLANK = "______________________________"

_T: dict[str, tuple[str, str]] = {
    "title": ("Record of processing activities (GDPR art. 30)",
              "Registre des activités de traitement (RGPD art. 30)"),
    "subtitle": ("Entry for the medical imaging archive {ae}, pre-filled by pacsvault from its "
                 "live configuration on {date}. Lines ____ are for the controller to fill.",
                 "Fiche de l’archive d’imagerie médicale {ae}, pré-remplie par pacsvault "
                 "d’après sa configuration en service le {date}. Les lignes ____ sont à "
                 "compléter par le responsable du traitement."),
    "controller": ("Controller", "Responsable du traitement"),
    "c.name": ("Name and address of the controller", "Nom et adresse du responsable"),
    "c.rep": ("Representative (if any)", "Représentant (le cas échéant)"),
    "c.dpo": ("Data protection officer (contact)", "Délégué à la protection des données "
              "(coordonnées)"),
    "c.joint": ("Joint controllers (if any)", "Responsables conjoints (le cas échéant)"),
    "c.created": ("Entry created on", "Fiche créée le"),
    "c.updated": ("Last updated on", "Mise à jour le"),
    "processing": ("Processing", "Traitement"),
    "p.name": ("Name", "Nom"),
    "p.name.v": ("Medical imaging archive (PACS) {ae}", "Archive d’imagerie médicale (PACS) "
                 "{ae}"),
    "p.purposes": ("Purposes", "Finalités"),
    "p.purposes.v": ("Patient care: archiving, viewing and exchanging the medical images of "
                     "the practice's patients for diagnosis and follow-up; traceability of "
                     "accesses (security of the processing).",
                     "Prise en charge des patients : archivage, consultation et échange des "
                     "images médicales des patients du cabinet pour le diagnostic et le "
                     "suivi ; traçabilité des accès (sécurité du traitement)."),
    "p.basis": ("Legal basis (to be confirmed by the controller)",
                "Base légale (à confirmer par le responsable)"),
    "p.basis.v": ("GDPR art. 6(1)(c)/(e) and art. 9(2)(h) (provision of health care) — to "
                  "be confirmed: " + BLANK,
                  "RGPD art. 6(1)(c)/(e) et art. 9(2)(h) (prise en charge sanitaire) — à "
                  "confirmer : " + BLANK),
    "people": ("Categories of data subjects", "Catégories de personnes concernées"),
    "people.patients": ("Patients of the practice (including minors)",
                        "Patients du cabinet (mineurs compris)"),
    "people.staff": ("Staff users of the archive ({n} active accounts)",
                     "Personnel utilisateur de l’archive ({n} comptes actifs)"),
    "data": ("Categories of personal data", "Catégories de données personnelles"),
    "data.health": ("Health data (GDPR art. 9): medical images and their DICOM attributes "
                    "(modality, study description, dates, body part)",
                    "Données de santé (RGPD art. 9) : images médicales et leurs attributs "
                    "DICOM (modalité, description de l’examen, dates, région anatomique)"),
    "data.identity": ("Patient identity: name, patient ID, birth date, sex, accession "
                      "number", "Identité du patient : nom, identifiant patient, date de "
                      "naissance, sexe, numéro d’examen"),
    "data.staff": ("Staff: user name, role, second-factor enrolment, sign-in and access "
                   "records with network addresses (audit trail)",
                   "Personnel : nom d’utilisateur, rôle, second facteur, traces de connexion "
                   "et d’accès avec adresses réseau (journal d’audit)"),
    "recipients": ("Recipients", "Destinataires"),
    "r.node": ("DICOM node {ae}", "Nœud DICOM {ae}"),
    "r.node.kind": ("registered device ({roles})", "appareil enregistré ({roles})"),
    "r.node.detail": ("host {host}, port {port}, {tls}", "hôte {host}, port {port}, {tls}"),
    "r.tls": ("TLS", "TLS"),
    "r.plain": ("plain DICOM (unencrypted)", "DICOM en clair (non chiffré)"),
    "r.role": ("Users with the role {role}", "Utilisateurs de rôle {role}"),
    "r.role.kind": ("internal (staff)", "interne (personnel)"),
    "r.role.detail": ("{n} active accounts", "{n} comptes actifs"),
    "r.syslog": ("Audit record collector (syslog)", "Collecteur d’audit (syslog)"),
    "r.syslog.kind": ("audit export (staff and access records)",
                      "export d’audit (traces du personnel et des accès)"),
    "r.backup": ("Backup target {name}", "Cible de sauvegarde {name}"),
    "r.backup.kind": ("encrypted backup (processor if hosted by a third party)",
                      "sauvegarde chiffrée (sous-traitant si hébergée par un tiers)"),
    "r.local": ("local disk", "disque local"),
    "r.storage": ("Object storage (S3)", "Stockage objet (S3)"),
    "r.storage.kind": ("encrypted images (processor)", "images chiffrées (sous-traitant)"),
    "r.index": ("Index database (PostgreSQL)", "Base d’index (PostgreSQL)"),
    "r.index.kind": ("index, patient columns encrypted (processor if hosted by a third "
                     "party)", "index, colonnes patient chiffrées (sous-traitant si hébergé "
                     "par un tiers)"),
    "r.mail": ("Alert e-mail", "Courriel d’alerte"),
    "r.mail.detail": ("via {host}, {n} recipients", "via {host}, {n} destinataires"),
    "r.webhook": ("Alert webhook", "Webhook d’alerte"),
    "r.alert.kind": ("security alerts (no patient data)", "alertes de sécurité (sans "
                     "données patient)"),
    "r.host": ("host {host}", "hôte {host}"),
    "r.none": ("No recipient registered", "Aucun destinataire enregistré"),
    "transfers": ("Transfers outside the European Union", "Transferts hors de l’Union "
                  "européenne"),
    "t.none": ("None: every place data goes to is this machine or a private network.",
               "Aucun : toutes les données restent sur cette machine ou sur un réseau "
               "privé."),
    "t.some": ("The product cannot tell where these services are located; the controller "
               "must verify each one (country, safeguards of GDPR art. 44-49).",
               "Le produit ne peut pas savoir où se trouvent ces services ; le responsable "
               "doit vérifier chacun (pays, garanties des art. 44 à 49 du RGPD)."),
    "t.verify": ("to be verified", "à vérifier"),
    "retention": ("Retention periods", "Durées de conservation"),
    "k.images": ("Images", "Images"),
    "k.images.v": ("{years} years after the patient's last exam; for a minor at least until "
                   "age {age}", "{years} ans après le dernier examen du patient ; pour un "
                   "mineur au moins jusqu’à {age} ans"),
    "k.modality": ("Per modality", "Par modalité"),
    "k.modality.v": ("{mod}: {years} years", "{mod} : {years} ans"),
    "k.none": ("none", "aucune"),
    "k.audit": ("Audit records", "Traces d’audit"),
    "k.audit.v": ("{days} days", "{days} jours"),
    "k.audit.why": ("{days} days (reason: {why})", "{days} jours (motif : {why})"),
    "k.backups": ("Backup snapshots", "Instantanés de sauvegarde"),
    "k.backups.v": ("{daily} daily, {weekly} weekly, {monthly} monthly, {yearly} yearly",
                    "{daily} quotidiens, {weekly} hebdomadaires, {monthly} mensuels, "
                    "{yearly} annuels"),
    "k.erasure": ("At the end of the period", "À l’échéance"),
    "k.erasure.v": ("the patient is proposed for erasure; nothing is erased without an "
                    "administrator's confirmation", "le patient est proposé à l’effacement ; "
                    "rien n’est effacé sans confirmation d’un administrateur"),
    "security": ("Security measures (GDPR art. 32), as configured now",
                 "Mesures de sécurité (RGPD art. 32), telles que configurées"),
    "on": ("on", "activé"),
    "off": ("off", "désactivé"),
    "s.rest": ("Encryption at rest", "Chiffrement au repos"),
    "s.rest.v": ("images AES-256-GCM with a key per object; index {index}",
                 "images AES-256-GCM avec une clé par objet ; index {index}"),
    "s.rest.embedded": ("encrypted (SQLCipher)", "chiffré (SQLCipher)"),
    "s.rest.postgresql": ("PostgreSQL with patient columns encrypted by pacsvault",
                          "PostgreSQL avec colonnes patient chiffrées par pacsvault"),
    "s.https": ("HTTPS (web pages, DICOMweb)", "HTTPS (pages web, DICOMweb)"),
    "s.port": ("port {port}", "port {port}"),
    "s.dicomtls": ("DICOM over TLS", "DICOM sur TLS"),
    "s.tlsany": ("port {port}; accepted from anywhere", "port {port} ; accepté de partout"),
    "s.tlslan": ("port {port}; trusted networks only", "port {port} ; réseaux de confiance "
                 "seulement"),
    "s.plain": ("Plain DICOM (unencrypted)", "DICOM en clair (non chiffré)"),
    "s.plain.v": ("port {port}; trusted networks only", "port {port} ; réseaux de confiance "
                  "seulement"),
    "s.networks": ("Access restricted to trusted networks", "Accès limité aux réseaux de "
                   "confiance"),
    "s.internet": ("Remote access from the internet (sign-in page, DICOMweb)",
                   "Accès à distance depuis internet (page de connexion, DICOMweb)"),
    "s.mfa": ("Second factor required for every account", "Second facteur exigé pour "
              "chaque compte"),
    "s.mfa.v": ("{done} of {total} active accounts enrolled (authenticator app: {totp}, "
                "passkey: {passkeys}); the others enrol at their next sign-in",
                "{done} comptes actifs sur {total} équipés (application : {totp}, clé "
                "d’accès : {passkeys}) ; les autres s’équipent à leur prochaine connexion"),
    "s.tokens": ("API tokens limited in time", "Jetons d’API limités dans le temps"),
    "s.tokens.v": ("at most {max} days; expire after {idle} days unused",
                   "{max} jours au plus ; expirent après {idle} jours sans usage"),
    "s.audit": ("Audit trail with chain verification", "Journal d’audit à chaînage vérifié"),
    "s.audit.ok": ("every access recorded; the chain verifies now",
                   "chaque accès est tracé ; la chaîne est vérifiée à l’instant"),
    "s.audit.bad": ("the chain does NOT verify now: {problem}",
                    "la chaîne NE se vérifie PAS à l’instant : {problem}"),
    "s.syslog": ("Audit export to a collector (syslog/TLS)", "Export d’audit vers un "
                 "collecteur (syslog/TLS)"),
    "s.backups": ("Backups (encrypted, restore drills)", "Sauvegardes (chiffrées, "
                  "restaurations d’essai)"),
    "s.backups.none": ("no backup target configured", "aucune cible de sauvegarde "
                       "configurée"),
    "s.backup.v": ("{name} ({where}): {state}, last backup {last}, last restore drill {drill}",
                   "{name} ({where}) : {state}, dernière sauvegarde {last}, dernière "
                   "restauration d’essai {drill}"),
    "s.never": ("never", "jamais"),
    "s.drill.ok": ("{when} (passed)", "{when} (réussie)"),
    "s.drill.bad": ("{when} (FAILED)", "{when} (ÉCHEC)"),
    "s.alerts": ("Security alerts sent to a person", "Alertes de sécurité envoyées à une "
                 "personne"),
    "s.alerts.v": ("e-mail: {mail}; webhook: {webhook}", "courriel : {mail} ; webhook : "
                   "{webhook}"),
    "s.check": ("Security self-check (pacsvault check)", "Auto-contrôle de sécurité "
                "(pacsvault check)"),
    "s.check.v": ("last run {when}: {critical} critical, {warning} warnings",
                  "dernier passage {when} : {critical} critiques, {warning} avertissements"),
    "s.check.never": ("never run", "jamais lancé"),
    "s.check.state": ("run", "lancé"),
    "footer": ("Generated by pacsvault; this export is recorded in the audit trail. It "
               "contains no patient data.",
               "Produit par pacsvault ; cet export est tracé dans le journal d’audit. Il ne "
               "contient aucune donnée patient."),
}

_HEADS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "r.head": (("Recipient", "Kind", "Details"), ("Destinataire", "Nature", "Détails")),
    "t.head": (("Service", "Host", "Outside the EU?"), ("Service", "Hôte", "Hors UE ?")),
    "s.head": (("Measure", "State", "Details"), ("Mesure", "État", "Détails")),
}

_STATES = {
    "ok": ("ok", "à jour"), "never": ("never succeeded", "jamais réussie"),
    "failing": ("failing", "en échec"), "stale": ("too old", "trop ancienne"),
    "drill-failed": ("restore drill failed", "restauration d’essai en échec"),
}
_ROLES = {"physician": ("physician", "praticien"), "admin": ("administrator",
                                                             "administrateur"),
          "auditor": ("auditor", "auditeur")}
_NODE_ROLES = {"store": ("sends", "envoie"), "query": ("queries", "interroge"),
               "retrieve": ("retrieves", "récupère")}


class _Text:
    def __init__(self, lang: str) -> None:
        if lang not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}")
        self.i = LANGUAGES.index(lang)

    def __call__(self, key: str, **values: object) -> str:
        text = _T[key][self.i]
        return text.format(**values) if values else text

    def head(self, key: str) -> tuple[str, ...]:
        return _HEADS[key][self.i]

    def pick(self, table: dict[str, tuple[str, str]], key: str) -> str:
        return table[key][self.i] if key in table else key


def _when(value: dt.datetime | None, t: _Text) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if value else t("s.never")


def _state(on: bool, t: _Text) -> str:
    return t("on") if on else t("off")


def _recipients(f: Facts, t: _Text) -> Table:
    rows: list[tuple[str, ...]] = []
    for n in f.nodes:
        roles = ", ".join(t.pick(_NODE_ROLES, r) for r in n.roles) or "-"
        rows.append((t("r.node", ae=n.ae_title), t("r.node.kind", roles=roles),
                     t("r.node.detail", host=n.host, port=n.port if n.port else "-",
                       tls=t("r.tls") if n.tls else t("r.plain"))))
    for role, count in sorted(f.roles.items()):
        rows.append((t("r.role", role=t.pick(_ROLES, role)), t("r.role.kind"),
                     t("r.role.detail", n=count)))
    if f.syslog is not None:
        rows.append((t("r.syslog"), t("r.syslog.kind"),
                     t("r.host", host=f"{f.syslog.host}:{f.syslog.detail}")))
    for b in f.backups:
        rows.append((t("r.backup", name=b.name), t("r.backup.kind"),
                     t("r.host", host=b.location) if b.location else t("r.local")))
    for e in f.endpoints:
        if e.kind == "storage":
            rows.append((t("r.storage"), t("r.storage.kind"), t("r.host", host=e.host)))
        elif e.kind == "index" and e.remote:
            rows.append((t("r.index"), t("r.index.kind"), t("r.host", host=e.host)))
    if f.mail is not None:
        rows.append((t("r.mail"), t("r.alert.kind"),
                     t("r.mail.detail", host=f.mail.host, n=f.mail.detail)))
    if f.webhook is not None:
        rows.append((t("r.webhook"), t("r.alert.kind"), t("r.host", host=f.webhook.host)))
    if not rows:
        rows.append((t("r.none"), "", ""))
    return Table(t.head("r.head"), tuple(rows))


def _transfers(f: Facts, t: _Text) -> list[Paragraph | Table]:
    remote = [e for e in f.endpoints if e.remote]
    if not remote:
        return [Paragraph(t("t.none"))]
    rows = tuple((f"{e.kind}: {e.name}", e.host, t("t.verify")) for e in remote)
    return [Paragraph(t("t.some")), Table(t.head("t.head"), rows)]


def _retention(f: Facts, t: _Text) -> Fields:
    modality = "; ".join(t("k.modality.v", mod=m, years=y)
                         for m, y in sorted(f.per_modality.items())) or t("k.none")
    audit = (t("k.audit.why", days=f.audit_retention_days, why=f.audit_justification)
             if f.audit_justification else t("k.audit.v", days=f.audit_retention_days))
    return Fields((
        (t("k.images"), t("k.images.v", years=f.retention_years, age=f.minor_until_age)),
        (t("k.modality"), modality),
        (t("k.erasure"), t("k.erasure.v")),
        (t("k.audit"), audit),
        (t("k.backups"), t("k.backups.v", **f.backup_keep)),
    ))


def _backup_line(b: BackupFact, t: _Text) -> str:
    if b.last_drill is None:
        drill = t("s.never")
    else:
        drill = t("s.drill.ok" if b.last_drill_ok else "s.drill.bad",
                  when=_when(b.last_drill, t))
    return t("s.backup.v", name=b.name, where=b.location or t("r.local"),
             state=t.pick(_STATES, b.state), last=_when(b.last_success, t), drill=drill)


def _security(f: Facts, t: _Text) -> Table:
    internet = f.remote_access == "internet"
    rows: list[tuple[str, str, str]] = [
        (t("s.rest"), t("on"), t("s.rest.v", index=t(f"s.rest.{f.index}"))),
        (t("s.https"), _state(f.https, t), t("s.port", port=f.https_port) if f.https else ""),
        (t("s.dicomtls"), _state(f.dicom_tls_port > 0, t),
         (t("s.tlsany" if f.tls_from_anywhere else "s.tlslan", port=f.dicom_tls_port)
          if f.dicom_tls_port > 0 else "")),
        (t("s.plain"), _state(f.plain_dicom, t),
         t("s.plain.v", port=f.plain_port) if f.plain_dicom else ""),
        (t("s.networks"), t("on"), ", ".join(f.trusted_networks)),
        (t("s.internet"), _state(internet, t), ""),
        (t("s.mfa"), t("on"), t("s.mfa.v", done=f.second_factor, total=f.accounts,
                                totp=f.totp, passkeys=f.passkeys)),
        (t("s.tokens"), t("on"), t("s.tokens.v", max=f.token_max_days,
                                   idle=f.token_idle_days)),
        (t("s.audit"), t("on"), t("s.audit.ok") if f.audit_ok
         else t("s.audit.bad", problem=f.audit_problem)),
        (t("s.syslog"), _state(f.syslog is not None, t),
         f"{f.syslog.host}:{f.syslog.detail}" if f.syslog is not None else ""),
        (t("s.backups"), _state(bool(f.backups), t),
         "; ".join(_backup_line(b, t) for b in f.backups) if f.backups
         else t("s.backups.none")),
        (t("s.alerts"), _state(f.mail is not None or f.webhook is not None, t),
         t("s.alerts.v", mail=_state(f.mail is not None, t),
           webhook=_state(f.webhook is not None, t))),
        (t("s.check"), t("s.check.state") if f.check else t("s.check.never"),
         t("s.check.v", when=_when(f.check.finished, t), critical=f.check.critical,
           warning=f.check.warning) if f.check else ""),
    ]
    return Table(t.head("s.head"), tuple(rows))


def document(f: Facts, lang: str = "en") -> Document:
    """The art. 30 entry for the facts ``f``, in ``lang`` ("en" or "fr")."""
    t = _Text(lang)
    date = f.now.astimezone(dt.UTC).strftime("%Y-%m-%d")
    return Document(
        title=t("title"), lang=lang, subtitle=t("subtitle", ae=f.ae_title, date=date),
        blocks=(
            Heading(t("controller")),
            Fields(((t("c.name"), BLANK), (t("c.rep"), BLANK), (t("c.dpo"), BLANK),
                    (t("c.joint"), BLANK), (t("c.created"), BLANK),
                    (t("c.updated"), date))),
            Heading(t("processing")),
            Fields(((t("p.name"), t("p.name.v", ae=f.ae_title)),
                    (t("p.purposes"), t("p.purposes.v")),
                    (t("p.basis"), t("p.basis.v")))),
            Heading(t("people")),
            Table((t("people"),), ((t("people.patients"),),
                                   (t("people.staff", n=f.accounts),))),
            Heading(t("data")),
            Table((t("data"),), ((t("data.health"),), (t("data.identity"),),
                                 (t("data.staff"),))),
            Heading(t("recipients")),
            _recipients(f, t),
            Heading(t("transfers")),
            *_transfers(f, t),
            Heading(t("retention")),
            _retention(f, t),
            Heading(t("security")),
            _security(f, t),
            Paragraph(t("footer")),
        ),
    )
