"""The default method per operator key (issue 31 item 1): measured on the card, classical where
diffusion lost or was never measured, and a failing default diffusion run falls back."""

from __future__ import annotations

import math

import pytest
import torch

from medrecon import api, reconstruct
from medrecon.operators import MaskedFourier, ParallelBeamCT, mri_mask
from medrecon.priors.registry import read_card, write_card
from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
from medrecon.solvers.cards import measured_default, operator_key
from medrecon.priors.sde import VESDE
from medrecon.tuning import store_benchmark

SHA = "a" * 64
N = 8


def _row(config, noise, **psnr):
    return {"config": config, "noise_rel": noise, "psnr": psnr,
            "settings": {m: {"lam": 1e-3 * (i + 1)} for i, m in enumerate(psnr) if m in ("tv", "l1-wavelet")}}


def _card(table, sha=SHA):
    return {"sha256": sha, "benchmark": {k: {"weights_sha256": sha, "n_images": 3, "rows": rows}
                                         for k, rows in table.items()}}


A23 = ParallelBeamCT.sparse_view(16, 23)
A10 = ParallelBeamCT.sparse_view(16, 10)
A30 = ParallelBeamCT.sparse_view(16, 30)
A_MRI = MaskedFourier(mri_mask("equispaced", (16, 16), 4, 0.08, seed=0))

# (card, operator, expected method, expected lam or None, measured, words in the reason)
CASES = [
    ("dds wins every row", _card({"parallel-23": [_row("ct-23v", 0, tv=35.0, dds=37.0),
                                                   _row("ct-23v-noisy", 0.005, tv=34.0, dds=35.5)]}),
     A23, "dds", None, True, ["+1.50"]),
    ("dds loses one row", _card({"parallel-23": [_row("ct-23v", 0, tv=35.0, dds=37.0),
                                                  _row("ct-23v-noisy", 0.005, tv=34.0, dds=33.9)]}),
     A23, "tv", 1e-3, True, ["-0.10"]),
    ("l1 beats tv, dds loses", _card({"mri-1d-4": [_row("mri", 0, tv=26.0, **{"l1-wavelet": 27.0}, dds=26.5)]}),
     A_MRI, "l1-wavelet", 2e-3, True, ["l1-wavelet is the default"]),
    ("unmeasured key: nearest measured key's classical",
     _card({"parallel-23": [_row("a", 0, tv=35.0, dds=37.0)],
            "parallel-60": [_row("b", 0, **{"l1-wavelet": 40.0}, tv=39.0, dds=44.0)]}),
     A30, "tv", 1e-3, False, ["unmeasured", "parallel-23", "--method dds"]),
    ("benchmark on other weights is unmeasured", _card({"parallel-10": [_row("x", 0, tv=30.0, dds=31.0)]}, sha="b" * 64)
     | {"sha256": SHA}, A10, "tv", None, False, ["unmeasured", "other weights"]),
    ("no benchmark at all", {"sha256": SHA}, A10, "tv", None, False, ["unmeasured"]),
    ("other kind only", _card({"mri-1d-4": [_row("m", 0, tv=30.0, dds=31.0)]}), A10, "tv", None, False,
     ["unmeasured"]),
]


@pytest.mark.parametrize(("name", "card", "A", "method", "lam", "measured", "words"), CASES, ids=[c[0] for c in CASES])
def test_measured_default_table(name, card, A, method, lam, measured, words):  # noqa: N803
    choice = measured_default(card, A, "dds")
    assert choice.method == method, choice
    assert choice.measured is measured
    assert choice.settings.get("lam") == lam
    for w in words:
        assert w in choice.reason, (w, choice.reason)
    assert choice.classical in ("tv", "l1-wavelet")


