"""The Kamailio modules scripts/build-kamailio-modules.sh builds are the ones this tree
asks for: the patched dialog module that kamailio.cfg loads was built from this very patch
and from the kamailio Debian installed (a stale module would bring back the one-sided BYE
at the dialog timeout that the patch fixes, kamailio/patches/dialog-bye-both-legs.patch)."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest

from tests.e2e.conftest import CFG, PATCHED_DIALOG, ROOT

pytestmark = pytest.mark.e2e

PATCH = ROOT / "kamailio" / "patches" / "dialog-bye-both-legs.patch"


def test_kamailio_cfg_loads_the_patched_dialog_module() -> None:
    text = CFG.read_text()
    default = re.search(r'^#!trydef DIALOG_MODULE "([^"]+)"$', text, re.M)
    assert default is not None and default.group(1) == str(PATCHED_DIALOG)
    assert re.search(r"^loadmodule DIALOG_MODULE$", text, re.M)
    assert not re.search(r'^loadmodule "dialog\.so"', text, re.M)


def test_patched_dialog_module_is_built_from_this_patch() -> None:
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "kamailio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    digest = hashlib.sha256(PATCH.read_bytes()).hexdigest()
    stamp = PATCHED_DIALOG.with_name("dialog.so.stamp").read_text().strip()
    assert stamp == f"kamailio {version}, patch {digest}", (
        "the installed dialog module is not built from this tree's patch: run `make deps`"
    )
