"""The de-identification codes written out in ``deidentify/options`` are CID 7050's, as
pydicom's code dictionary has them, and no server process imports that dictionary
(issue 17: it cost every worker ~15 MB of resident memory for five codes)."""

from __future__ import annotations

import subprocess
import sys

from pacsvault.deidentify import options


def test_the_written_out_codes_are_pydicoms_cid_7050() -> None:
    from pydicom.sr.codedict import codes

    cid = codes.cid7050
    expected = {
        options.MODIFIED_DATES: cid.RetainLongitudinalTemporalInformationModifiedDatesOption,
        options.PATIENT_CHARACTERISTICS: cid.RetainPatientCharacteristicsOption,
        options.DEVICE_IDENTITY: cid.RetainDeviceIdentityOption,
        options.CLEAN_DESCRIPTORS: cid.CleanDescriptorsOption,
    }
    assert set(options.OPTIONS) == set(expected)
    for name, code in expected.items():
        assert code.scheme_designator == "DCM"
        assert (options.OPTIONS[name].code_value, options.OPTIONS[name].meaning) == (
            code.value, code.meaning)
    basic = cid.BasicApplicationConfidentialityProfile
    assert (basic.value, basic.meaning) == options.BASIC_CODE


def test_the_server_stack_does_not_import_the_code_dictionary() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, pacsvault.cli.serve, pacsvault.dicom.server, "
         "pacsvault.web.app; print(sorted(m for m in sys.modules if m.startswith('pydicom.sr')))"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
