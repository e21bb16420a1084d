"""The breach's documents, from the record: the notification draft (in the order of the
regulator's form), the art. 34 letter to patients, the register export (art. 33(5)).

Why built here as ``pacsvault.documents`` models: Markdown and PDF say the same thing, and
nothing here can put a patient's name or ID into them: the record's scope is read for its
counts only (the list of patients is ``breach.patients``, encrypted to a recipient).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from pacsvault.breach.labels import label, term, terms, yes_no
from pacsvault.breach.model import Breach, Scope
from pacsvault.documents import Block, Document, Fields, Heading, Paragraph, Table


def _labeller(lang: str) -> Callable[[str], str]:
    def say(key: str) -> str:
        return label(key, lang)
    return say


def _time(text: str, lang: str) -> str:
    if not text:
        return label("unknown_n", lang)
    value = dt.datetime.fromisoformat(text)
    return value.strftime("%d/%m/%Y %H:%M UTC" if lang == "fr" else "%Y-%m-%d %H:%M UTC")


def _count(value: int | None, exact: bool, lang: str) -> str:
    if value is None:
        return label("unknown_n", lang)
    return f"{value} ({label('exact' if exact else 'estimated', lang)})"


def _scope_blocks(scope: Scope | None, lang: str) -> list[Block]:
    if scope is None:
        return []
    L = _labeller(lang)
    return [Heading(L("s_scope")), Fields((
        (L("actor"), f"{term(scope.actor_kind, lang)} {scope.actor}"),
        (L("window"), f"{_time(scope.since, lang)} → {_time(scope.until, lang)}"),
        (L("patients_n"), str(len(scope.patients))),
        (L("studies_n"), str(scope.studies)),
        (L("instances_n"), str(scope.instances)),
        (L("readable_n"), str(scope.readable_patients)),
        (L("cipher_n"), str(sum(1 for p in scope.patients if p.ciphertext_only))),
        (L("records_n"), str(scope.records)),
        (L("queries_n"), str(scope.queries)),
        (L("received_n"), str(scope.received_records)),
    )), Table(("action", L("records_n")),
              tuple((a, str(n)) for a, n in scope.actions.items()))]


def _clock_text(breach: Breach, now: dt.datetime, lang: str) -> str:
    return breach.clock(now).summary(lang)


def notification_draft(breach: Breach, lang: str, now: dt.datetime) -> Document:
    """GDPR art. 33(3) in the order of the regulator's online form; counts, no names."""
    L = _labeller(lang)
    initial = breach.initial_notification()
    kind = "complementary" if initial is not None else "initial"
    blocks: list[Block] = [
        Heading(L("s_context")),
        Fields(((L("notification"), term(kind, lang)),
                (L("reference"), initial.reference if initial else ""),
                (L("clock"), _clock_text(breach, now, lang)),
                (L("deadline"), _time(breach.deadline.isoformat() if breach.deadline
                                      else "", lang)),
                (L("cross_border"), L("cross_border_value")))),
        Heading(L("s_org")),
        Fields(((L("controller"), breach.controller), (L("contact"), breach.contact))),
        Heading(L("s_time")),
        Fields(((L("aware_at"), _time(breach.aware_at, lang)),
                (L("started_at"), _time(breach.started_at, lang)),
                (L("ended_at"), _time(breach.ended_at, lang)),
                (L("ongoing"), yes_no(breach.ongoing, lang)),
                (L("detection"), term(breach.detection, lang)),
                (L("detection_ref"), breach.detection_ref),
                (L("delay_reasons"), breach.delay_reasons))),
        Heading(L("s_nature")),
        Fields(((L("title"), breach.title),
                (L("nature"), terms(breach.nature, lang)),
                (L("origin"), term(breach.origin, lang)),
                (L("circumstances"), term(breach.circumstances, lang)),
                (L("circumstances_text"), breach.circumstances_text),
                (L("systems"), breach.systems))),
        Heading(L("s_data")),
        Fields(((L("data_categories"), terms(breach.data_categories, lang)),
                (L("health_data"), yes_no(breach.health_data, lang)),
                (L("encrypted"), yes_no(breach.encrypted, lang)),
                (L("keys_compromised"), yes_no(breach.keys_compromised, lang)),
                (L("unintelligible"), yes_no(breach.unintelligible, lang)),
                (L("records_count"), _count(breach.records_count, breach.records_exact,
                                            lang)))),
        Heading(L("s_people")),
        Fields(((L("people_categories"), terms(breach.people_categories, lang)),
                (L("people_count"), _count(breach.people_count, breach.people_exact,
                                           lang)))),
        Heading(L("s_effects")),
        Fields(((L("consequences"), breach.consequences),
                (L("severity"), term(breach.severity, lang)))),
        Heading(L("s_measures")),
        Fields(((L("measures_before"), breach.measures_before),
                (L("measures_after"), breach.measures_after))),
        Heading(L("s_inform")),
        Fields(((L("art34"), term(breach.art34, lang)),
                (L("art34_reasons"), breach.art34_reasons),
                (L("patients_informed_at"), _time(breach.patients_informed_at, lang)
                 if breach.patients_informed_at else ""))),
        *_decision_blocks(breach, lang),
        *_scope_blocks(breach.scope, lang),
    ]
    return Document(title=L("draft_title"), lang=lang,
                    subtitle=f"{breach.id} v{breach.version} · {L('made')} "
                             f"{_time(now.isoformat(), lang)} · {L('draft_subtitle')}",
                    blocks=tuple(blocks))


