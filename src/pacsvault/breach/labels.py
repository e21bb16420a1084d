"""The breach documents' words in French and English: item labels and vocabularies.

Why here and not in the web catalogs: the documents are made by the command line too (no
web request, no gettext domain), and a DPO sends the French text to the regulator; each
item is said once per language and shared by the documents and the web pages.
"""

from __future__ import annotations

_EN: dict[str, str] = {
    # items, in the order of the regulator's form
    "notification": "Type of notification", "controller": "Controller (the practice)",
    "contact": "Data protection officer or other contact point (art. 33(3)(b))",
    "title": "Short description", "aware_at": "Time of awareness",
    "started_at": "Start of the breach", "ended_at": "End of the breach",
    "ongoing": "Breach still ongoing", "detection": "How the breach was detected",
    "detection_ref": "Reference of the detection (alert, finding)",
    "nature": "Nature of the breach (art. 33(3)(a))", "origin": "Origin",
    "circumstances": "Circumstances", "circumstances_text": "Description of the circumstances",
    "systems": "Systems and media involved",
    "data_categories": "Categories of personal data (art. 33(3)(a))",
    "health_data": "Health data (special category, art. 9)",
    "encrypted": "Data encrypted", "keys_compromised": "Encryption keys compromised",
    "unintelligible": "Data unintelligible to the recipient (art. 34(3)(a))",
    "people_count": "Approximate number of people concerned (art. 33(3)(a))",
    "records_count": "Approximate number of records concerned (art. 33(3)(a))",
    "people_categories": "Categories of people concerned",
    "people_exact": "Number of people exact (not estimated)",
    "records_exact": "Number of records exact (not estimated)",
    "consequences": "Likely consequences (art. 33(3)(c))", "severity": "Severity",
    "measures_before": "Measures in place before the breach",
    "measures_after": "Measures taken or proposed (art. 33(3)(d))",
    "decision": "Decision on notifying the authority",
    "decision_ground": "Ground for not notifying", "decision_reasons": "Reasons",
    "decided_at": "Decision recorded on", "notifications": "Notifications to the authority",
    "delay_reasons": "Reasons for the delay (art. 33(1))",
    "art34": "Information of the people concerned (art. 34)",
    "art34_reasons": "Reasons", "patients_informed_at": "People informed on",
    "clock": "72-hour clock", "deadline": "Deadline (72 h after awareness)",
    "scope": "Scope computed from the audit trail", "actor": "Actor",
    "window": "Window", "patients_n": "Patients", "studies_n": "Studies",
    "instances_n": "Instances (records)", "readable_n": "Patients whose data left readable",
    "cipher_n": "Patients whose data left only as ciphertext",
    "records_n": "Trail records of the actor", "queries_n": "Queries",
    "received_n": "Data received from the actor (records)", "steps": "Dated steps",
    "versions": "Version", "yes": "yes", "no": "no", "exact": "exact",
    "estimated": "estimated", "unknown_n": "not known yet", "none": "none",
    "reference": "Reference", "sent_at": "Sent on", "kind": "Kind",
    "when": "When", "what": "What", "by": "By",
    "cross_border": "Cross-border processing",
    "cross_border_value": "no (a single practice in one member state)",
    # document titles
    "draft_title": "Personal data breach: notification draft",
    "draft_subtitle": ("GDPR art. 33, in the order of the regulator's online form. Counts "
                       "and categories only: the list of patients is a separate, encrypted "
                       "export."),
    "register_title": "Register of personal data breaches (GDPR art. 33(5))",
    "notification_doc": "Notification draft", "letter_doc": "Letter to patients (art. 34)",
    "register_doc": "Register entry (art. 33(5))",
    "letter_title": "Information about a personal data breach",
    "made": "Made on",
    "s_context": "1. Notification", "s_org": "2. Organisation", "s_time": "3. Timeline",
    "s_nature": "4. Nature and circumstances", "s_data": "5. Data concerned",
    "s_people": "6. People concerned", "s_effects": "7. Likely consequences",
    "s_measures": "8. Measures", "s_inform": "9. Information of the people",
    "s_decision": "10. Decision and notifications", "s_scope": "Annex: scope from the trail",
}

