"""Is an MRI array k-space or coil images?  The energy at the centre of k-space tells.

The k-space of an image holds most of its energy at low spatial frequencies, at the centre of
the array (centred FFT convention, :mod:`medrecon.datasets.types`): the central quarter of each
axis (1/16 of the area) holds 87 % of the energy of the SENSE tutorial's 16-coil brain k-space,
99 % of the BART workshop's (undersampled) brain k-space and 91-98 % of the k-space of the 120
FLAIR validation slices.  Coil images spread their energy over the object: the same box holds
4-27 % of it, while their Fourier transform holds more than 80 %.  An array is taken for images
when its centre holds less than :data:`IMAGE_BELOW` of its energy and its Fourier transform at
least :data:`CONTRAST` times as much (so that noise, which is flat in both domains, is not).

:func:`kspace_domain` measures; :func:`check_kspace_domain` refuses coil images with a message
saying how to read them; :func:`kspace_from_coil_images` turns coil images into fully sampled
k-space (``load_kspace(path, input_domain="image")``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets.types import KSpace
from medrecon.errors import InputError

__all__ = ["kspace_domain", "check_kspace_domain", "kspace_from_coil_images", "IMAGE_BELOW", "CONTRAST",
           "MIN_SIZE"]

#: an array whose central 1/16 holds less than this share of its energy may be images ...
IMAGE_BELOW = 0.3
#: ... when its Fourier transform holds at least this many times that share there
CONTRAST = 2.0
#: arrays with fewer rows or columns than this are too small to judge (always taken as k-space)
MIN_SIZE = 16
#: at most this many slices are measured (evenly spaced)
_MAX_SLICES = 8


def _fft2c(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (the :class:`KSpace` convention)."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _centre_share(a: np.ndarray) -> float:
    """Share of the energy of ``a`` (..., H, W) inside its central H/4 × W/4 box."""
    e = np.abs(a) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1.0
    ny, nx = e.shape[-2:]
    hy, hx = max(1, ny // 8), max(1, nx // 8)
    return float(e[..., ny // 2 - hy : ny // 2 + hy, nx // 2 - hx : nx // 2 + hx].sum()) / total


def kspace_domain(data: np.ndarray) -> dict[str, Any]:
    """How k-space-like an array is: the share of its energy at the centre, as is and transformed.

    Parameters
    ----------
    data : ndarray, shape (coils, Z, ky, kx) (or any (..., H, W)), complex
        What a k-space reader returned (:attr:`KSpace.data`).

    Returns
    -------
    dict
        ``centre_energy`` (share of the energy in the central 1/4 × 1/4 of the array),
        ``centre_energy_transformed`` (the same of its centred Fourier transform, i.e. if the
        array were images) and ``looks_like``: ``"images"`` when the first is below
        :data:`IMAGE_BELOW` and the second at least :data:`CONTRAST` times it, else
        ``"kspace"`` (also for arrays smaller than :data:`MIN_SIZE`, which are not judged).

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((1, 1, 32, 32), np.complex64)
    >>> image[..., 6:26, 8:24] = 1.0
    >>> kspace_domain(image)["looks_like"], kspace_domain(_fft2c(image))["looks_like"]
    ('images', 'kspace')
    """
    a = np.asarray(data)
    if a.ndim == 4 and a.shape[1] > _MAX_SLICES:
        a = a[:, np.linspace(0, a.shape[1] - 1, _MAX_SLICES).round().astype(int)]
    if min(a.shape[-2:]) < MIN_SIZE:
        return {"centre_energy": None, "centre_energy_transformed": None, "looks_like": "kspace"}
    here, transformed = _centre_share(a), _centre_share(_fft2c(a))
    images = here < IMAGE_BELOW and transformed >= CONTRAST * here
    return {"centre_energy": round(here, 4), "centre_energy_transformed": round(transformed, 4),
            "looks_like": "images" if images else "kspace"}


def _what(kspace: KSpace) -> str:
    """``variable data (256×256×8 complex double)`` for a MATLAB file, else the array's shape."""
    header = kspace.header or {}
    name = header.get("variable")
    listed = next((v for v in header.get("variables", []) if name and str(v).startswith(f"{name} (")), None)
    if listed:
        return f"variable {listed}"
    return f"the data ({'×'.join(str(s) for s in kspace.data.shape)} as coils × slices × ky × kx)"


def check_kspace_domain(kspace: KSpace, path: str | Path) -> dict[str, Any]:
    """Refuse coil images read as k-space; return :func:`kspace_domain`'s report otherwise.

    Raises
    ------
    InputError
        The data look like coil images.  The message names the file (and the MATLAB variable),
        gives the two energy shares, and says how to read images: ``input_domain="image"``
        (``--input-domain image``), or ``input_domain="kspace"`` to take the file as k-space
        all the same.
    """
    report = kspace_domain(kspace.data)
    if report["looks_like"] == "images":
        raise InputError(
            path,
            f"{_what(kspace)} looks like coil images, not k-space: {100 * report['centre_energy']:.0f} % of its "
            f"energy lies in the central 1/16 of the array, {100 * report['centre_energy_transformed']:.0f} % once "
            f"Fourier transformed (the k-space of an image holds most of its energy there, over 80 % in measured "
            f"data; below {100 * IMAGE_BELOW:.0f} % is taken for images); "
            "to reconstruct from coil images pass input_domain='image' (--input-domain image), to read it as "
            "k-space all the same input_domain='kspace' (--input-domain kspace)",
        )
    return report


def kspace_from_coil_images(images: KSpace, path: str | Path | None = None) -> KSpace:
    """Fully sampled k-space from coil images: the centred orthonormal FFT of each coil image.

    Parameters
    ----------
    images : KSpace
        What a k-space reader returned from a file that holds coil images, ``data`` (coils, Z,
        H, W) complex.  Its mask is ignored (images have no sampling); coil maps are kept.
    path : str or Path, optional
        The file, named in the warning given when the data look like k-space instead.

    Returns
    -------
    KSpace
        ``data`` the k-space (complex64), ``mask`` all True, ``header`` with
        ``input_domain="image"`` and the :func:`kspace_domain` report of the images.
    """
    report = kspace_domain(images.data)
    if report["looks_like"] != "images" and report["centre_energy"] is not None and \
            report["centre_energy"] >= IMAGE_BELOW:
        warnings.warn(f"{path or 'input'}: read as coil images (input_domain='image'), but {_what(images)} "
                      f"looks like k-space ({100 * report['centre_energy']:.0f} % of its energy in the central "
                      "1/16 of the array)", UserWarning, stacklevel=3)
    data = _fft2c(np.asarray(images.data)).astype(np.complex64)
    mask = np.ones((1, *data.shape[2:]), bool)
    header = {**(images.header or {}), "input_domain": "image", "image_domain_check": report}
    return KSpace(data, mask=mask, coil_maps=images.coil_maps, header=header)
