"""What the outputs of a run look like (issue 31, item 6): the figure's display window per modality
and intensity range (``--window C,W``), colour bars of error and uncertainty panels at robust
percentiles, one SeriesNumber per method in a derived study, no empty folder after a failure,
and the "writes NAME-2" notice only after a run that succeeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medrecon.cli.main import main
from medrecon.datasets import Volume, save_nifti
from medrecon.errors import SettingsError
from medrecon.pipeline.case import ReconstructConfig, run_case


def _phantom(path: Path, n: int = 32, level: float = 700.0) -> Path:
    """A CT phantom at ``level`` HU in air, with a small insert 100 HU above it."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where(xx**2 + yy**2 < (0.4 * n) ** 2, level, -1000.0)
    img[n // 2 - 2 : n // 2 + 2, n // 2 - 2 : n // 2 + 2] = level + 100.0
    save_nifti(Volume(img[None].astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0]), "CT"), path)
    return path


def _spy_figure(monkeypatch) -> dict:
    import medrecon.report

    got: dict = {}
    real = medrecon.report.case_figure

    def spy(path, panels, **kw):
        got.update(kw, panels=panels)
        return real(path, panels, **kw)

    monkeypatch.setattr(medrecon.report, "case_figure", spy)
    return got


# ------------------------------------------------------------------ display window
def test_display_window_follows_the_modality_and_intensity_range():
    from medrecon.report import display_window

    rng = np.random.default_rng(0)
    head = np.full((64, 64), -1000.0)
    head[8:56, 8:56] = rng.normal(35, 10, (48, 48))
    head[8:56, 8:12] = 1200.0  # a rim of skull
    assert display_window(head, "ct")[0] == (-160.0, 240.0)  # soft tissue W400/L40
    phantom = np.full((64, 64), -1000.0)
    phantom[8:56, 8:56] = rng.normal(700, 20, (48, 48))
    (low, high), why = display_window(phantom, "ct")
    assert low < 650 and high > 750 and high - low >= 400 and (low, high) != (-160.0, 240.0), why
    mr = rng.uniform(0, 300, (64, 64))
    (low, high), _ = display_window(mr, "mri")
    assert low == 0 and high == pytest.approx(np.percentile(mr, 99.5))


def test_a_phantom_far_above_soft_tissue_is_not_shown_binary(tmp_path, monkeypatch):
    got = _spy_figure(monkeypatch)
    src = _phantom(tmp_path / "p.nii.gz")
    rec = run_case(ReconstructConfig(input=str(src), out=str(tmp_path / "o"), method="fbp", views=30, case_id="p"))
    low, high = got["display"]
    assert low < 700 < 800 < high and high - low <= 1500, got["display"]
    assert rec["display_window"]["center"] == pytest.approx((low + high) / 2)


def test_window_option_sets_the_figure_window(tmp_path, monkeypatch, capsys):
    got = _spy_figure(monkeypatch)
    src = _phantom(tmp_path / "p.nii.gz")
    argv = ["reconstruct", "--modality", "ct", "--input", str(src), "--method", "fbp", "--views", "20",
            "--out", str(tmp_path / "o"), "--case-id", "w"]
    assert main([*argv, "--window", "750,400"]) == 0
    assert got["display"] == (550.0, 950.0)
    rec = json.loads((tmp_path / "o" / "w_fbp_20v.json").read_text())
    assert rec["display_window"] == {"center": 750.0, "width": 400.0, "how": "--window"}
    with pytest.raises(SystemExit):  # argparse: not two numbers
        main([*argv, "--window", "40"])
    assert "--window: expected CENTRE,WIDTH" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="window width must be > 0"):
        run_case(ReconstructConfig(input=str(src), out=str(tmp_path / "o2"), method="fbp", window=(40.0, 0.0)))


