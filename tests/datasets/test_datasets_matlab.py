"""MATLAB ``.mat`` k-space (issue 24, item 14): v7.3 (HDF5) and v4-v7 files, layouts, variable
choice, the real 16-coil file, and a fuzz suite in which every bad file gives InputError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medrecon.datasets import KSpace, list_matlab_variables, load_kspace, load_matlab_kspace, save_matlab_kspace
from medrecon.errors import InputError, ShapeError

scipy_io = pytest.importorskip("scipy.io")


def _kspace(c=3, z=2, ny=10, nx=8, seed=0, maps=True) -> KSpace:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((c, z, ny, nx)) + 1j * rng.standard_normal((c, z, ny, nx))).astype(np.complex64)
    mask = np.zeros((1, ny, nx), bool)
    mask[:, :, ::2] = True
    mask[:, :, nx // 2 - 1: nx // 2 + 1] = True
    m = (rng.standard_normal((c, z, ny, nx)) + 1j * rng.standard_normal((c, z, ny, nx))).astype(np.complex64)
    return KSpace(data * mask[None], mask=mask, coil_maps=m if maps else None)


def _matlab_order(k: np.ndarray) -> np.ndarray:
    """(coils, Z, ky, kx) → MATLAB (rows, cols, slices, coils)."""
    return np.ascontiguousarray(k.transpose(2, 3, 1, 0))


def _v5(path: Path, **variables) -> Path:
    scipy_io.savemat(path, variables)
    return path


def _v73(path: Path, variables: dict, header: bool = True) -> Path:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 with a 512-byte header, arrays in reversed
    dimension order, complex as a compound of 'real' and 'imag'."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as hf:
        for name, a in variables.items():
            if isinstance(a, dict):  # struct
                g = hf.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_(b"struct")
                for f, v in a.items():
                    ds = g.create_dataset(f, data=np.asarray(v).T)
                    ds.attrs["MATLAB_class"] = np.bytes_(b"double")
                continue
            a = np.asarray(a)
            if np.iscomplexobj(a):
                c = np.empty(a.shape, [("real", "<f8"), ("imag", "<f8")])
                c["real"], c["imag"] = a.real, a.imag
                ds = hf.create_dataset(name, data=c.T)
                ds.attrs["MATLAB_class"] = np.bytes_(b"double")
            elif a.dtype.kind in "US":
                ds = hf.create_dataset(name, data=np.frombuffer(str(a).encode("utf-16-le"), "<u2")[:, None])
                ds.attrs["MATLAB_class"] = np.bytes_(b"char")
            else:
                ds = hf.create_dataset(name, data=a.T)
                ds.attrs["MATLAB_class"] = np.bytes_(b"logical" if a.dtype == bool else b"double")
    if header:
        with open(path, "r+b") as fh:
            fh.write(b"MATLAB 7.3 MAT-file, Platform: test".ljust(116) + b"\0" * 8 + b"\0\x02IM")
    return path


# ------------------------------------------------------------------ reading
def test_round_trip_v73_writer(tmp_path):
    k = _kspace()
    path = save_matlab_kspace(k, tmp_path / "k.mat")
    assert path.read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    got = load_matlab_kspace(path)
    np.testing.assert_array_equal(got.data, k.data)
    np.testing.assert_array_equal(got.mask[0], k.mask[0])
    np.testing.assert_array_equal(got.coil_maps, k.coil_maps)
    assert got.header["format"] == "MATLAB v7.3" and got.header["layout"] == "yxzc"
    assert got.header["matlab_size"] == [10, 8, 2, 3]
    with pytest.raises(InputError, match="already exists"):
        save_matlab_kspace(k, path)


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_matlab_order_rows_are_ky(tmp_path, version):
    """MATLAB (rows, cols, slices, coils) → KSpace (coils, Z, ky = rows, kx = cols), for both
    readers; the v7.3 arrays are stored transposed, as MATLAB does."""
    k = _kspace(maps=False).data
    ml = _matlab_order(k)
    path = _v5(tmp_path / "k.mat", kspace=ml) if version == "v5" else _v73(tmp_path / "k.mat", {"kspace": ml})
    got = load_matlab_kspace(path)
    assert got.data.shape == (3, 2, 10, 8)
    np.testing.assert_allclose(got.data, k)
    assert got.data[1, 0, 4, 2] == ml[4, 2, 0, 1]


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_default_layouts_and_explicit_layout(tmp_path, version):
    rng = np.random.default_rng(1)
    write = (lambda p, **v: _v5(p, **v)) if version == "v5" else (lambda p, **v: _v73(p, v))
    two = (rng.standard_normal((6, 5)) + 1j).astype(np.complex128)
    three = (rng.standard_normal((6, 5, 4)) + 1j).astype(np.complex128)
    assert load_matlab_kspace(write(tmp_path / "a.mat", k=two)).data.shape == (1, 1, 6, 5)
    assert load_matlab_kspace(write(tmp_path / "b.mat", k=three)).data.shape == (4, 1, 6, 5)  # coils
    got = load_matlab_kspace(tmp_path / "b.mat", layout="yxz")  # one coil, 4 slices
    assert got.data.shape == (1, 4, 6, 5)
    np.testing.assert_allclose(got.data[0, 3], three[:, :, 3])
    got = load_matlab_kspace(tmp_path / "b.mat", layout="yxzc")  # trailing singleton coil restored
    assert got.data.shape == (1, 4, 6, 5)
    with pytest.raises(ShapeError, match="layout"):
        load_matlab_kspace(tmp_path / "b.mat", layout="yyc")


def test_variable_choice(tmp_path):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((6, 5, 2)) + 1j).astype(np.complex128)
    b = (rng.standard_normal((6, 5, 2)) + 2j).astype(np.complex128)
    # a named k-space variable wins; sensitivity maps are recognised and not taken for k-space
    path = _v5(tmp_path / "named.mat", other=a, raw=b, sens=a, mask=np.ones((6, 5)))
    got = load_matlab_kspace(path)
    assert got.header["variable"] == "raw" and got.coil_maps is not None and got.mask.all()
    np.testing.assert_allclose(got.data[1, 0], b[:, :, 1])
    # the only complex array (beside maps)
    assert load_matlab_kspace(_v5(tmp_path / "only.mat", acq=a, csm=b)).header["variable"] == "acq"
    # several unnamed complex arrays: ask for variable=
    path = _v5(tmp_path / "two.mat", acq1=a, acq2=b)
    with pytest.raises(InputError, match="pass variable="):
        load_matlab_kspace(path)
    assert load_matlab_kspace(path, variable="acq2").header["variable"] == "acq2"
    with pytest.raises(InputError, match="no variable 'nope'; found acq1"):
        load_matlab_kspace(path, variable="nope")
    # inside a struct (v5 and v7.3)
    assert load_matlab_kspace(_v5(tmp_path / "s.mat", s={"kspace": a, "te": 3.0})).header["variable"] == "s.kspace"
    assert "s.kspace" not in list_matlab_variables(_v73(tmp_path / "s73.mat", {"s": {"te": [3.0]}}))[0]


def test_mask_shapes(tmp_path):
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((6, 5, 2)) + 1j).astype(np.complex128)
    cols = np.array([1, 0, 1, 0, 1.0])
    got = load_matlab_kspace(_v5(tmp_path / "a.mat", kspace=k, mask=cols[None]))
    np.testing.assert_array_equal(got.mask[0], np.broadcast_to(cols.astype(bool), (6, 5)))
    with pytest.raises(InputError, match="mask .* does not fit"):
        load_matlab_kspace(_v5(tmp_path / "b.mat", kspace=k, mask=np.ones((4, 4))))


@pytest.mark.data
def test_real_16_coil_v73_file(shared_data):
    """The SENSE tutorial's raw_data.mat: MATLAB size (96, 96, 1, 16), complex double, fully
    sampled; compared with the recipe in mri/SOURCES.md (h5py + transpose)."""
    import h5py

    path = shared_data / "mri/multicoil/chiew_sense_tutorial_brain_16ch/raw_data.mat"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    got = load_kspace(str(path))
    assert got.data.shape == (16, 1, 96, 96) and got.mask.all() and got.coil_maps is None
    assert got.header["variable"] == "raw" and got.header["matlab_size"] == [96, 96, 1, 16]
    with h5py.File(path, "r") as hf:
        a = hf["raw"][()]
    ref = (a["real"] + 1j * a["imag"]).T  # (96, 96, 1, 16) in MATLAB order
    np.testing.assert_allclose(got.data, ref.transpose(3, 2, 0, 1).astype(np.complex64))
    # the coil-combined image is an upright axial brain: more signal left-right than top-bottom
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(got.data[:, 0], axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    rss = np.sqrt((np.abs(img) ** 2).sum(0))
    rows, cols = np.nonzero(rss > 0.2 * rss.max())
    assert np.ptp(rows) > np.ptp(cols)  # a head is longer front-to-back; front-to-back = rows


# ------------------------------------------------------------------ fuzz
def _bad_files(tmp_path: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(24)
    k = _kspace(c=2, z=1, ny=12, nx=10, maps=False)
    good73 = save_matlab_kspace(k, tmp_path / "good73.mat")
    good5 = _v5(tmp_path / "good5.mat", kspace=_matlab_order(k.data))
    cases: list[tuple[str, Path]] = []

    def add(name: str, data: bytes) -> None:
        p = tmp_path / f"{name}.mat"
        p.write_bytes(data)
        cases.append((name, p))

    for good in (good73, good5):
        raw = good.read_bytes()
        tag = good.stem
        for frac in (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
            add(f"{tag}_trunc{int(frac * 100)}", raw[: int(len(raw) * frac)])
        add(f"{tag}_header_only", raw[:128])
    add("random", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("random_v73_header", good73.read_bytes()[:128] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("random_v5_header", good5.read_bytes()[:128] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("text", b"kspace = [1 2 3];\n")
    add("zeros", bytes(1024))
    # wrong variables
    c = (rng.standard_normal((6, 5)) + 1j)
    for tag, write in (("v5", lambda n, **v: _v5(tmp_path / f"{n}.mat", **v)),
                       ("v73", lambda n, **v: _v73(tmp_path / f"{n}.mat", v))):
        for name, variables in {
            "real_only": {"kspace": np.ones((6, 5))},
            "char_only": {"note": "no data here"},
            "vector": {"kspace": c[0]},
            "five_dims": {"kspace": np.ones((2, 2, 2, 2, 2)) * 1j},
            "nan": {"kspace": c * np.nan},
            "inf_maps": {"kspace": c, "sens": c * np.inf},
            "maps_wrong_size": {"kspace": c, "sens": np.ones((3, 3)) * 1j},
            "mask_wrong_size": {"kspace": c, "mask": np.ones((2, 7))},
            "one_row": {"kspace": np.ones((1, 5)) * 1j},
            "empty_struct": {"s": {"te": [3.0]}},
        }.items():
            cases.append((f"{tag}_{name}", write(f"{tag}_{name}", **variables)))
    import h5py

    with h5py.File(tmp_path / "plain_hdf5.mat", "w") as hf:
        hf["kspace"] = c
    cases.append(("plain_hdf5", tmp_path / "plain_hdf5.mat"))
    cases.append(("missing", tmp_path / "missing.mat"))
    return cases


def _flips(good: Path, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    raw = bytearray(good.read_bytes())
    out = []
    for _ in range(n):
        b = bytearray(raw)
        for i in rng.integers(0, len(b), 8):
            b[i] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


def test_fuzz_every_bad_file_is_input_error(tmp_path):
    """Truncated, corrupt, random and wrong-variable files: InputError naming the file, never
    another exception."""
    for name, path in _bad_files(tmp_path):
        with pytest.raises(InputError) as info:
            load_matlab_kspace(path)
        assert path.name in str(info.value), name
        with pytest.raises(InputError):
            load_kspace(str(path))


def test_fuzz_wrong_variables_say_what_was_found_and_expected(tmp_path):
    path = _v73(tmp_path / "w.mat", {"image": np.ones((6, 5)), "note": "x"})
    with pytest.raises(InputError) as info:
        load_matlab_kspace(path)
    msg = str(info.value)
    assert "w.mat" in msg and "no recognisable k-space" in msg
    assert "image (6×5 double)" in msg and "note (" in msg and "expected a complex array" in msg


@pytest.mark.parametrize("which", ["v73", "v5"])
def test_fuzz_random_byte_flips(tmp_path, which):
    """Flipped bytes anywhere: the file loads (the flip hit sample values) or gives InputError."""
    k = _kspace(c=2, z=1, ny=12, nx=10, maps=False)
    good = (save_matlab_kspace(k, tmp_path / "g.mat") if which == "v73"
            else _v5(tmp_path / "g.mat", kspace=_matlab_order(k.data)))
    outcomes = {"ok": 0, "error": 0}
    for i, data in enumerate(_flips(good, 60, seed=7)):
        p = tmp_path / f"flip{i}.mat"
        p.write_bytes(data)
        try:
            got = load_matlab_kspace(p)
        except InputError as err:
            assert p.name in str(err)
            outcomes["error"] += 1
        else:
            assert got.data.ndim == 4
            outcomes["ok"] += 1
        os.unlink(p)
    assert sum(outcomes.values()) == 60


def test_corrupt_v5_tag_is_input_error_not_a_crash(tmp_path):
    """A v5 element tag with an unknown type used to crash scipy's compiled reader (SIGSEGV);
    the structure is now checked first.  Run in a child process so a crash fails only this test."""
    import struct
    import subprocess
    import sys

    k = np.ones((12, 10, 1, 2), np.complex64) * (1 + 2j)
    good = _v5(tmp_path / "good.mat", kspace=k)
    raw = bytearray(good.read_bytes())
    # the imaginary part's tag: miSINGLE (7) with 12·10·2·4 bytes, after the real part
    tag = struct.pack("<II", 7, 12 * 10 * 2 * 4)
    at = raw.index(tag, raw.index(tag) + 8)
    raw[at] = 251
    bad = tmp_path / "bad.mat"
    bad.write_bytes(bytes(raw))
    code = ("import sys\nfrom medrecon.datasets import load_matlab_kspace\nfrom medrecon.errors import InputError\n"
            "try:\n    load_matlab_kspace(sys.argv[1])\nexcept InputError as e:\n    print('InputError', e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"crashed with {run.returncode}: {run.stderr[-500:]}"
    assert run.stdout.startswith("InputError") and "bad.mat" in run.stdout and "unknown data type 251" in run.stdout


def test_scipy_reference_files_read_as_scipy_does():
    """MATLAB-written files of every version (scipy's test data): what scipy reads, the structure
    check accepts; what scipy refuses gives InputError."""
    import glob

    folder = Path(scipy_io.__file__).parent / "matlab" / "tests" / "data"
    files = sorted(glob.glob(str(folder / "*.mat")))
    if not files:
        pytest.skip("scipy's MATLAB test files are not installed")
    for f in files:
        try:
            scipy_io.loadmat(f)
            scipy_ok = True
        except Exception:  # noqa: BLE001
            scipy_ok = False
        try:
            list_matlab_variables(f)
            ok = True
        except InputError:
            ok = False
        assert ok == scipy_ok or "hdf5" in f, Path(f).name