_FR: dict[str, str] = {
    "notification": "Type de notification", "controller": "Responsable du traitement (le cabinet)",
    "contact": "Délégué à la protection des données ou autre point de contact (art. 33(3)(b))",
    "title": "Description courte", "aware_at": "Date de prise de connaissance",
    "started_at": "Début de la violation", "ended_at": "Fin de la violation",
    "ongoing": "Violation toujours en cours", "detection": "Moyen de découverte",
    "detection_ref": "Référence de la découverte (alerte, constat)",
    "nature": "Nature de la violation (art. 33(3)(a))", "origin": "Origine",
    "circumstances": "Circonstances", "circumstances_text": "Description des circonstances",
    "systems": "Systèmes et supports concernés",
    "data_categories": "Catégories de données personnelles (art. 33(3)(a))",
    "health_data": "Données de santé (catégorie particulière, art. 9)",
    "encrypted": "Données chiffrées", "keys_compromised": "Clés de chiffrement compromises",
    "unintelligible": "Données incompréhensibles pour le destinataire (art. 34(3)(a))",
    "people_count": "Nombre approximatif de personnes concernées (art. 33(3)(a))",
    "records_count": "Nombre approximatif d’enregistrements concernés (art. 33(3)(a))",
    "people_categories": "Catégories de personnes concernées",
    "people_exact": "Nombre de personnes exact (non estimé)",
    "records_exact": "Nombre d’enregistrements exact (non estimé)",
    "consequences": "Conséquences probables (art. 33(3)(c))", "severity": "Gravité",
    "measures_before": "Mesures en place avant la violation",
    "measures_after": "Mesures prises ou envisagées (art. 33(3)(d))",
    "decision": "Décision de notifier l’autorité",
    "decision_ground": "Motif de non-notification", "decision_reasons": "Justification",
    "decided_at": "Décision enregistrée le", "notifications": "Notifications à l’autorité",
    "delay_reasons": "Motifs du retard (art. 33(1))",
    "art34": "Information des personnes concernées (art. 34)",
    "art34_reasons": "Justification", "patients_informed_at": "Personnes informées le",
    "clock": "Délai de 72 heures", "deadline": "Échéance (72 h après la prise de connaissance)",
    "scope": "Périmètre calculé depuis la trace d’audit", "actor": "Acteur",
    "window": "Période", "patients_n": "Patients", "studies_n": "Examens",
    "instances_n": "Instances (enregistrements)",
    "readable_n": "Patients dont les données sont sorties lisibles",
    "cipher_n": "Patients dont les données ne sont sorties que chiffrées",
    "records_n": "Enregistrements de la trace pour cet acteur", "queries_n": "Recherches",
    "received_n": "Données reçues de l’acteur (enregistrements)", "steps": "Étapes datées",
    "versions": "Version", "yes": "oui", "no": "non", "exact": "exact",
    "estimated": "estimé", "unknown_n": "pas encore connu", "none": "aucune",
    "reference": "Référence", "sent_at": "Envoyée le", "kind": "Type",
    "when": "Quand", "what": "Quoi", "by": "Par",
    "cross_border": "Traitement transfrontalier",
    "cross_border_value": "non (un seul cabinet dans un seul État membre)",
    "draft_title": "Violation de données personnelles : projet de notification",
    "draft_subtitle": ("RGPD art. 33, dans l’ordre du téléservice de l’autorité. Nombres et "
                       "catégories seulement : la liste des patients est un export séparé, "
                       "chiffré."),
    "register_title": "Registre des violations de données personnelles (RGPD art. 33(5))",
    "notification_doc": "Projet de notification", "letter_doc": "Lettre aux patients (art. 34)",
    "register_doc": "Fiche du registre (art. 33(5))",
    "letter_title": "Information sur une violation de vos données personnelles",
    "made": "Établi le",
    "s_context": "1. Notification", "s_org": "2. Organisme", "s_time": "3. Chronologie",
    "s_nature": "4. Nature et circonstances", "s_data": "5. Données concernées",
    "s_people": "6. Personnes concernées", "s_effects": "7. Conséquences probables",
    "s_measures": "8. Mesures", "s_inform": "9. Information des personnes",
    "s_decision": "10. Décision et notifications", "s_scope": "Annexe : périmètre d’après la trace",
}

