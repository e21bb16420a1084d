"""OHIF's strings as a French practice reads them, added over OHIF's own French catalog.

Why an override rather than OHIF's catalog as is: OHIF 3.12's French is incomplete (toolbar
tooltips, measurement prompts fall back to English) and, where it exists, it is not the
vocabulary of a French practice: the patient ID is the "IPP", not a "Numéro DSN"; a study
is an "examen"; dates read DD/MM/YYYY and times on the 24-hour clock. The web viewer hands
these to OHIF's i18n (``i18n.addLocales``, deep merge with overwrite) as soon as it is
loaded, before any label is translated (``web/viewer_assets/app-config.js``).

Keys are OHIF's (namespace, then key, ``keySeparator`` off); only the ones to change.
"""

from __future__ import annotations

from typing import Final

Catalog = dict[str, dict[str, str]]

FRENCH: Final[Catalog] = {
    "StudyList": {
        "MRN": "IPP",
        "AccessionNumber": "N° d’accès",
        "Accession": "N° d’accès",
        "PatientName": "Nom du patient",
        "Patient Name": "Nom du patient",
        "StudyDate": "Date de l’examen",
        "Study date": "Date de l’examen",
        "StudyList": "Liste des examens",
        "Study list": "Liste des examens",
        "Studies": "Examens",
        "Number of studies": "Nombre d’examens",
        "No studies available": "Aucun examen",
        "Filter list to 100 studies or less to enable sorting":
            "Filtrez la liste à 100 examens ou moins pour pouvoir la trier",
        "Instances": "Images",
        "Upload": "Importer",
    },
    "Header": {
        "About": "À propos",
        "Back to Viewer": "Retour à la visionneuse",
        "Study list": "Liste des examens",
        "Logout": "Déconnexion",
    },
    "Common": {
        "localDateFormat": "DD/MM/YYYY",
        "localTimeFormat": "HH:mm",
        "NoStudyDate": "Pas de date d’examen",
        "StudyDate": "Date de l’examen",
        "Back": "Retour",
    },
    "SidePanel": {"Studies": "Examens"},
    "Hps": {
        "Compare Two Studies": "Comparer deux examens",
        "Compare two studies in various layouts":
            "Comparer deux examens dans différentes dispositions",
    },
    "StudyItem": {"Tracked series": "{{trackedSeries}} séries suivies"},
    "ThumbnailTracked": {
        "Series is tracked": "Série suivie",
        "Series is untracked": "Série non suivie",
        "Viewport": "Fenêtre",
    },
    "ErrorBoundary": {"in": "dans", "Stack Trace": "Pile d’appels"},
    "MeasurementTable": {
        "You have existing tracked measurements. What would you like to do with your "
        "existing tracked measurements?":
            "Des mesures sont déjà suivies. Que voulez-vous en faire ?",
        "Measurements cannot span across multiple studies. Do you want to save your "
        "tracked measurements?":
            "Les mesures ne peuvent pas porter sur plusieurs examens. Voulez-vous "
            "enregistrer les mesures suivies ?",
        "Do you want to continue tracking measurements for this study?":
            "Voulez-vous continuer à suivre les mesures de cet examen ?",
        "Do you want to open this Segmentation?": "Voulez-vous ouvrir cette segmentation ?",
        "There are unsaved measurements. Do you want to save it?":
            "Des mesures ne sont pas enregistrées. Voulez-vous les enregistrer ?",
    },
    "Buttons": {
        "Download": "Télécharger",
        "Adjust window/level presets and customize image contrast settings":
            "Préréglages de fenêtrage et réglage du contraste",
        "Zoom-in": "Zoom avant",
        "Calibration": "Calibration",
        "Data Overlay": "Superposition",
        "Configure data overlay options and manage foreground/background display sets":
            "Superposer des séries (premier plan / arrière-plan)",
        "Orientation": "Orientation",
        "Change viewport orientation between axial, sagittal, coronal and reformat planes":
            "Plan de coupe : axial, sagittal, coronal ou oblique",
        "Status": "État",
        "Navigation": "Navigation",
        "Navigate between segments/measurements and manage their visibility":
            "Parcourir les segments et mesures, et régler leur visibilité",
        "Tracking Status": "Suivi",
        "View and manage tracking status of measurements and annotations":
            "Suivi des mesures et annotations",
        "Advanced Window Level": "Fenêtrage avancé",
        "Advanced window/level settings with manual controls and presets":
            "Fenêtrage manuel et préréglages",
        "Image threshold settings": "Seuillage de l’image",
        "Opacity": "Opacité",
        "Image opacity settings": "Opacité de l’image",
        "Enable position synchronization on stack viewports":
            "Synchroniser la position entre les fenêtres",
        "Show Reference Lines": "Afficher les lignes de référence",
        "Calibration Line": "Ligne de calibration",
        "Ellipse ROI": "ROI ellipse",
        "Rectangle ROI": "ROI rectangle",
        "Circle Tool": "Cercle",
        "Point": "Point",
        "Point Tool": "Point",
        "Polygon": "Polygone",
        "Polygon Tool": "Polygone",
        "Box": "Boîte",
        "Box Tool": "Boîte",
        "Freehand Polygon": "Polygone à main levée",
        "Freehand Polygon Tool": "Polygone à main levée",
        "Freehand Line": "Ligne à main levée",
        "Freehand Line Tool": "Ligne à main levée",
        "Line": "Ligne",
        "Line Tool": "Ligne",
        "MPR": "MPR",
        "Segment Bidirectional": "Segment bidirectionnel",
        "Create new segmentation to enable shapes tool.":
            "Créez une segmentation pour utiliser les formes.",
    },
}

# English stays OHIF's, but for the 24-hour clock a practice in Europe reads.
ENGLISH: Final[Catalog] = {"Common": {"localTimeFormat": "HH:mm"}}

# OHIF's language codes for pacsvault's.
OHIF_LANGUAGE: Final[dict[str, str]] = {"fr": "fr", "en": "en-US"}


def overrides() -> dict[str, Catalog]:
    """What ``i18n.addLocales`` receives: OHIF language code -> namespace -> key -> text."""
    return {"fr": FRENCH, "en-US": ENGLISH}
