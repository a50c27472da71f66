"""The public reconstruct() call and the thin CLI on the bundled sample."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from medrecon import api
from medrecon.cli.main import main
from medrecon.errors import SettingsError
from medrecon.operators import MaskedFourier, ParallelBeamCT, mri_mask


def _hu_phantom(n: int) -> torch.Tensor:
    x = torch.full((1, 1, n, n), -1000.0)
    x[..., n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 40.0
    x[..., n // 2 - 3 : n // 2 + 3, n // 3 : n // 3 + 6] = 800.0
    return x


@pytest.mark.parametrize("method", ["fbp", "tv", "cg"])
def test_reconstruct_ct_in_hu(method):
    A = ParallelBeamCT.sparse_view(48, 16)
    x = _hu_phantom(48)
    rec = api.reconstruct(A(x), A, method=method, **({} if method == "fbp" else {"iters": 30}))
    assert rec.mean.shape == x.shape and rec.std is None
    assert rec.info["method"] == method and rec.info["wall_time_s"] >= 0
    err = (rec.mean - x).abs().mean()
    assert err < 150, err  # HU
    if method == "tv":
        assert err < (api.reconstruct(A(x), A, method="fbp").mean - x).abs().mean()


def test_reconstruct_mri_units_follow_input():
    A = MaskedFourier(mri_mask("poisson", (32, 32), 3, 0.1, seed=0))
    x = 1000 * torch.rand(1, 1, 32, 32)
    for method in ("zero-filled", "l1-wavelet", "tv"):
        rec = api.reconstruct(A(x), A, method=method, **({} if method == "zero-filled" else {"iters": 20}))
        assert rec.mean.abs().max() > 100  # back in the input's units, not [0, 1]
        assert rec.info["data_residual"] < 1


def test_unknown_method_or_setting_is_named():
    A = ParallelBeamCT.sparse_view(16, 4)
    y = A(torch.zeros(1, 1, 16, 16))
    with pytest.raises(SettingsError, match="unknown method 'tvv'; did you mean 'tv'"):
        api.reconstruct(y, A, method="tvv")
    with pytest.raises(SettingsError, match="'fbp' does not take iters; it takes: filter_name"):
        api.reconstruct(y, A, method="fbp", iters=3)


def test_cli_reconstruct_bundled_sample(tmp_path, capsys):
    rc = main(["reconstruct", "--modality", "ct", "--views", "23", "--method", "tv", "--iters", "5",
               "--out", str(tmp_path)])
    assert rc == 0
    record = json.loads((tmp_path / "bundled-ct_tv_23v.json").read_text())
    assert record["metrics"]["psnr"] > record["metrics"]["psnr_initial"] - 1
    assert (tmp_path / "bundled-ct_tv_23v.nii.gz").stat().st_size > 0
    assert (tmp_path / "bundled-ct_tv_23v.png").read_bytes()[:4] == b"\x89PNG"
    # the same command again never overwrites: it takes the next free name and says so
    assert main(["reconstruct", "--modality", "ct", "--views", "23", "--method", "fbp", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["reconstruct", "--modality", "ct", "--views", "23", "--method", "fbp", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "bundled-ct_fbp_23v-2" in err and err.count("\n") == 1
    assert (tmp_path / "bundled-ct_fbp_23v.json").exists() and (tmp_path / "bundled-ct_fbp_23v-2.json").exists()


def test_cli_mri_and_limited_angle(tmp_path):
    assert main(["reconstruct", "--modality", "mri", "--acceleration", "4", "--method", "zero-filled",
                 "--out", str(tmp_path)]) == 0
    assert main(["reconstruct", "--modality", "ct", "--limited-angle", "90", "--method", "fbp",
                 "--out", str(tmp_path), "--case-id", "la"]) == 0
    assert (tmp_path / "la_fbp_la90.json").exists()


def test_cli_bad_input_exit_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medrecon.cli.main", "reconstruct", "--modality", "ct", "--input",
         str(tmp_path / "missing"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "missing: no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medrecon.cli.main", "reconstruct", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "examples:" in proc.stdout


def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "medrecon" in capsys.readouterr().out


def test_default_method_without_a_prior_is_tv():
    """A prior without a model card (nothing measured): TV, and the reason says so (the per-key
    choice from the card's benchmark is tests/test_default_method.py)."""
    assert api.BEST_DIFFUSION == "dds"

    choice = api.default_choice(ParallelBeamCT.sparse_view(16, 4), prior=object())
    assert choice.method == "tv" and "no model card" in choice.reason
    assert api.default_method(ParallelBeamCT.sparse_view(16, 4), prior=object()) == "tv"


def test_cli_default_on_an_unmeasured_key_is_classical_and_says_so(tmp_path, capsys):
    """No --method on a setting the card never measured (37 views): TV, with a note that DDS is
    unmeasured there; --samples asks for posterior sampling, so DDS runs (next test)."""
    rc = main(["reconstruct", "--modality", "ct", "--views", "37", "--downsample", "4", "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    record = json.loads((tmp_path / "bundled-ct_tv_37v.json").read_text())
    assert record["info"]["method"] == "tv" and record["config"]["method"] == "tv"
    assert record["info"]["default"]["measured"] is False and "unmeasured" in record["info"]["default"]["reason"]
    assert "dds exists for this prior but is unmeasured for parallel-37" in captured.err
    assert "tv on" in captured.out


def test_cli_default_runs_the_prior_and_writes_the_uncertainty(tmp_path, capsys):
    """`medrecon reconstruct --modality ct --views 23` with no --method: DDS with ct-256, the
    reconstruction and its uncertainty map written and both printed (on a 4× smaller copy of
    the bundled slice to stay CI-sized)."""
    rc = main(["reconstruct", "--modality", "ct", "--views", "23", "--downsample", "4", "--samples", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "bundled-ct_dds_23v.json").read_text())
    assert record["info"]["method"] == "dds" and record["info"]["prior"] == "ct-256"
    assert (tmp_path / "bundled-ct_dds_23v_std.nii.gz").stat().st_size > 0
    assert "uncertainty: posterior std of 2 samples" in out and "PSNR" in out
    assert record["uncertainty"]["median"] > 0 and record["uncertainty"]["unit"] == "HU"
