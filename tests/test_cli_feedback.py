"""What a new user sees from `medrecon reconstruct` (issue 24): options that do nothing, resource
limits checked before the work, output names that never collide, errors that say what the input
is, progress and time estimates, clean warnings, the figure, and PSNR's data range."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.cli.main import main
from medrecon.datasets import Volume, save_nifti
from medrecon.errors import SettingsError
from medrecon.pipeline.case import ReconstructConfig, free_stem, run_case, unused_settings
from test_cli_reconstruct import _err_line as _one_line  # one error line, no traceback

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


def _phantom(path: Path, n: int = 32, z: int = 1, modality: str = "CT", air: float = -1000.0) -> Path:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where(xx**2 + yy**2 < (0.35 * n) ** 2, 40.0, air)
    arr = np.stack([img + 5 * k for k in range(z)]).astype(np.float32)
    save_nifti(Volume(arr, np.diag([0.8, 0.8, 2.0, 1.0]), modality), path)
    return path




def _ct(tmp_path: Path, *extra: str) -> list[str]:
    return ["reconstruct", "--modality", "ct", "--out", str(tmp_path / "o"), *extra]


# ----------------------------------------------------------------------------- item 4: options
def test_options_that_do_nothing_are_refused(tmp_path, capsys):
    assert main(_ct(tmp_path, "--method", "tv", "--steps", "50", "--samples", "3")) == 2
    err = _one_line(capsys)
    assert "--samples 3, --steps 50: tv is not a diffusion method" in err and "dds" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert main(_ct(tmp_path, "--method", "fbp", "--acceleration", "8", "--iters", "5")) == 2
    err = _one_line(capsys)
    assert "--acceleration 8: a CT case" in err and "--iters 5: fbp is not iterative" in err
    assert main(_ct(tmp_path, "--method", "fbp", "--angles", "0,60,120", "--views", "60")) == 2
    assert "--views 60: --angles gives the views" in _one_line(capsys)


def test_acceleration_on_undersampled_measured_kspace_is_refused(tmp_path, capsys):
    """--acceleration undersamples fully sampled measured k-space (retrospectively); k-space that
    is already undersampled is refused, and --noise never applies to measured data."""
    img = _phantom(tmp_path / "mr.nii.gz", modality="MR", air=0.0)
    assert main(["simulate", "mri", str(img), str(tmp_path / "sim"), "--acceleration", "2"]) == 0
    capsys.readouterr()
    argv = ["reconstruct", "--modality", "mri", "--input", str(tmp_path / "sim" / "sim.h5"), "--method", "zero-filled",
            "--out", str(tmp_path / "o")]
    assert main([*argv, "--acceleration", "8", "--noise", "0.1"]) == 2
    err = _one_line(capsys)
    assert "--noise 0.1: measured k-space" in err and "--acceleration" not in err.split("do nothing here:")[1]
    assert main([*argv, "--acceleration", "8"]) == 2
    err = _one_line(capsys)
    assert "sim.h5: --acceleration: retrospective thinning needs a fully sampled scan" in err
    assert "16 of 32 phase-encode lines measured" in err


def test_every_diffusion_method_takes_steps_samples_and_prior():
    from medrecon.solvers.presets import DIFFUSION_METHODS

    for method in DIFFUSION_METHODS:
        cfg = ReconstructConfig(method=method, steps=5, samples=2, prior="ct-256")
        assert unused_settings(cfg) == {}, method
    assert set(unused_settings(ReconstructConfig(method="cg", steps=5, samples=2, prior="ct-256"))) == {
        "steps", "samples", "prior"}


def test_batch_case_ignores_unused_settings_and_leaves_them_out_of_the_record(tmp_path):
    """run_case (what a batch calls) warns, ignores and does not record the setting as used."""
    src = _phantom(tmp_path / "a.nii.gz")
    cfg = ReconstructConfig(input=str(src), out=str(tmp_path / "o"), method="fbp", views=12, steps=50,
                            acceleration=8.0, case_id="c")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rec = run_case(cfg)
    assert rec["ignored_settings"] == {"--steps": 50, "--acceleration": 8.0}
    assert "steps" not in rec["config"] and "acceleration" not in rec["config"] and rec["config"]["views"] == 12
    assert any(w.startswith("ignored --steps 50: fbp is not a diffusion method") for w in rec["warnings"])
    assert json.loads((tmp_path / "o" / "c_fbp.json").read_text())["ignored_settings"] == rec["ignored_settings"]


def test_modality_ct_on_an_mr_image_is_refused(tmp_path, capsys):
    mr = _phantom(tmp_path / "mr.nii.gz", modality="MR", air=0.0)
    assert main(_ct(tmp_path, "--input", str(mr), "--method", "fbp")) == 2
    assert "--modality ct: the input is an MR image" in _one_line(capsys)


@pytest.mark.data
def test_modality_ct_on_the_mr_dicom_series_is_refused(tmp_path, capsys):
    series = DATA / "mri" / "dicom" / "vs_seg_001_t1c"
    if not series.is_dir():
        pytest.skip(f"MR DICOM series not found at {series} (set MEDRECON_DATA)")
    assert main(_ct(tmp_path, "--input", str(series), "--method", "fbp")) == 2
    assert "use --modality mri" in _one_line(capsys)


def test_library_warnings_are_printed_and_recorded(tmp_path, capsys, monkeypatch):
    """info["warnings"] of a reconstruction (e.g. a failing method): one clean line each on stderr,
    in the JSON record and in the batch report."""
    import medrecon.api
    from medrecon.report import batch_report

    real = medrecon.api.reconstruct

    def failing(y, A, method="tv", **kw):  # noqa: N803
        rec = real(y, A, method=method, **kw)
        rec.info["warnings"] = ["method failing: data residual 3.2× the initial estimate's"]
        return rec

    monkeypatch.setattr(medrecon.api, "reconstruct", failing)
    assert main(_ct(tmp_path, "--method", "fbp", "--downsample", "2")) == 0
    err = capsys.readouterr().err
    assert err == "medrecon reconstruct: warning: method failing: data residual 3.2× the initial estimate's\n"
    rec = json.loads((tmp_path / "o" / "bundled-ct_fbp_23v.json").read_text())
    assert rec["warnings"] == ["method failing: data residual 3.2× the initial estimate's"]
    page = batch_report(tmp_path / "r.html", [{"case_id": "c1", "status": "done", **rec}]).read_text()
    assert "<h2>Warnings</h2>" in page and "data residual 3.2× the initial" in page


# --------------------------------------------------------------------------- item 5: resources
def test_too_many_views_run_matrix_free_or_are_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """A geometry whose sparse matrices would not fit runs matrix-free; one that would not fit
    even so is refused, before anything big is built."""
    import medrecon.operators.ct as ct
    import medrecon.pipeline.problems as problems
    from medrecon.pipeline.geometry import ct_case_operator

    def no_build(*a, **k):
        raise AssertionError("the system matrix was built")

    monkeypatch.setattr(ct, "ray_matrix", no_build)
    A = ct_case_operator((256, 256), views=100000)
    problems.check_projector_memory(A, "--views 100000")  # ~800 GB of matrices: matrix-free instead
    assert A.matrix_free
    monkeypatch.setattr(problems, "available_memory_bytes", lambda: 2**30)
    assert main(_ct(tmp_path, "--views", "100000", "--method", "fbp")) == 2
    err = _one_line(capsys)
    assert "--views 100000: a 100000-view CT projector on a 256×256 grid" in err
    assert "GiB of memory to run matrix-free" in err and "1.0 GiB is available" in err


def test_memory_check_compares_with_the_available_memory(tmp_path, monkeypatch):
    import medrecon.pipeline.problems as problems

    monkeypatch.setattr(problems, "available_memory_bytes", lambda: 8 * 2**20)
    cfg = ReconstructConfig(out=str(tmp_path / "o"), method="fbp", views=60)
    with pytest.raises(SettingsError, match=r"--views 60: .* needs about [\d.]+ [MG]iB .*; 8 MiB is available"):
        run_case(cfg)
    monkeypatch.setattr(problems, "available_memory_bytes", lambda: None)  # unknown: no refusal
    assert run_case(cfg)["metrics"]["psnr"] > 20


@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_projector_size_estimate_matches_the_built_matrices(kind):
    from medrecon.operators.ct import projector_nnz
    from medrecon.pipeline.geometry import ct_case_operator

    A = ct_case_operator((40, 48), kind=kind, views=30)
    fwd, back = projector_nnz((40, 48), len(A.angles), A.n_bins)
    assert 0.9 < fwd / A.matrix.matrix.nnz < 1.4
    assert 0.9 < back / A.backprojector.matrix.nnz < 1.4


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(_ct(tmp_path, "--method", "fbp")[:-2] + ["--out", str(f)]) == 2
    assert "afile: is a file; --out takes a folder" in _one_line(capsys)
    assert main(_ct(tmp_path, "--method", "fbp")[:-2] + ["--out", str(f / "sub")]) == 2
    assert "cannot create the output folder" in _one_line(capsys)


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    sysfs = Path("/sys")  # read-only even for root
    if sysfs.is_dir() and not os.access(sysfs, os.W_OK | os.X_OK):
        return sysfs
    try:
        import tempfile

        os.close(tempfile.mkstemp(dir=sysfs)[0])
    except OSError:
        return sysfs
    pytest.skip("no folder that root cannot write into")


def test_unwritable_out_is_found_before_the_work(tmp_path, capsys, monkeypatch):
    import medrecon.pipeline.problems as problems

    ro = _unwritable_folder(tmp_path)

    def no_work(*a, **k):
        raise AssertionError("the case started before the output folder was checked")

    monkeypatch.setattr(problems, "build_problem", no_work)
    assert main(["reconstruct", "--modality", "ct", "--method", "fbp", "--out", str(ro)]) == 2
    err = _one_line(capsys)
    assert f"{ro}: output folder is not writable" in err and ".tmp" not in err


def test_errors_from_temporary_files_name_the_folder():
    from medrecon.cli.main import _one_line as line

    err = PermissionError(13, "Permission denied", "/data/out/.tmpab12cd.json.tmp")
    assert line(err) == "/data/out: cannot write into this folder (Permission denied)"


# ------------------------------------------------------------------------ item 9: output names
def test_reruns_and_other_settings_never_collide(tmp_path, capsys):
    out = tmp_path / "o"
    for views in ("23", "60", "23"):
        assert main(_ct(tmp_path, "--method", "fbp", "--views", views, "--downsample", "2")) == 0
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["bundled-ct_fbp_23v-2.json", "bundled-ct_fbp_23v.json", "bundled-ct_fbp_60v.json"]
    assert "this run wrote bundled-ct_fbp_23v-2.*" in capsys.readouterr().err
    before = (out / "bundled-ct_fbp_23v.json").stat().st_mtime_ns
    assert main(_ct(tmp_path, "--method", "fbp", "--views", "23", "--downsample", "2", "--overwrite")) == 0
    assert (out / "bundled-ct_fbp_23v.json").stat().st_mtime_ns != before  # replaced, nothing new
    assert len(list(out.glob("*.json"))) == 3


def test_free_stem_names_by_settings(tmp_path):
    mk = {"out": str(tmp_path)}
    assert free_stem(ReconstructConfig(**mk, method="tv", views=23)) == "bundled-ct_tv_23v"
    assert free_stem(ReconstructConfig(**mk, method="tv", geometry="fan", views=60, noise=0.05)) == \
        "bundled-ct_tv_fan60v-noise0.05"
    assert free_stem(ReconstructConfig(**mk, method="cg", modality="mri", acceleration=4.0, mask="random",
                                       case_id="k")) == "k_cg_R4-random"
    (tmp_path / "k_cg_R4-random_dicom").mkdir()
    assert free_stem(ReconstructConfig(**mk, method="cg", modality="mri", acceleration=4.0, mask="random",
                                       case_id="k")) == "k_cg_R4-random-2"
    assert free_stem(ReconstructConfig(**mk, method="cg", modality="mri", acceleration=4.0, mask="random",
                                       case_id="k", overwrite=True)) == "k_cg_R4-random"


# --------------------------------------------------------------------- item 10: error messages
def test_errors_say_what_the_input_is_and_what_is_read(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_ct(tmp_path, "--input", str(empty))) == 2
    err = _one_line(capsys)
    assert "an empty folder: no DICOM series, NIfTI or images" in err and "NIfTI (.nii, .nii.gz)" in err
    assert "no image files" not in err
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert main(_ct(tmp_path, "--input", str(txt))) == 2
    err = _one_line(capsys)
    assert "a text file, not a format medrecon reads" in err and "DICM" not in err and "k-space (" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.csv").write_text("x")
    assert main(_ct(tmp_path, "--input", str(mixed))) == 2
    assert "a folder of 2 files (.csv, .txt)" in _one_line(capsys)


def test_reference_must_be_an_image(tmp_path, capsys):
    img = _phantom(tmp_path / "img.nii.gz")
    assert main(["simulate", "ct", str(img), str(tmp_path / "sim"), "--views", "20"]) == 0
    capsys.readouterr()
    sino = str(tmp_path / "sim" / "sim.npy")
    for name, what in (("x.cfl", "a BART .cfl array"), ("x.mat", "a MATLAB .mat file")):
        (tmp_path / name).write_bytes(b"\0" * 16)
        assert main(_ct(tmp_path, "--input", sino, "--method", "fbp", "--reference", str(tmp_path / name))) == 2
        err = _one_line(capsys)
        assert f"{what} is read as measured data (k-space), not as an image; --reference takes an image" in err
        assert "DICM" not in err


def test_formats_come_from_the_readers_lists():
    from medrecon.datasets import KSPACE_SUFFIXES
    from medrecon.datasets.images import IMAGE_SUFFIXES
    from medrecon.pipeline.problems import supported_formats

    text = supported_formats("input")
    assert all(s in text for s in (*KSPACE_SUFFIXES, *IMAGE_SUFFIXES, ".npy", ".nii.gz"))
    assert ".h5" not in supported_formats("image")


def test_a_non_kspace_mat_file_gets_a_clear_error(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "stuff.mat", {"a": np.zeros((3, 3))})
    argv = ["reconstruct", "--modality", "mri", "--input", str(tmp_path / "stuff.mat"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--method", "zero-filled"]) == 2
    err = _one_line(capsys)
    assert "stuff.mat" in err and "DICM" not in err and "k-space" in err


# ----------------------------------------------------------------------- item 11: progress
def test_time_estimate_counts_the_evaluations_the_method_runs():
    """The estimate's network evaluations equal what the sampler then runs, for every method."""
    from medrecon import reconstruct
    from medrecon.operators import MaskedFourier, ParallelBeamCT, mri_mask
    from medrecon.pipeline.case import estimate_diffusion_time
    from medrecon.priors.sde import VESDE
    from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
    from medrecon.solvers.presets import DIFFUSION_METHODS

    n = 8
    prior = GaussianPrior(0.5 * torch.ones(n, n, dtype=torch.float64), periodic_rbf_covariance(n), VESDE(0.01, 5.0))
    A = ParallelBeamCT(n, torch.arange(4).double().numpy() * math.pi / 4)
    y = A(prior.sample(2, torch.Generator().manual_seed(1)) * 4096 - 1024)
    for method in DIFFUSION_METHODS:
        for steps in (10, 23):
            rec = reconstruct(y, A, method=method, prior=prior, n_samples=2, steps=steps)
            est = estimate_diffusion_time(prior, A, y, method, n_samples=2, steps=steps)
            assert est["nfe"] == rec.info["nfe"], (method, steps)
            assert est["seconds"] >= 0 and est["batch"] == (2 if method in ("mbir3d", "dds3d") else 4)
    B = MaskedFourier(mri_mask("random", (n, n), 2, 0.25, seed=0))
    yk = B(prior.sample(1, torch.Generator().manual_seed(1)).to(torch.complex128))
    for method in ("song", "ccdf", "dds"):
        rec = reconstruct(yk, B, method=method, prior=prior, n_samples=2, steps=12)
        assert estimate_diffusion_time(prior, B, yk, method, n_samples=2, steps=12)["nfe"] == rec.info["nfe"]


