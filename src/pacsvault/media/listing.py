"""``INDEX.HTM`` and ``README.TXT`` at the root of the media: what the CD holds, readable.

Why: PS3.11's General Purpose profile names every folder of the file-set with opaque
eight-character IDs (``PT000000``), so the person holding the CD (the patient, a
colleague) needs a page that says whose images these are, which studies, and where. The
media is the patient's own identified copy: the listing shows the name, ID and dates. The
page is static HTML without scripts, escaped, in the language of whoever made it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "DICOM images", "patient": "Patient", "id": "Patient ID",
        "birth": "Birth date", "date": "Date", "description": "Description",
        "accession": "Accession number", "modality": "Modality", "images": "Images",
        "folder": "Folder", "how": "To view the images, open the DICOMDIR file at the root "
        "of this media with a DICOM viewer (most hospital and practice workstations have "
        "one). The folders have short technical names, as the DICOM standard requires.",
        "private": "These are medical images: keep this media in a safe place.",
    },
    "fr": {
        "title": "Images DICOM", "patient": "Patient", "id": "IPP",
        "birth": "Date de naissance", "date": "Date", "description": "Description",
        "accession": "N° d'accès", "modality": "Modalité", "images": "Images",
        "folder": "Dossier", "how": "Pour voir les images, ouvrez le fichier DICOMDIR à la "
        "racine de ce support avec un visualiseur DICOM (la plupart des postes des "
        "hôpitaux et cabinets en ont un). Les dossiers portent des noms techniques courts, "
        "comme l'exige la norme DICOM.",
        "private": "Ce sont des images médicales : conservez ce support en lieu sûr.",
    },
}


@dataclass
class StudyLine:
    date: str = ""
    description: str = ""
    accession: str = ""
    folder: str = ""
    modalities: set[str] = field(default_factory=set)
    images: int = 0


@dataclass
class PatientLine:
    name: str = ""
    patient_id: str = ""
    birth: str = ""
    studies: dict[str, StudyLine] = field(default_factory=dict)


class Listing:
    """Patients and studies of the media, filled one instance at a time."""

    def __init__(self) -> None:
        self.patients: dict[str, PatientLine] = {}

    def add(self, file_id: str, header: Dataset) -> None:
        parts = file_id.split("/")
        patient_key = parts[0]
        line = self.patients.setdefault(patient_key, PatientLine(
            name=str(header.get("PatientName", "") or "").replace("^", " ").strip(),
            patient_id=str(header.get("PatientID", "") or ""),
            birth=str(header.get("PatientBirthDate", "") or "")))
        study_key = "/".join(parts[:2])
        study = line.studies.setdefault(study_key, StudyLine(
            date=str(header.get("StudyDate", "") or ""),
            description=str(header.get("StudyDescription", "") or ""),
            accession=str(header.get("AccessionNumber", "") or ""), folder=study_key))
        modality = str(header.get("Modality", "") or "")
        if modality:
            study.modalities.add(modality)
        study.images += 1

    @property
    def studies(self) -> int:
        return sum(len(p.studies) for p in self.patients.values())


def _date(value: str, lang: str) -> str:
    if len(value) != 8 or not value.isdigit():
        return value
    return (f"{value[6:]}/{value[4:6]}/{value[:4]}" if lang == "fr"
            else f"{value[:4]}-{value[4:6]}-{value[6:]}")


def index_html(listing: Listing, lang: str = "fr") -> bytes:
    """The listing page (UTF-8, no script, no external resource)."""
    t = LABELS.get(lang, LABELS["en"])
    e = html.escape
    rows: list[str] = []
    for patient in listing.patients.values():
        rows.append(f"<h2>{e(t['patient'])} : {e(patient.name)}</h2>" if lang == "fr"
                    else f"<h2>{e(t['patient'])}: {e(patient.name)}</h2>")
        rows.append(f"<p>{e(t['id'])} : {e(patient.patient_id)} — {e(t['birth'])} : "
                    f"{e(_date(patient.birth, lang))}</p>")
        rows.append("<table><thead><tr>" + "".join(
            f"<th>{e(t[k])}</th>" for k in ("date", "description", "modality", "images",
                                              "accession", "folder"))
                    + "</tr></thead><tbody>")
        for study in patient.studies.values():
            cells = (_date(study.date, lang), study.description,
                     ", ".join(sorted(study.modalities)), str(study.images), study.accession,
                     study.folder)
            rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
        rows.append("</tbody></table>")
    body = "\n".join(rows)
    page = f"""<!doctype html>
<html lang="{e(lang)}">
<head><meta charset="utf-8"><title>{e(t['title'])}</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.2em .5em;text-align:left}}</style></head>
<body>
<h1>{e(t['title'])}</h1>
<p>{e(t['how'])}</p>
{body}
<p>{e(t['private'])}</p>
</body>
</html>
"""
    return page.encode("utf-8")


def readme(lang: str = "fr") -> bytes:
    """What this media is, for whoever opens it without a DICOM viewer."""
    t = LABELS.get(lang, LABELS["en"])
    text = (f"{t['title']}\n\n{t['how']}\n\nINDEX.HTM: "
            + ("la liste des examens de ce support." if lang == "fr"
               else "the list of the studies on this media.")
            + "\n\nDICOM PS3.10 / PS3.11 General Purpose profile (STD-GEN-CD, STD-GEN-USB).\n"
            + f"\n{t['private']}\n")
    return text.replace("\n", "\r\n").encode("utf-8")
