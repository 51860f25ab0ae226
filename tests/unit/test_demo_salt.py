"""The synthetic cohort's public salt: the demo's pseudonyms, hence its patient split and
results, repeat on every machine; real data never gets that salt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from medimg import stages
from medimg.config import Params
from medimg.dicom.deid import DEMO_SALT, Pseudonymizer, load_or_create_salt
from medimg.errors import ConfigError
from tests.helpers import TINY_SYNTH

SMALL = TINY_SYNTH.model_copy(update={"n_patients": 3, "matrix": 32})


def _demo(root: Path) -> Params:
    root.mkdir(parents=True)
    params = Params(synth=SMALL)
    stages.synth(params, root)
    return params


def test_synth_writes_the_public_salt_and_ingest_repeats_on_another_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDIMG_SALT", raising=False)
    manifests = []
    for clone in ("a", "b"):
        params = _demo(tmp_path / clone)
        salt = tmp_path / clone / params.ingest.salt_file
        assert salt.read_text().strip() == DEMO_SALT and salt.stat().st_mode & 0o077 == 0
        stages.ingest(params, tmp_path / clone)
        manifests.append(
            pd.read_parquet(tmp_path / clone / params.data.interim / "manifest.parquet")
        )
    a, b = manifests
    assert len(a) >= 3 and a["key"].tolist() == b["key"].tolist()
    assert a["patient"].tolist() == b["patient"].tolist()
    public = Pseudonymizer(DEMO_SALT.encode())
    assert set(a["patient"]) <= {public.key("patient", f"{p}") for p in _patient_ids(tmp_path)}


def _patient_ids(root: Path) -> set[str]:
    labels = pd.read_csv(root / "a" / "data" / "labels.csv", dtype=str)
    return set(labels["patient_id"])


def test_an_existing_secret_salt_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDIMG_SALT", raising=False)
    secret = tmp_path / "demo" / ".medimg-salt"
    secret.parent.mkdir()
    load_or_create_salt(secret)  # a random secret, as a first real ingest makes it
    before = secret.read_bytes()
    stages.synth(Params(synth=SMALL), secret.parent)
    assert secret.read_bytes() == before and DEMO_SALT.encode() not in before


def test_real_files_are_refused_under_the_public_salt_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDIMG_SALT", raising=False)
    root = tmp_path / "demo"
    params = _demo(root)
    real = root / params.data.raw / "site" / "CT_small.dcm"
    real.parent.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), real)
    with pytest.raises(ConfigError) as err:
        stages.ingest(params, root)
    message = str(err.value)
    assert "site/CT_small.dcm" in message and "delete the salt file" in message
    assert "CompressedSamples" not in message  # CT_small's patient name
    assert not (root / params.data.interim).exists()
    (root / params.ingest.salt_file).unlink()  # the way out the message names
    summary = stages.ingest(params, root)
    assert summary["n_files"] >= 4
    assert (root / params.ingest.salt_file).read_text().strip() != DEMO_SALT
    monkeypatch.setenv("MEDIMG_SALT", DEMO_SALT)  # as `make demo` sets it: refused too
    with pytest.raises(ConfigError, match=r"CT_small\.dcm.*\$MEDIMG_SALT"):
        stages.ingest(params, root)