def test_long_diffusion_runs_print_their_estimate(tmp_path, capsys, monkeypatch):
    import medrecon.api
    import medrecon.pipeline.case as case
    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    real = medrecon.api.reconstruct
    seen = {}

    def quick(y, A, method="tv", **kw):  # noqa: N803
        if method != "ccdf":
            return real(y, A, method=method, **kw)
        seen["prior"] = kw.get("prior")
        return real(y, A, method="fbp")

    monkeypatch.setattr(medrecon.api, "reconstruct", quick)
    monkeypatch.setattr(case, "estimate_diffusion_time", lambda *a, **k: {
        "nfe": 300, "batch": 4, "seconds_per_evaluation": 1.8, "seconds": 540.0, "initial_estimate": "tv"})
    assert main(_ct(tmp_path, "--method", "ccdf", "--downsample", "4")) == 0
    err = capsys.readouterr().err
    assert err == ("medrecon reconstruct: ccdf: about 9 min on cpu: 300 network evaluations on 4 image(s), "
                   "1.80 s each, after its tv initial estimate\n")
    assert getattr(seen["prior"], "name", None) == "ct-256"  # the timed prior is the one used
    rec = json.loads((tmp_path / "o" / "bundled-ct_ccdf_23v.json").read_text())
    assert rec["time_estimate"]["seconds"] == 540.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_progress_bar_shows_on_a_terminal_that_reports_no_size(tmp_path):
    """A pty opened without a window size (0 × 0) made tqdm hide the sampler's bar."""
    import pty
    import select
    import subprocess

    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    primary, secondary = pty.openpty()  # a new pty has size 0 × 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    cmd = [sys.executable, "-m", "medrecon.cli.main", "reconstruct", "--modality", "ct", "--method", "ccdf",
           "--steps", "15", "--samples", "1", "--downsample", "4", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary, env=env)
    os.close(secondary)  # the child holds the terminal now; reading ends (EIO) when it exits
    err = b""
    try:
        while select.select([primary], [], [], 600)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(primary)
    assert proc.wait(timeout=60) == 0, err.decode(errors="replace")
    assert b"sampling:" in err and b"it/s]" in err  # the bar was drawn (it is cleared when done)