def test_store_benchmark_replaces_its_rows_and_drops_other_weights(tmp_path):
    path = tmp_path / "p.json"
    write_card(path, {"sha256": SHA, "benchmark": {"parallel-23": {"weights_sha256": "c" * 64,
                                                                   "rows": [_row("old", 0, tv=1.0, dds=2.0)]}}})
    store_benchmark(path, "parallel-23", [_row("ct-23v", 0, tv=35.0, dds=37.0)], images="rows 1", n_images=1)
    store_benchmark(path, "parallel-23", [_row("ct-23v-noisy", 0.005, tv=34.0, dds=35.0)], images="rows 1", n_images=1)
    store_benchmark(path, "parallel-23", [_row("ct-23v", 0, tv=35.5, dds=36.0)], images="rows 1", n_images=1)
    entry = read_card(path)["benchmark"]["parallel-23"]
    assert entry["weights_sha256"] == SHA
    assert sorted((r["config"], r["psnr"]["tv"]) for r in entry["rows"]) == [("ct-23v", 35.5), ("ct-23v-noisy", 34.0)]
    with pytest.raises(Exception, match="psnr"):
        store_benchmark(path, "parallel-23", [{"config": "x", "psnr": {"dds": 1.0}}], images="", n_images=1)


class _Prior(GaussianPrior):
    """An analytic prior with a model card (what default_choice reads)."""

    def __init__(self, card, broken=False):
        super().__init__(0.5 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VESDE(0.01, 5.0))
        self.card, self.broken = card, broken

    def score(self, x, t):
        return torch.zeros_like(x) if self.broken else super().score(x, t)


def _ct_problem():
    A = ParallelBeamCT(N, torch.arange(4).double().numpy() * math.pi / 4)  # noqa: N806
    g = torch.Generator().manual_seed(1)
    hu = -1024 + 4096 * (0.5 + 0.1 * torch.randn(1, 1, N, N, generator=g, dtype=torch.float64))
    return A, A(hu)


def test_reconstruct_without_method_runs_the_keys_classical_default_at_its_weight():
    A, y = _ct_problem()  # noqa: N806
    key = operator_key(A)
    card = _card({key: [_row("c", 0, tv=30.0, dds=29.0)]})
    rec = reconstruct(y, A, prior=_Prior(card), iters=5)
    assert rec.info["method"] == "tv" and rec.info["settings"]["lam"] == pytest.approx(1e-3)
    assert rec.info["default"]["method"] == "tv" and rec.info["default"]["measured"] is True
    assert rec.std is None


def test_a_failing_default_falls_back_and_a_named_method_keeps_its_result():
    """A broken score (no denoising) from noise makes DDS fail; as the default it returns the
    key's classical estimate and says why; named, it keeps its own result with the warning."""
    A, y = _ct_problem()  # noqa: N806
    key = operator_key(A)
    card = _card({key: [_row("c", 0, tv=30.0, dds=31.0)]})
    kw = {"n_samples": 2, "steps": 30, "start": "noise"}
    named = reconstruct(y, A, "dds", prior=_Prior(card, broken=True), **kw)
    assert named.info["failing"] and named.info["method"] == "dds" and "fallback" not in named.info
    default = reconstruct(y, A, prior=_Prior(card, broken=True), **kw)
    assert default.info["method"] == "tv" and default.info["fallback"]["from"] == "dds"
    assert any("returned the tv estimate" in w for w in default.info["warnings"])
    assert default.info["default"]["method"] == "dds"
    torch.testing.assert_close(default.mean, reconstruct(y, A, "tv", lam=1e-3).mean)
    good = reconstruct(y, A, prior=_Prior(card), n_samples=2, steps=30, t0=0.5)
    assert good.info["method"] == "dds" and not good.info["failing"] and "fallback" not in good.info


def test_shipped_cards_choose_per_key():
    """The shipped cards hold a benchmark for their measured keys (DDS won there on the report
    rows); an unmeasured key gets a classical method and says that DDS is unmeasured."""
    from medrecon.priors.registry import shipped_registry

    ct = api.default_choice(ParallelBeamCT.sparse_view(16, 37))
    assert ct.method in ("tv", "l1-wavelet") and not ct.measured and "unmeasured" in ct.reason
    for prior, key in (("ct-256", "parallel-23"), ("ct-256", "parallel-60"), ("mri-256", "mri-1d-4")):
        assert key in shipped_registry().card(prior).get("benchmark", {}), (prior, key)
    assert api.default_choice(ParallelBeamCT.sparse_view(16, 23)).measured
    assert api.default_choice(A_MRI).measured and operator_key(A_MRI) == "mri-1d-4"