_VOCAB_EN: dict[str, str] = {
    "confidentiality": "loss of confidentiality", "integrity": "loss of integrity",
    "availability": "loss of availability",
    "internal-malicious": "internal, malicious act", "internal-accidental":
    "internal, accidental act", "external-malicious": "external, malicious act",
    "external-accidental": "external, accidental act", "unknown": "unknown",
    "lost-stolen-device": "lost or stolen device", "unauthorised-access":
    "unauthorised access (account or token used by someone else)", "hacking": "hacking",
    "malware": "malware", "misdirected-sending": "data sent to the wrong recipient",
    "accidental-publication": "data published by mistake",
    "exposed-service": "service exposed on the Internet", "other": "other",
    "identity": "identity", "health": "health data", "images": "medical images",
    "contact": "contact details", "social-security": "social security number",
    "credentials": "credentials",
    "patients": "patients", "minors": "minors", "staff": "staff",
    "negligible": "negligible", "limited": "limited", "significant": "significant",
    "maximum": "maximum",
    "notify": "notify the authority", "not-notify": "do not notify",
    "": "not decided yet", "unlikely-risk": "the breach is unlikely to result in a risk",
    "authority-aware": ("the authority already knows (it informed us itself: Conseil "
                        "d'État n° 449694)"),
    "inform": "inform the people concerned",
    "exempt-unintelligible": "exempt: data unintelligible (encrypted, keys safe; art. 34(3)(a))",
    "exempt-subsequent-measures": "exempt: measures taken make the high risk unlikely "
                                  "(art. 34(3)(b))",
    "exempt-disproportionate": "exempt: disproportionate effort, public communication "
                               "instead (art. 34(3)(c))",
    "not-required": "not required: no high risk",
    "alert": "a pacsvault alert", "self-check": "the pacsvault security self-check",
    "user-report": "reported by a user", "patient-complaint": "a patient's complaint",
    "authority": "the authority", "third-party": "a third party",
    "initial": "initial", "complementary": "complementary",
    "token": "API token", "user": "user", "node": "DICOM node", "address": "address",
}

_VOCAB_FR: dict[str, str] = {
    "confidentiality": "perte de confidentialité", "integrity": "perte d’intégrité",
    "availability": "perte de disponibilité",
    "internal-malicious": "acte interne malveillant", "internal-accidental":
    "acte interne accidentel", "external-malicious": "acte externe malveillant",
    "external-accidental": "acte externe accidentel", "unknown": "inconnue",
    "lost-stolen-device": "appareil perdu ou volé", "unauthorised-access":
    "accès non autorisé (compte ou jeton utilisé par un tiers)", "hacking": "piratage",
    "malware": "logiciel malveillant", "misdirected-sending":
    "données envoyées au mauvais destinataire",
    "accidental-publication": "données publiées par erreur",
    "exposed-service": "service exposé sur Internet", "other": "autre",
    "identity": "identité", "health": "données de santé", "images": "images médicales",
    "contact": "coordonnées", "social-security": "numéro de sécurité sociale",
    "credentials": "identifiants",
    "patients": "patients", "minors": "mineurs", "staff": "personnel",
    "negligible": "négligeable", "limited": "limitée", "significant": "importante",
    "maximum": "maximale",
    "notify": "notifier l’autorité", "not-notify": "ne pas notifier",
    "": "pas encore décidé", "unlikely-risk": "la violation n’est pas susceptible "
    "d’engendrer un risque",
    "authority-aware": ("l’autorité en a déjà connaissance (elle nous en a informés : "
                        "Conseil d’État n° 449694)"),
    "inform": "informer les personnes concernées",
    "exempt-unintelligible": "dispense : données incompréhensibles (chiffrées, clés sûres ; "
                             "art. 34(3)(a))",
    "exempt-subsequent-measures": "dispense : mesures ultérieures rendant le risque élevé "
                                  "improbable (art. 34(3)(b))",
    "exempt-disproportionate": "dispense : efforts disproportionnés, communication "
                               "publique à la place (art. 34(3)(c))",
    "not-required": "non requise : pas de risque élevé",
    "alert": "une alerte de pacsvault", "self-check": "l’autocontrôle de sécurité de pacsvault",
    "user-report": "signalé par un utilisateur", "patient-complaint": "plainte d’un patient",
    "authority": "l’autorité", "third-party": "un tiers",
    "initial": "initiale", "complementary": "complémentaire",
    "token": "jeton d’API", "user": "utilisateur", "node": "nœud DICOM", "address": "adresse",
}


def label(key: str, lang: str) -> str:
    return (_FR if lang == "fr" else _EN).get(key, _EN.get(key, key))


def term(value: str, lang: str) -> str:
    return (_VOCAB_FR if lang == "fr" else _VOCAB_EN).get(value, value)


def terms(values: list[str], lang: str) -> str:
    return ", ".join(term(v, lang) for v in values) or label("none", lang)


def yes_no(value: bool, lang: str) -> str:
    return label("yes" if value else "no", lang)
