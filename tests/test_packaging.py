"""The one namespace: cli/, pipelines/ and resources/ import as seqssm.cli, seqssm.pipelines and
seqssm.resources both when installed and from a source checkout's root (python -m seqssm.cli, torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_resolve_from_the_checkout_root_without_an_install():
    # -S: no site-packages, hence no installed or editable seqssm; only the checkout on sys.path.
    code = ("import seqssm, seqssm.cli, seqssm.pipelines, seqssm.resources; "
            "print(seqssm.cli.__file__); print(seqssm.resources.__file__)")
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cli_file, res_file = res.stdout.split()
    assert Path(cli_file) == REPO / "cli" / "__init__.py"
    assert Path(res_file) == REPO / "resources" / "__init__.py"