# ------------------------------------------------------------------------ item 12: cosmetics
def test_warnings_print_as_one_clean_line(tmp_path, capsys):
    not_hu = _phantom(tmp_path / "mr_like.nii.gz", modality="OT", air=0.0)
    assert main(_ct(tmp_path, "--input", str(not_hu), "--method", "fbp", "--views", "12")) == 0
    err = capsys.readouterr().err
    assert err.startswith("medrecon reconstruct: warning: --modality ct: the input's values span [0, 40]")
    assert err.count("\n") == 1 and ".py:" not in err and "warnings.warn" not in err


@pytest.mark.data
def test_dicom_geometry_warnings_are_clean_and_recorded_without_paths(tmp_path, capsys):
    series = DATA / "dicom_cases" / "dcmqa_GE"
    if not series.is_dir():
        pytest.skip(f"uneven series not found at {series} (set MEDRECON_DATA)")
    assert main(_ct(tmp_path, "--input", str(series), "--slices", "12:14", "--downsample", "4", "--views", "30",
                    "--method", "fbp")) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("medrecon reconstruct: warning: ") for line in lines)
    assert sum("uneven slice spacing" in line for line in lines) == 1  # once, with the path the user gave
    (record,) = (tmp_path / "o").glob("*.json")
    rec = json.loads(record.read_text())
    assert any("uneven slice spacing" in w for w in rec["warnings"]) and str(series) not in record.read_text()
    assert rec["figure_slice"] == {"index_in_input": 13, "of_reconstructed": 2}