# ------------------------------------------------------------------ colour bars
def test_error_and_uncertainty_colour_bars_ignore_outliers():
    import matplotlib.pyplot as plt

    from medrecon.report import _figure

    rng = np.random.default_rng(1)
    err = rng.uniform(0, 50, (64, 64))
    err[3, 3] = 1e5  # one wild pixel
    img = rng.normal(40, 10, (64, 64))
    fig = _figure([("reconstruction (fbp)", img, "HU"), ("uncertainty (posterior std)", err, "HU"),
                   ("|error| vs reference", err, "HU")], (-160.0, 240.0), "t", None)
    try:
        panels = [ax for ax in fig.axes if ax.images]
        assert panels[0].images[0].get_clim() == (-160.0, 240.0)
        for ax in panels[1:]:
            low, high = ax.images[0].get_clim()
            assert high == pytest.approx(np.percentile(err, 99)) and low == pytest.approx(np.percentile(err, 1))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ SeriesNumber per method
def test_each_method_gets_its_own_series_number_in_one_study(tmp_path, make_series_ct):
    import pydicom

    numbers, studies = {}, set()
    for method, extra in (("fbp", ()), ("tv", ("--iters", "3")), ("cg", ("--iters", "2"))):
        assert main(["reconstruct", "--modality", "ct", "--input", str(make_series_ct), "--method", method, *extra,
                     "--views", "8", "--format", "dicom", "--out", str(tmp_path / "o"), "--case-id", "c"]) == 0
        (folder,) = (tmp_path / "o").glob(f"c_{method}_8v_dicom")
        ds = pydicom.dcmread(sorted(folder.iterdir())[0])
        numbers[method] = int(ds.SeriesNumber)
        studies.add(ds.StudyInstanceUID)
    assert len(studies) == 1 and len(set(numbers.values())) == 3, numbers


def test_series_numbers_are_unique_for_every_method_and_kind():
    from medrecon.api import METHODS
    from medrecon.pipeline.outputs import series_number
    from medrecon.solvers.presets import DIFFUSION_METHODS

    for base in ("3", "", "301", "12"):
        seen = {series_number(base, m, k) for m in (*METHODS, *DIFFUSION_METHODS)
                for k in ("reconstruction", "uncertainty")}
        assert len(seen) == 2 * len({*METHODS, *DIFFUSION_METHODS})
        assert all(0 < n < 2**31 for n in seen)
    assert series_number("3", "fbp", "reconstruction") % 1000 == 3  # the source's number stays visible


@pytest.fixture
def make_series_ct(tmp_path) -> Path:
    from medrecon.datasets import save_dicom_series

    rng = np.random.default_rng(2)
    arr = rng.normal(0, 40, (2, 24, 24)).astype(np.float32)
    arr[:, :3] = -1000.0
    folder = tmp_path / "series"
    save_dicom_series(Volume(arr, np.diag([1.0, 1.0, 2.0, 1.0]), "CT", {"dicom": {"SeriesNumber": "3"}}), folder,
                      method="fixture")
    return folder


# ------------------------------------------------------------------ failed runs
def test_a_failed_case_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "o"
    argv = ["reconstruct", "--modality", "ct", "--method", "fbp", "--out", str(out)]
    assert main([*argv, "--input", str(tmp_path / "missing.nii.gz")]) == 2
    assert not out.exists() and not out.parent.exists()
    capsys.readouterr()
    src = tmp_path / "in"
    src.mkdir()
    _phantom(src / "good.nii.gz")
    (src / "cases.csv").write_text("case_id,input\ngood,good.nii.gz\nbad,missing.nii.gz\n")
    assert main(["batch", str(src / "cases.csv"), "--out", str(tmp_path / "b"), "--method", "fbp",
                 "--views", "8"]) == 3
    assert (tmp_path / "b" / "cases" / "good").is_dir() and not (tmp_path / "b" / "cases" / "bad").exists()


def test_the_next_free_name_is_announced_only_after_success(tmp_path, capsys, monkeypatch):
    import medrecon.pipeline.problems as problems

    argv = ["reconstruct", "--modality", "ct", "--method", "fbp", "--downsample", "4", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    capsys.readouterr()
    real = problems.build_problem

    def broken(cfg, seed):
        raise SettingsError("the run fails")

    monkeypatch.setattr(problems, "build_problem", broken)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the run fails" in err and "-2" not in err and "writes" not in err, err
    assert not list((tmp_path / "o").glob("*-2*"))
    monkeypatch.setattr(problems, "build_problem", real)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "wrote bundled-ct_fbp_23v-2.*" in err, err
