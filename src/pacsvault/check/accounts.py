"""Check section 'accounts': who can sign in, and how well that door is locked.

Why these points: a password alone was how the sanctioned practices' data leaked in other
cases (a reused password, an old colleague's account); the regulator's guide asks for a
second factor on health data, accounts closed when people leave, few administrators, and
credentials that expire. Read from the index directly (one query per table): the check
must not go through the sign-in machinery, nor record an access per user.

Options (``ctx.options``): ``dormant_days`` (default 90), ``token_unused_days`` (90),
``max_admins`` (3).

A token counts only while it still works: not expired, not revoked, and not past the idle
expiry of ``[tokens] idle_days`` (issue 19; ``accounts.tokens.lookup_token`` refuses it
then). A dead token is no standing credential, and calling it "valid" would be false.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pacsvault.accounts.models import ApiToken, Passkey, TotpSecret, User
from pacsvault.accounts.tokens import idle_since
from pacsvault.check.model import (
    CNIL_AUTH,
    CNIL_RIGHTS,
    GDPR_32_B,
    CheckContext,
    Finding,
    Localized,
    Severity,
    requirement,
)

SECTION = "accounts"
DORMANT_DAYS = 90
TOKEN_UNUSED_DAYS = 90
TOKEN_LONG_DAYS = 90  # a lifetime above this is a standing credential
MAX_ADMINS = 3
# The first admin's random password is set at ``init``: unchanged when ``password_changed``
# is within this of ``created``.
_INITIAL_SLACK = dt.timedelta(seconds=5)


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")


def check(ctx: CheckContext) -> list[Finding]:
    now = ctx.now
    dormant = dt.timedelta(days=int(ctx.options.get("dormant_days", DORMANT_DAYS)))
    unused = dt.timedelta(days=int(ctx.options.get("token_unused_days", TOKEN_UNUSED_DAYS)))
    max_admins = int(ctx.options.get("max_admins", MAX_ADMINS))
    with ctx.vault.sessions() as s:
        users = list(s.scalars(select(User).where(User.disabled.is_(False)).order_by(User.pk)))
        totp = set(s.scalars(select(TotpSecret.user_pk).where(TotpSecret.confirmed.is_(True))))
        passkeys = set(s.scalars(select(Passkey.user_pk)))
        idle_limit = dt.timedelta(days=ctx.vault.settings.tokens.idle_days)
        tokens = [(t.token_id, t.user_pk, t.created, t.expires, t.last_used)
                  for t in s.scalars(select(ApiToken).where(ApiToken.revoked.is_(None)))
                  if now - idle_since(t) < idle_limit]  # past it, the token is refused
        rows = [(u.pk, u.name, u.role_set, u.created, u.password_changed, u.last_login)
                for u in users]
    out: list[Finding] = []
    no_2fa = [name for pk, name, *_ in rows if pk not in totp and pk not in passkeys]
    if no_2fa:
        out.append(Finding(
            id="accounts.no-second-factor", section=SECTION, severity=Severity.WARNING,
            title=Localized("Users without a second factor",
                            "Utilisateurs sans second facteur"),
            requirement=requirement(GDPR_32_B, CNIL_AUTH),
            evidence=Localized(
                f"{len(no_2fa)} active account(s) have no confirmed TOTP or passkey: "
                f"{_names(no_2fa)}. Whoever first signs in with the password enrols it.",
                f"{len(no_2fa)} compte(s) actif(s) sans TOTP confirmé ni clé d’accès : "
                f"{_names(no_2fa)}. La première personne qui se connecte avec le mot de "
                "passe enrôle le second facteur."),
            fix=Localized(
                "Have each person sign in now and enrol a second factor, or disable the "
                "account ('pacsvault user disable NAME').",
                "Faites se connecter chaque personne maintenant pour enrôler son second "
                "facteur, ou désactivez le compte (« pacsvault user disable NOM »)."),
            data={"users": no_2fa}))
    idle = [name for _pk, name, _roles, created, _pc, last in rows
            if now - (last or created) > dormant]
    if idle:
        days = dormant.days
        out.append(Finding(
            id="accounts.dormant", section=SECTION, severity=Severity.WARNING,
            title=Localized("Dormant accounts", "Comptes inactifs"),
            requirement=requirement(GDPR_32_B, CNIL_RIGHTS),
            evidence=Localized(
                f"{len(idle)} active account(s) not signed in for more than {days} days: "
                f"{_names(idle)}.",
                f"{len(idle)} compte(s) actif(s) sans connexion depuis plus de {days} "
                f"jours : {_names(idle)}."),
            fix=Localized(
                "Disable the accounts of people who left or no longer need access "
                "('pacsvault user disable NAME'); re-enable them when needed.",
                "Désactivez les comptes des personnes parties ou qui n’ont plus besoin "
                "d’accès (« pacsvault user disable NOM ») ; réactivez-les au besoin."),
            data={"users": idle, "days": days}))
    admins = [name for _pk, name, roles, *_ in rows if "admin" in roles]
    if not admins:
        out.append(Finding(
            id="accounts.no-admin", section=SECTION, severity=Severity.WARNING,
            title=Localized("No active administrator", "Aucun administrateur actif"),
            requirement=requirement(GDPR_32_B, CNIL_RIGHTS),
            evidence=Localized("No enabled account has the admin role.",
                               "Aucun compte actif n’a le rôle administrateur."),
            fix=Localized(
                "Give the admin role to one named person ('pacsvault user roles NAME "
                "admin'): someone must be able to disable accounts and read alerts.",
                "Donnez le rôle administrateur à une personne nommée (« pacsvault user "
                "roles NOM admin ») : quelqu’un doit pouvoir désactiver des comptes et "
                "lire les alertes."),
            data={"admins": 0}))
    elif len(admins) > max_admins:
        out.append(Finding(
            id="accounts.many-admins", section=SECTION, severity=Severity.WARNING,
            title=Localized("Many administrators", "Nombreux administrateurs"),
            requirement=requirement(GDPR_32_B, CNIL_RIGHTS),
            evidence=Localized(
                f"{len(admins)} active administrators (more than {max_admins}): "
                f"{_names(admins)}.",
                f"{len(admins)} administrateurs actifs (plus de {max_admins}) : "
                f"{_names(admins)}."),
            fix=Localized(
                "Keep the admin role to the one or two people who run the archive; give "
                "the others the physician or auditor role.",
                "Réservez le rôle administrateur aux une ou deux personnes qui gèrent "
                "l’archive ; donnez aux autres le rôle médecin ou auditeur."),
            data={"admins": len(admins)}))
    out.extend(_tokens(tokens, {pk: name for pk, name, *_ in rows}, now, unused))
    out.extend(_initial_password(rows))
    return out


def _tokens(tokens: list[tuple[str, int, dt.datetime, dt.datetime, dt.datetime | None]],
            owners: dict[int, str], now: dt.datetime,
            unused: dt.timedelta) -> list[Finding]:
    live = [t for t in tokens if t[3] > now and t[1] in owners]
    long_lived = [tid for tid, _u, created, expires, _l in live
                  if expires - created > dt.timedelta(days=TOKEN_LONG_DAYS)]
    idle = [tid for tid, _u, created, _e, last in live if now - (last or created) > unused]
    out: list[Finding] = []
    if long_lived:
        out.append(Finding(
            id="accounts.token-long-lived", section=SECTION, severity=Severity.WARNING,
            title=Localized("API tokens that barely expire",
                            "Jetons d’API à très longue durée"),
            requirement=requirement(GDPR_32_B, CNIL_AUTH),
            evidence=Localized(
                f"{len(long_lived)} token(s) valid for more than {TOKEN_LONG_DAYS} days "
                f"after creation: {_names(long_lived)}. A stolen laptop keeps working "
                "keys that long.",
                f"{len(long_lived)} jeton(s) valable(s) plus de {TOKEN_LONG_DAYS} jours "
                f"après leur création : {_names(long_lived)}. Un portable volé garde "
                "des clés valides aussi longtemps."),
            fix=Localized(
                "Revoke them ('pacsvault token revoke ID') and issue tokens of 30 days "
                "or less, renewed by the script that uses them.",
                "Révoquez-les (« pacsvault token revoke ID ») et émettez des jetons de "
                "30 jours au plus, renouvelés par le script qui les utilise."),
            data={"tokens": long_lived}))
    if idle:
        out.append(Finding(
            id="accounts.token-unused", section=SECTION, severity=Severity.WARNING,
            title=Localized("Unused API tokens", "Jetons d’API inutilisés"),
            requirement=requirement(GDPR_32_B, CNIL_AUTH),
            evidence=Localized(
                f"{len(idle)} valid token(s) not used for more than {unused.days} days: "
                f"{_names(idle)}.",
                f"{len(idle)} jeton(s) valide(s) inutilisé(s) depuis plus de "
                f"{unused.days} jours : {_names(idle)}."),
            fix=Localized("Revoke tokens nobody uses ('pacsvault token revoke ID').",
                          "Révoquez les jetons que personne n’utilise (« pacsvault token "
                          "revoke ID »)."),
            data={"tokens": idle, "days": unused.days}))
    return out


def _initial_password(
    rows: list[tuple[int, str, frozenset[str], dt.datetime, dt.datetime, dt.datetime | None]],
) -> list[Finding]:
    """The first account (``init``'s administrator) with the password printed at setup:
    that paper or terminal scroll-back is a standing credential."""
    if not rows:
        return []
    _pk, name, roles, created, changed, _last = rows[0]
    if "admin" not in roles or abs(changed - created) > _INITIAL_SLACK:
        return []
    return [Finding(
        id="accounts.initial-password", section=SECTION, severity=Severity.WARNING,
        title=Localized("First administrator still uses the setup password",
                        "Le premier administrateur utilise encore le mot de passe initial"),
        requirement=requirement(GDPR_32_B, CNIL_AUTH),
        evidence=Localized(
            f"The password of '{name}' has not changed since the account was created at "
            "setup; it was printed on the terminal then.",
            f"Le mot de passe de « {name} » n’a pas changé depuis la création du compte à "
            "l’installation ; il a alors été affiché dans le terminal."),
        fix=Localized(
            "Change it from the account page (or 'pacsvault user reset NAME') and destroy "
            "any note of the old one.",
            "Changez-le depuis la page du compte (ou « pacsvault user reset NOM ») et "
            "détruisez toute trace de l’ancien."),
        data={"user": name})]