def test_figure_names_the_slice_and_shows_the_reference(tmp_path, monkeypatch):
    import medrecon.report

    got = {}
    real = medrecon.report.case_figure

    def spy(path, panels, **kw):
        got.update(kw, names=[p[0] for p in panels])
        return real(path, panels, **kw)

    monkeypatch.setattr(medrecon.report, "case_figure", spy)
    src = _phantom(tmp_path / "v.nii.gz", z=5)
    run_case(ReconstructConfig(input=str(src), out=str(tmp_path / "o"), method="fbp", views=12, slices="1:4",
                               case_id="v"))
    assert got["names"] == ["reference", "initial estimate (fbp)", "reconstruction (fbp)", "|error| vs reference"]
    assert got["title"].endswith("slice 2 of 3 (input slice index 2)")
    np.testing.assert_allclose(got["affine"][:3, :3], np.diag([0.8, 0.8, 2.0]))


def test_display_orientation_follows_the_affine():
    from medrecon.report import display_orientation, orient_for_display

    lps_axial = np.diag([-0.7, -0.7, 1.0, 1.0])  # a DICOM axial slice in RAS+: already as viewers show it
    assert display_orientation(lps_axial)[:3] == (False, False, False)
    # IXI sagittal (nibabel axis codes P, S, R): stored with inferior at the top
    ixi = np.array([[0, 0, 2.0, -88], [-2.0, 0, 0, 118], [0, 2.0, 0, -135], [0, 0, 0, 1]])
    img = np.arange(6.0).reshape(2, 3)  # row 0 = inferior
    shown, aspect = orient_for_display(img, ixi)
    np.testing.assert_array_equal(shown, img[::-1])  # superior up, anterior (column 0) on the left
    assert aspect == 1.0
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # rows go superior
    assert display_orientation(coronal)[:3] == (False, True, True)
    np.testing.assert_array_equal(orient_for_display(img, None)[0], img)  # no geometry: as stored


