"""Every user-facing string of the web pages, in one place (French comes later: add a
catalogue with the same keys and pick it from ``Accept-Language``).

Sign-in messages stay generic on purpose: they never say whether the user name, the
password or the code was wrong, nor whether an account or an address is throttled.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

EN: Final = MappingProxyType({
    "app": "pacsvault",
    "lang": "en",
    # sign-in
    "sign_in": "Sign in",
    "user_name": "User name",
    "password": "Password",
    "login_failed": "Wrong user name, password or code.",
    "throttled": "Too many attempts. Wait {seconds} s before trying again.",
    "locked": ("Too many failed attempts: signing in is blocked for now. Try again later, "
               "or ask your administrator to unlock the account."),
    "form_expired": "This form has expired: reload the page and try again.",
    "sign_in_expired": "The sign-in has expired: please start again.",
    "second_factor": "Second factor",
    "second_factor_help": ("Type the 6-digit code of your authenticator app, or one of your "
                           "recovery codes."),
    "code": "Code",
    "verify": "Verify",
    "start_again": "Start again",
    "enrol": "Set up your second factor",
    "enrol_help": ("A second factor is required for every account. Scan this QR code with an "
                   "authenticator app (FreeOTP, Aegis, Google or Microsoft Authenticator...), "
                   "then type the 6-digit code it shows."),
    "enrol_secret": "If you cannot scan, type this key into the app:",
    "recovery_codes": "Your recovery codes",
    "recovery_help": ("Each code lets you sign in once if you lose your phone. Write them "
                      "down or print them now and keep them somewhere safe: they will not "
                      "be shown again."),
    "recovery_left": ("You signed in with a recovery code; {left} left. Make new ones on "
                      "your account page if you are running low."),
    "continue": "Continue",
    "sign_out": "Sign out",
    # account
    "account": "Your account",
    "roles": "Roles",
    "change_password": "Change your password",
    "current_password": "Current password",
    "new_password": "New password",
    "repeat_password": "New password again",
    "password_advice": ("No forced character kinds: a phrase of several words is long enough "
                        "and easy to remember."),
    "save": "Save",
    "password_mismatch": "The two new passwords differ.",
    "password_wrong": "The current password is wrong.",
    "new_codes": "Make new recovery codes",
    "new_codes_help": "The old codes stop working at once.",
    "codes_left": "Recovery codes left",
    "tokens": "API tokens",
    "tokens_help": ("Tokens let a viewer application or a script use DICOMweb as you. An "
                    "administrator creates them with 'pacsvault token create'."),
    "no_tokens": "No token.",
    "token": "Token",
    "label": "Label",
    "created": "Created",
    "expires": "Expires",
    "last_used": "Last used",
    "status": "Status",
    "revoke": "Revoke",
    "active": "active",
    "revoked": "revoked",
    "expired": "expired",
    "sign_ins": "Recent sign-ins",
    "no_sign_ins": "None recorded recently.",
    "time": "Time",
    "address": "Address",
    "outcome": "Outcome",
    "never": "never",
    "signed_in": "signed in",
    "failed": "failed",
    "locked_out": "account locked",
    "signed_out": "signed out",
    "notice_password": "Your password was changed. Your other sessions were signed out.",
    "notice_token": "The token was revoked.",
    # administration
    "users": "Users",
    "add_user": "Add a user",
    "add": "Add",
    "second_factor_short": "2nd factor",
    "last_login": "Last sign-in",
    "disabled": "disabled",
    "locked_short": "locked",
    "enrolled": "enrolled",
    "not_enrolled": "not yet",
    "disable": "Disable",
    "enable": "Enable",
    "unlock": "Unlock",
    "reset": "New password",
    "reset_second_factor": "also a new second factor",
    "user_created": ("User {name} was created. Give them this password in person; it is "
                     "shown only once, and they set up their second factor at first sign-in:"),
    "password_reset": ("New password for {name}, shown only once. Give it to them in "
                       "person:"),
    "second_factor_reset": "They will set up a new second factor at their next sign-in.",
    "back": "Back",
    "cannot_disable_self": "You cannot disable your own account.",
    # audit trail (auditors)
    "audit": "Audit trail",
    "audit_patient": "Patient ID",
    "audit_study": "Study Instance UID",
    "audit_node": "Node (AE title)",
    "audit_action": "Action",
    "audit_since": "Since (UTC, ISO date)",
    "audit_until": "Until (UTC, ISO date)",
    "audit_search": "Search",
    "audit_who": "Who",
    "audit_details": "Details",
    "audit_studies": "Studies",
    "audit_count": "{shown} of {total} matching records, newest first.",
    "audit_bad_date": "Dates must be ISO dates, such as 2024-01-31 or 2024-01-31T08:00.",
    # errors
    "error": "Error",
    "error_400": "The request is not valid.",
    "error_401": "Please sign in.",
    "error_403": "You are not allowed to do this.",
    "error_404": "Not found.",
    "error_405": "Not allowed here.",
    "error_413": "The request is too large.",
    "error_429": "Too many requests. Try again later.",
    "error_500": "Something went wrong. The problem was recorded.",
    "error_other": "The request could not be completed.",
    # passkeys (WebAuthn)
    "passkeys": "Passkeys",
    "passkeys_help": ("A passkey (a security key, or the fingerprint or face unlock of this "
                      "device) can replace the authenticator app's code when you sign in."),
    "use_passkey": "Use a passkey",
    "add_passkey": "Add a passkey",
    "passkey_label": "Name of the passkey",
    "no_passkeys": "No passkey registered.",
    "remove": "Remove",
    "notice_passkey": "The passkey was removed.",
    "passkey_refused": "The passkey could not be used.",
})

Catalogue = MappingProxyType[str, str]


def catalogue(accept_language: str = "") -> Catalogue:
    """The strings for a request (English only for now)."""
    return EN
