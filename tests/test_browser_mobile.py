"""Phones and tablets, in a real Chromium (issue 20, item 3).

At a phone's 390 x 844 every pacsvault page (sign-in, account, users, Health, audit) and
OHIF's study list fit the width (no sideways scroll: wide tables scroll inside their own
box, the navigation wraps) and the study list still shows who, when and what (patient
name, date, modality). On a tablet, portrait and landscape, the viewer's toolbar buttons
overlap neither each other nor the image. One server, one browser, one signed-in user
holding the three roles, so one sign-in reaches every page.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import browser_data
from tests.browser import ErrorLog, first_sign_in, new_page, shot, wait_for_image
from tests.browser import browser_fixture as browser_fixture  # fixture 'browser'
from tests.helpers import make_vault, start_server, storescu
from tests.web_helpers import write_secret

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHONE = (390, 844)
TABLETS = ((820, 1180), (1180, 820), (1024, 768))
USER, PASSWORD = "drmartin", "un café serré avant la vacation 2031"
PATIENT_NAME = "Lefebvre, Camille"

# What overflows the page's width, for a failure message worth reading: the deepest
# elements whose right edge passes the window's.
_WIDE = """() => {
  const w = window.innerWidth, out = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (r.right > w + 1 && r.width > 0 && !e.querySelector('*')) {
      out.push(`${e.tagName.toLowerCase()}.${e.className}`.slice(0, 80) + ` right=${r.right}`);
    }
  }
  return out.slice(0, 8);
}"""
# The boxes, from an element up to its table cell, whose content is wider than they are.
_CUT = """(e) => {
  const out = [];
  for (; e && e.tagName !== 'TR'; e = e.parentElement) {
    if (e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0) {
      out.push(`${e.tagName.toLowerCase()} ${e.scrollWidth} > ${e.clientWidth}`);
    }
  }
  return out;
}"""


@dataclass
class Site:
    base: str
    study: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("mobile")
    vault = make_vault(root)
    vault.add_node("MODALITY")
    secret = write_secret(root / "user.pw", PASSWORD + "\n")
    vault.cli("user", "add", USER, "--role", "physician", "--role", "admin",
              "--role", "auditor", "--password-file", secret)
    server = start_server(vault)
    try:
        ct = browser_data.knee_ct(root / "ct", count=3, size=96)
        result = storescu(server.port, ct.files, calling="MODALITY")
        assert result.returncode == 0, result.stderr
        yield Site(f"https://localhost:{server.https_port}", ct.study_uid)
    finally:
        server.stop()


@dataclass
class Phone:
    page: Any
    errors: ErrorLog


@pytest.fixture(scope="module")
def phone(site: Site, browser: Any) -> Iterator[Phone]:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors, viewport=PHONE)
    page.goto(site.base + "/login")
    _fits(page, "mobile-login")
    first_sign_in(page, site.base, USER, PASSWORD)
    yield Phone(page, errors)
    page.context.close()


def _fits(page: Any, name: str) -> None:
    shot(page, name)
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width <= inner, f"{page.url} scrolls sideways ({width} > {inner}): " + \
        "; ".join(page.evaluate(_WIDE))


def _clean(errors: ErrorLog) -> None:
    assert errors.entries == [], "\n".join(errors.entries)


@pytest.mark.parametrize("path", ["/account", "/account/media", "/admin/users", "/admin/nodes",
                                  "/admin/health", "/admin/record-of-processing", "/audit"])
def test_pacsvault_pages_fit_a_phone(site: Site, phone: Phone, path: str) -> None:
    page = phone.page
    page.goto(site.base + path)
    page.locator("main h1").first.wait_for()
    _fits(page, "mobile" + path.replace("/", "-"))
    if path == "/admin/users":  # one block per user: every value in sight, none scrolled
        for cell in page.locator("#users td").all():
            box = cell.bounding_box()
            assert box is not None and box["x"] + box["width"] <= PHONE[0] + 1, box
    # The navigation wraps: every link of it is inside the window.
    for link in page.locator("header nav a").all():
        box = link.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0] + 1, \
            (link.inner_text(), box)
    _clean(phone.errors)


def _readable(found: Any) -> None:
    """Visible, inside the window, and not cut (OHIF truncates with an ellipsis: the text
    and every box up to its cell show all of it)."""
    assert found.is_visible()
    box = found.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0] + 1, box
    assert found.evaluate(_CUT) == [], found.evaluate(_CUT)


def test_study_list_on_a_phone(site: Site, phone: Phone) -> None:
    page = phone.page
    page.goto(site.base + "/")
    row = page.locator(f"[data-cy='{site.study}']").first
    row.wait_for()
    _fits(page, "mobile-study-list")
    today = dt.date.today().strftime("%d/%m/%Y")
    for text in (PATIENT_NAME, today, "CT", "GENOU DROIT"):
        _readable(row.get_by_text(text, exact=True).first)
    # The filters a secretary types into are there, inside the window.
    for cy in ("input-patientName", "input-mrn", "input-date-range-start"):
        _readable(page.locator(f"[data-cy='{cy}']").first)
    # An opened study (its series, the viewer's button) does not widen the page either.
    row.get_by_text(PATIENT_NAME, exact=True).first.click()
    button = page.locator(f"[data-cy='mode-viewer-{site.study}']").first
    button.wait_for()
    _fits(page, "mobile-study-list-open")
    box = button.bounding_box()
    assert box is not None and box["x"] + box["width"] <= PHONE[0] + 1, box
    _clean(phone.errors)


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    """More than a pixel of common area (borders may touch)."""
    dx = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    dy = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    return dx > 1 and dy > 1


@pytest.mark.parametrize("viewport", TABLETS, ids=["portrait", "landscape", "ipad-landscape"])
def test_viewer_toolbar_on_a_tablet(site: Site, phone: Phone,
                                    viewport: tuple[int, int]) -> None:
    page = phone.page
    page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
    try:
        page.goto(f"{site.base}/viewer?StudyInstanceUIDs={site.study}")
        wait_for_image(page)
        shot(page, f"tablet-viewer-{viewport[0]}x{viewport[1]}")
        buttons = [b for b in page.locator(
            "[data-cy='pacsvault-practice'], .bg-secondary-dark button").all()
            if b.is_visible()]
        boxes = [(b.get_attribute("data-cy") or b.inner_text() or "?", b.bounding_box())
                 for b in buttons]
        assert len(boxes) >= 5, boxes
        image = page.locator("canvas.cornerstone-canvas").first.bounding_box()
        assert image is not None
        # The whole image is on the screen, however many rows the header took.
        assert image["y"] + image["height"] <= viewport[1] + 1, (image, viewport)
        for i, (name, box) in enumerate(boxes):
            assert box is not None
            assert box["x"] >= 0 and box["x"] + box["width"] <= viewport[0] + 1, (name, box)
            assert not _overlap(box, image), (name, box, image)
            for other, box2 in boxes[i + 1:]:
                assert box2 is not None
                assert not _overlap(box, box2), (name, box, other, box2)
        _fits(page, f"tablet-viewer-fit-{viewport[0]}")
    finally:
        page.set_viewport_size({"width": PHONE[0], "height": PHONE[1]})
    _clean(phone.errors)
