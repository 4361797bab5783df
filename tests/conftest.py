"""Shared test fixtures and markers.

Markers (declared in pyproject.toml):
  gpu      skipped unless CUDA is available;
  network  downloads from a package registry; such tests skip themselves when it is unreachable.

Downloads are cached under $SEQSSM_TEST_CACHE (default ~/.cache/seqssm-tests) and reused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAMBDA_FASTA = REPO / "resources" / "data" / "lambda_virus.fa.gz"

# anticapt 1.0 (PyPI, GPL): ships a fine-tuned HF-format HyenaDNA checkpoint (from
# LongSafari/hyenadna-tiny-1k-seqlen-hf) together with the HF modeling code it was saved with.
ANTICAPT = "anticapt==1.0"
ANTICAPT_WHEEL_SHA256 = "55c934b43b1e14bcbcc623c072386decb446ca319220d43907136f5147476404"
ANTICAPT_CHECKPOINT = "anticapt/models/dataset1/finetuned_hyenadna/"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_cache() -> Path:
    """Directory for downloads that outlive one test run."""
    root = Path(os.environ.get("SEQSSM_TEST_CACHE") or Path.home() / ".cache" / "seqssm-tests").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def pypi_wheel(test_cache):
    """fetch(requirement, sha256=None) -> path of the wheel, downloaded once with `pip download`.

    Skips the calling test when the registry cannot be reached; fails on a hash mismatch.
    """

    def fetch(requirement: str, sha256: str | None = None) -> Path:
        name, _, version = requirement.partition("==")
        dest = test_cache / "wheels"
        dest.mkdir(exist_ok=True)
        pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
        found = sorted(dest.glob(pattern))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--timeout", "30", "--retries", "1", "-d", str(dest), requirement]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"cannot download {requirement}: {e}")
            found = sorted(dest.glob(pattern))
            if res.returncode != 0 or not found:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                pytest.skip(f"cannot download {requirement} (registry unreachable?): {tail[0]}")
        wheel = found[-1]
        if sha256 is not None:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != sha256:
                wheel.unlink()
                pytest.fail(f"{wheel.name}: sha256 {digest}, expected {sha256} (deleted; rerun to download again)")
        return wheel

    return fetch


@pytest.fixture(scope="session")
def anticapt_hyenadna(pypi_wheel, test_cache) -> Path:
    """Directory of the real HF-format HyenaDNA checkpoint inside the anticapt wheel:
    config.json, pytorch_model.bin, modeling_hyena.py, configuration_hyena.py, tokenizer files."""
    target = test_cache / "anticapt-1.0" / "finetuned_hyenadna"
    if not (target / "pytorch_model.bin").is_file():
        wheel = pypi_wheel(ANTICAPT, sha256=ANTICAPT_WHEEL_SHA256)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with zipfile.ZipFile(wheel) as z:
                for member in z.infolist():
                    rel = member.filename[len(ANTICAPT_CHECKPOINT):]
                    if member.filename.startswith(ANTICAPT_CHECKPOINT) and rel and "/" not in rel:
                        (tmp / rel).write_bytes(z.read(member))
            if not (tmp / "pytorch_model.bin").is_file():
                pytest.fail(f"{wheel.name}: no {ANTICAPT_CHECKPOINT}pytorch_model.bin inside")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_fasta_gz(path: Path) -> dict[str, str]:
    """Minimal FASTA reader for tests: name -> uppercase sequence."""
    records: dict[str, list[str]] = {}
    name = None
    with gzip.open(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                name = line[1:].split()[0]
                records[name] = []
            elif line and name is not None:
                records[name].append(line.upper())
    return {k: "".join(v) for k, v in records.items()}


@pytest.fixture(scope="session")
def lambda_genome() -> str:
    """The phage lambda genome (48,502 bp), from resources/data/lambda_virus.fa.gz."""
    (seq,) = read_fasta_gz(LAMBDA_FASTA).values()
    return seq


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one CPU thread (and do not slow to a crawl on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def error_line(res) -> str:
    """The one line of a user error from a CliRunner result: a non-zero exit, and stderr holds
    exactly that line, starting with "error:", and no traceback."""
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in res.output
    return lines[0]


# A tiny S4 chemical LM for CPU tests of the molecule commands.
TINY_CHEM = ["--d-model", "32", "--n-blocks", "1", "--d-state", "8", "--dropout", "0.0", "--batch-size", "64",
             "--device", "cpu", "--seed", "0", "-q"]


def nci_smiles(n: int) -> list[str]:
    """The first `n` NCI compounds RDKit ships (rdkit/Data/NCI/first_5K.smi) that it parses and that
    are under 70 characters: real molecules for the chemistry tests."""
    from rdkit import Chem, RDConfig

    out = []
    for line in (Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi").read_text().splitlines():
        s = line.split()[0] if line.strip() else ""
        if s and Chem.MolFromSmiles(s) is not None and len(s) < 70:
            out.append(s)
        if len(out) >= n:
            break
    return out


@pytest.fixture(scope="module")
def nci_file(tmp_path_factory, request) -> Path:
    """A .smi file of nci_smiles(N), N = the test module's NCI_MOLECULES (default 1200)."""
    p = tmp_path_factory.mktemp("nci") / "nci.smi"
    p.write_text("\n".join(nci_smiles(getattr(request.module, "NCI_MOLECULES", 1200))) + "\n")
    return p