@pytest.mark.data
def test_ixi_sagittal_is_drawn_superior_up(tmp_path):
    """IXI T1 volumes are sagittal slices stored with superior towards the last row."""
    f = DATA / "mri" / "nifti" / "IXI012-HH-1211_T1.nii.gz"
    if not f.is_file():
        pytest.skip(f"IXI volume not found at {f} (set MEDRECON_DATA)")
    from medrecon.datasets import load_nifti
    from medrecon.report import orient_for_display

    vol = load_nifti(f)
    shown, _ = orient_for_display(vol.array[vol.shape[0] // 2], vol.affine)
    head = shown > 0.2 * shown.max()
    rows = np.nonzero(head.any(axis=1))[0]
    top, bottom = head[rows[0] : rows[0] + 10].sum(), head[rows[-1] - 9 : rows[-1] + 1].sum()
    assert top < bottom  # the narrow skull vertex is at the top, the wide neck and face below


def test_colour_bar_texts_stay_inside_the_figure():
    from medrecon.report import _figure

    rng = np.random.default_rng(0)
    for shape, scale, n in (((64, 64), 3000.0, 4), ((368, 640), 1e-5, 2), ((640, 368), 1e5, 5)):
        img = rng.random(shape) * scale
        fig = _figure([(f"panel {k}", img, "a.u.") for k in range(n)], None, "case: title; slice 3 of 9", None)
        fig.canvas.draw()
        r, box = fig.canvas.get_renderer(), fig.bbox
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == n
        for ax in bars:
            for t in (ax.yaxis.label, ax.yaxis.get_offset_text(), *ax.get_yticklabels()):
                if t.get_text():
                    e = t.get_window_extent(r)
                    assert e.x0 >= -0.5 and e.x1 <= box.x1 + 0.5 and e.y0 >= -0.5 and e.y1 <= box.y1 + 0.5
        import matplotlib.pyplot as plt

        plt.close(fig)


# ------------------------------------------------------------------------ item 13: PSNR range
def test_psnr_needs_a_range_outside_zero_one():
    from medrecon.metrics import psnr, ssim

    ref = np.full((16, 16), -1000.0)
    ref[4:12, 4:12] = 40.0
    with pytest.raises(SettingsError, match=r"psnr\(\): the reference spans \[-1000, 40\], not \[0, 1\]; pass data_range"):
        psnr(ref + 10, ref)
    with pytest.raises(SettingsError, match="ssim"):
        ssim(ref + 10, ref)
    assert psnr(ref + 10, ref, data_range=4096) == pytest.approx(20 * math.log10(4096 / 10))
    norm = (ref + 1024) / 4096
    assert psnr(norm + 10 / 4096, norm) == pytest.approx(psnr(ref + 10, ref, data_range=4096))
    with pytest.raises(SettingsError, match="positive"):
        psnr(norm, norm, data_range=0)


def test_cli_metrics_unchanged_by_the_explicit_range(tmp_path):
    """The record's PSNR is over the HU window's width (4096), computed here independently from
    the written NIfTI and the bundled slice."""
    from medrecon.datasets import load_nifti, load_volume
    from medrecon.datasets.simulate import bundled_ct_slice

    rec = run_case(ReconstructConfig(out=str(tmp_path), method="fbp", views=23))
    out = next(p for p in rec["outputs"] if p.endswith(".nii.gz"))
    mean = load_nifti(out).array.astype(np.float64)
    ref = load_volume(str(bundled_ct_slice())).array.astype(np.float64)
    want = 10 * np.log10(4096.0**2 / np.mean((mean - ref) ** 2))
    assert rec["metrics"]["psnr"] == pytest.approx(want, abs=0.02)