def _decision_blocks(breach: Breach, lang: str) -> list[Block]:
    L = _labeller(lang)
    blocks: list[Block] = [
        Heading(L("s_decision")),
        Fields(((L("decision"), term(breach.decision, lang)),
                (L("decision_ground"), term(breach.decision_ground, lang)
                 if breach.decision_ground else ""),
                (L("decision_reasons"), breach.decision_reasons),
                (L("decided_at"), _time(breach.decided_at, lang) if breach.decided_at
                 else ""))),
    ]
    if breach.notifications:
        blocks.append(Table((L("kind"), L("sent_at"), L("reference")), tuple(
            (term(n.kind, lang), _time(n.sent_at, lang), n.reference)
            for n in breach.notifications)))
    return blocks


def register_export(breaches: list[Breach], lang: str, now: dt.datetime) -> Document:
    """Art. 33(5): facts, effects, remedial action and the decision with its reasons, for
    every breach, notified or not, with each dated step."""
    L = _labeller(lang)
    blocks: list[Block] = []
    for breach in breaches:
        blocks += [
            Heading(f"{breach.id} — {breach.title}"),
            Fields(((L("versions"), str(breach.version)),
                    (L("aware_at"), _time(breach.aware_at, lang)),
                    (L("started_at"), _time(breach.started_at, lang)),
                    (L("ended_at"), _time(breach.ended_at, lang)),
                    (L("clock"), _clock_text(breach, now, lang)),
                    (L("nature"), terms(breach.nature, lang)),
                    (L("origin"), term(breach.origin, lang)),
                    (L("circumstances_text"), breach.circumstances_text),
                    (L("data_categories"), terms(breach.data_categories, lang)),
                    (L("health_data"), yes_no(breach.health_data, lang)),
                    (L("people_count"), _count(breach.people_count, breach.people_exact,
                                               lang)),
                    (L("records_count"), _count(breach.records_count, breach.records_exact,
                                                lang)),
                    (L("consequences"), breach.consequences),
                    (L("severity"), term(breach.severity, lang)),
                    (L("measures_after"), breach.measures_after),
                    (L("art34"), term(breach.art34, lang)),
                    (L("art34_reasons"), breach.art34_reasons))),
            *_decision_blocks(breach, lang),
            Heading(L("steps"), 3),
            Table((L("when"), L("what"), L("by")),
                  tuple((_time(s.time, lang), s.what, s.by) for s in breach.steps)),
        ]
    return Document(title=L("register_title"), lang=lang,
                    subtitle=f"{L('made')} {_time(now.isoformat(), lang)}",
                    blocks=tuple(blocks))


def patient_letter(breach: Breach, lang: str) -> Document:
    """Art. 34(2) in plain language: what happened, what it may mean for the patient, what
    the practice did, what the patient can do, whom to ask. No name: the practice adds
    the address block when it prints the letters from the encrypted list."""
    fr = lang == "fr"
    what = terms(breach.data_categories, lang)
    paragraphs = [
        ("Madame, Monsieur," if fr else "Dear patient,"),
        (f"Le {_time(breach.aware_at, lang)}, nous avons appris qu’une personne non "
         f"autorisée a pu accéder à des données vous concernant conservées par notre "
         f"cabinet ({what}). " if fr else
         f"On {_time(breach.aware_at, lang)} we learned that someone who was not "
         f"authorised may have accessed data about you kept by our practice ({what}). ")
        + breach.circumstances_text,
        ((f"Ce que cela peut signifier pour vous : {breach.consequences}" if fr else
          f"What this may mean for you: {breach.consequences}") if breach.consequences
         else ""),
        ((f"Ce que nous avons fait : {breach.measures_after}" if fr else
          f"What we have done: {breach.measures_after}") if breach.measures_after else ""),
        ("Ce que vous pouvez faire : soyez attentif aux messages ou appels qui citeraient "
         "vos examens, ne communiquez aucun code ou mot de passe, et signalez-nous tout "
         "fait inhabituel." if fr else
         "What you can do: be wary of messages or calls that mention your examinations, "
         "never give out a code or password, and tell us about anything unusual."),
        (f"Pour toute question : {breach.contact}. Vous pouvez aussi adresser une "
         "réclamation à la CNIL (www.cnil.fr)." if fr else
         f"For any question: {breach.contact}. You may also lodge a complaint with the "
         "data protection authority (in France, the CNIL: www.cnil.fr)."),
        ("Nous vous prions de nous excuser pour cet incident." if fr else
         "We apologise for this incident."),
        breach.controller,
    ]
    return Document(title=label("letter_title", lang), lang=lang,
                    subtitle=f"{breach.id}",
                    blocks=tuple(Paragraph(p) for p in paragraphs if p))


KINDS = ("notification", "letter", "register")


def build(kind: str, breach: Breach, lang: str, now: dt.datetime,
          all_breaches: list[Breach] | None = None) -> Document:
    if kind == "notification":
        return notification_draft(breach, lang, now)
    if kind == "letter":
        return patient_letter(breach, lang)
    if kind == "register":
        return register_export(all_breaches if all_breaches is not None else [breach],
                               lang, now)
    raise ValueError(kind)
