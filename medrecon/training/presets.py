"""Presets of the shipped priors (``medrecon train --preset NAME``) and their card text.

:data:`PRESETS` maps a name to :class:`~medrecon.training.config.TrainConfig` settings.
:data:`CARD_INFO` maps the same names to what ``--export`` adds to the model card (design,
training data and licences, notes, design comparisons, solver defaults).  That text lives in
data files, ``cards/*.json`` and ``cards/sources/*.json`` beside this module (installed as
package data), read once by :func:`load_card_info`.

Card-text files
---------------
Each file is a JSON object with up to three keys: ``"about"`` (prose for the reader, ignored),
``"blocks"`` (named pieces shared between entries) and ``"cards"`` (entries by preset name).
Names of blocks and cards are global over all files; a name defined twice is refused.  Inside
blocks and entries:

* ``{"$block": NAME}`` stands for block ``NAME``; as an item of a list it stands for the items
  of that (list) block, which are spliced in.  Blocks may use blocks.
* An entry with ``"$base": NAME`` starts as a copy of entry ``NAME``; ``"$drop": [KEYS]`` removes
  keys of that copy; its other keys replace or add entries (a replaced key keeps its place, a
  new one comes last, as in Python's ``{**base, ...}``); ``"$append": {KEY: VALUE}`` appends to
  the copy's string or list ``KEY`` (in that order: drop, set, append).

For example (``cards/ct.json``, shortened)::

    {"blocks": {"ct_crops_notes": ["The 1,195 crop slices ..."]},
     "cards": {"ct-256-v2": {"$base": "ct-256-pos",
                             "$append": {"design": " Continued from ct-256 v1 ..."},
                             "design_comparison": {"how": "..."}},
               "ct-256": {"$base": "ct-256-v2",
                          "notes": [{"$block": "common_notes"}, "Trained on ...",
                                    {"$block": "ct_crops_notes"}]}}}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from medrecon.errors import InputError
from medrecon.priors.registry import read_card

__all__ = [
    "PRESETS", "CARD_INFO", "CT_GROWN_DATA", "CT_V3_DATA", "CT_V3_WEIGHTS", "CT_3D_TUNING_VOLUME", "MRI_WIDE_DATA",
    "MRI_WIDE_WEIGHTS", "load_card_info",
]

CARDS_DIR = Path(__file__).resolve().parent / "cards"

# settings both shipped priors share: the "S" VE design on 64-pixel patches, validated every
# 20 minutes and stopped after three validations (an hour) without a gain of 0.02 dB
_SHIPPED_DESIGN: dict[str, Any] = dict(
    size="S",
    sde="ve",
    sigma_min=0.01,
    patch_size=64,
    batch_size=16,
    lr=2e-4,
    ema_decay=0.999,
    val_slices=8,
    validate_every_s=1200.0,
    patience=3,
    min_delta_db=0.02,
)

# the grown CT set (2026-12-06): ct/train.npz, the head volume and ct/extra (ct/extra/SOURCES.md);
# ct/val.npz and the 3-D benchmark volume stay out (RESERVED)
CT_GROWN_DATA: tuple[str, ...] = (
    "ct/train.npz",
    "ct/volumes/promed_ct0051_head.npz",
    "ct/extra/dashvtk_midrc_ricord1a.npz",
    "ct/extra/itkelastix_4dct_phase00.npz",
    "ct/extra/cornerstonedemo_ct_chest.npz",
    "ct/extra/cornerstonetools_bellona_chest.npz",
    "ct/extra/ibsi_ct_radiomics_phantom_lung.npz",
    "ct/extra/ibsi_sts_ct_crops.npz",
)

# the issue-23 design comparison on the grown set, both CT designs at the shipped SDE (the
# largest pairwise distance of the 1,977 grown slices is still 53.7, so sigma_max 60 holds and
# either can start from the shipped ct-256 with --init-from)
_CT_GROWN: dict[str, Any] = dict(
    modality="ct",
    data=CT_GROWN_DATA,
    # draws per file (CT_GROWN_DATA order): the arm/leg crops are 57 % of the slices but get a
    # quarter of the draws, the chest/abdomen files (the validation's anatomy) most of the rest
    data_weights=(0.2, 0.08, 0.17, 0.12, 0.09, 0.04, 0.05, 0.25),
    sigma_max=60.0,
    sigma_data=0.2,
    val_data="ct/val.npz",
    # the comparison continued the 13,844-step ct-256 (v1) weights (--init-from) at this lr
    lr=1e-4,
    warmup_steps=100,
    seed=23,
)

# the contiguous CT volume the volume methods (dds3d, mbir3d) are tuned and calibrated on
# (issue 34; benchmarks/mbir3d.py): a chest and upper abdomen series of 109 slices at 2.5 mm.
# ct-256 trained on it for its first 31,130 steps (campaign stages 1 and 2, about 7 % of the
# draws); it is out of the training data from stage 3 on (the card's training.data_history)
CT_3D_TUNING_VOLUME = "ct/extra/cornerstonedemo_ct_chest.npz"

# the CT set grown again (2026-12-07, issue 32): the grown set plus ct/extra2 (ct/extra2/SOURCES.md:
# 278 slices of 210 patients, most of them head CT); ct/val.npz, the 3-D benchmark volume and the
# 3-D tuning volume stay out
CT_V3_DATA: tuple[str, ...] = tuple(f for f in CT_GROWN_DATA if f != CT_3D_TUNING_VOLUME) + (
    "ct/extra2/rsna_ich_george091.npz",
    "ct/extra2/rsna_ich_ahmad_alqaisi215.npz",
    "ct/extra2/rsna_ich_azza_elkhalifa.npz",
    "ct/extra2/lidc_concept_to_clinic.npz",
    "ct/extra2/tcga_thca_dashvtk_wholebody.npz",
    "ct/extra2/pancreatic_ct_cbct_seg_pyvista.npz",
    "ct/extra2/dcmqi_ct3slice_abdomen.npz",
)
# draws per file (CT_V3_DATA order): the grown set keeps its proportions at 83 % of the draws;
# extra2 gets 17 %, most of it the 201 head-CT patients (the bundled main-job slice is a head)
CT_V3_WEIGHTS: tuple[float, ...] = tuple(
    round(0.83 * w, 4) for f, w in zip(CT_GROWN_DATA, _CT_GROWN["data_weights"], strict=True) if f != CT_3D_TUNING_VOLUME
) + (
    0.09, 0.01, 0.002, 0.03, 0.015, 0.015, 0.008,
)

PRESETS: dict[str, dict[str, Any]] = {
    # the first shipped CT prior (13,844 steps, 2026-12-05): "S", 64² patches, 240 slices
    "ct-256-v1": dict(
        _SHIPPED_DESIGN,
        run="ct-256-v1",
        modality="ct",
        data=("ct/train.npz", "ct/volumes/promed_ct0051_head.npz"),
        sigma_max=60.0,
        sigma_data=0.2,
        val_data="ct/val.npz",
    ),
    # the first shipped MRI prior (11,973 steps, 2026-12-05): "S", 64² patches, no position
    "mri-256-v1": dict(
        _SHIPPED_DESIGN,
        run="mri-256-v1",
        modality="mri",
        data=("mri/train.npz",),
        sigma_max=110.0,
        sigma_data=0.25,
        val_data="mri/val.npz",
    ),
    "ct-256-grown": dict(_SHIPPED_DESIGN, **_CT_GROWN, run="ct-256-grown"),
    # position-aware (PaDIS): coordinate channels, patches of 64, 128 and whole 256 slices, batch
    # sizes for the same 65,536 pixels per step as the 64-pixel design (so steps cost about the
    # same), whole-image previews; validation is whole-slice Tweedie as for every design
    "ct-256-pos": dict(
        _SHIPPED_DESIGN,
        **_CT_GROWN,
        run="ct-256-pos",
        coords=True,
        patch_size=None,
        patch_sizes=(64, 128, 256),
        patch_probs=(0.5, 0.3, 0.2),
        patch_batch=(16, 4, 1),
        sample_size=256,
        sample_count=2,
        sample_every_s=7200.0,
    ),
}
# the shipped ct-256 (v2, issue 23): the position-aware design on the grown set, the winner of
# the design comparison; a new machine continues from the shipped weights (a checkpoint in the
# run's folder takes precedence: it resumes exactly)
PRESETS["ct-256-v2"] = dict(PRESETS["ct-256-pos"], run="ct-256-v2", init_from="ct-256")
# the campaign recipe (issue 32, chosen by benchmarks/train_recipe.py at equal wall time): bfloat16
# autocast where the CPU computes it natively (1.6x the steps per hour, validation level with
# float32), three quarters of the noise draws at the levels DDS and CCDF query from a classical
# start, and no plateau stop inside a session (the campaign ends per submission, issue 32)
_CAMPAIGN: dict[str, Any] = dict(precision="auto", t_dist="focused", high_share=0.25, patience=0)
# the shipped ct-256 (v3, issue 32): the v2 design on the CT set grown by ct/extra2, trained with
# the campaign recipe; σ ≤ 0.5 covers t0 of every tuned CT key (σ(t0) 0.09 / 0.30 / 0.40 at
# 23 / 60 / 10 views)
PRESETS["ct-256"] = dict(
    PRESETS["ct-256-pos"], **_CAMPAIGN, focus_sigma=0.5, run="ct-256", init_from="ct-256",
    data=CT_V3_DATA, data_weights=CT_V3_WEIGHTS,
)
# the position-aware design on the unchanged MRI set (issue 23 item 3), ready to continue
# mri-256 (--init-from mri-256 widens it with zero-weight coordinate inputs)
PRESETS["mri-256-pos"] = dict(
    PRESETS["mri-256-v1"],
    run="mri-256-pos",
    **{k: PRESETS["ct-256-pos"][k] for k in ("coords", "patch_size", "patch_sizes", "patch_probs", "patch_batch",
                                             "sample_size", "sample_count", "sample_every_s")},
    lr=1e-4,
    warmup_steps=100,
)
# the shipped mri-256 (v2, issue 23 item 3): mri-256-pos continued from v1; like ct-256, a new
# machine continues the shipped weights and a checkpoint in the run's folder resumes exactly
PRESETS["mri-256-v2"] = dict(PRESETS["mri-256-pos"], run="mri-256-v2", init_from="mri-256")
# the shipped mri-256 (v3, issue 32): v2's design and data with the campaign recipe; the MRI SDE
# (sigma_max 110) puts t0 of the tuned keys at σ up to 0.52 (mri-1d-8), hence σ ≤ 0.7
# mri-256 v3 stages 1-2 (issue 32): v2's design and data with the campaign recipe; the MRI SDE
# (sigma_max 110) puts t0 of the tuned keys at σ up to 0.52 (mri-1d-8), hence σ ≤ 0.7.  Kept as
# the FLAIR-only control of the widening below.
PRESETS["mri-256-flair"] = dict(PRESETS["mri-256-pos"], **_CAMPAIGN, focus_sigma=0.7, run="mri-256-flair",
                                init_from="mri-256")
# the shipped mri-256 (v3 stage 3, issue 32 item 5): the MRI set widened with the real T1 volumes
# of ../shared/data/mri (IXI015, a healthy adult, and the contrast-enhanced T1 MPRAGE slab of
# VS-SEG-001), resliced axially at the FLAIR slices' scale (training.data.volume_training_slices);
# IXI012 stays out (the MRI benchmark case and the held-out T1 check, RESERVED).  A quarter of the
# draws go to the T1 volumes, so their ~140 slices are seen often without drowning the 1,128
# FLAIR slices.
MRI_WIDE_DATA = ("mri/train.npz", "mri/nifti/IXI015-HH-1258_T1.nii.gz", "mri/dicom/vs_seg_001_t1c")
MRI_WIDE_WEIGHTS = (0.75, 0.15, 0.10)
PRESETS["mri-256"] = dict(PRESETS["mri-256-flair"], run="mri-256", data=MRI_WIDE_DATA, data_weights=MRI_WIDE_WEIGHTS)


def load_card_info(directory: str | Path = CARDS_DIR) -> dict[str, dict[str, Any]]:
    """The card text of every entry in the ``*.json`` files under ``directory`` (sorted by path),
    with blocks and bases resolved (module docstring).

    Parameters
    ----------
    directory : str or Path
        Folder of card-text files, searched recursively (default: ``cards/`` beside this module).

    Returns
    -------
    dict
        Preset name → card text (a JSON-like dict); every entry is an independent copy.

    Raises
    ------
    InputError
        A file is unreadable or not an object, defines a name twice, names a block or a base
        entry that does not exist (or that leads back to itself), splices a block that is not a
        list, or drops or appends to a key its base does not have.
    """
    blocks: dict[str, tuple[Path, Any]] = {}
    raw: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(Path(directory).rglob("*.json")):
        text = read_card(path)
        for kind, table in (("blocks", blocks), ("cards", raw)):
            for name, value in text.get(kind, {}).items():
                if name in blocks or name in raw:
                    raise InputError(path, f"card text: {name!r} is defined twice")
                table[name] = (path, value)

    def is_ref(value: Any) -> bool:
        return isinstance(value, dict) and set(value) == {"$block"}

    def expand(value: Any, path: Path, seen: tuple[str, ...] = ()) -> Any:
        if is_ref(value):
            name = value["$block"]
            if name not in blocks or name in seen:
                raise InputError(path, f"card text: unknown or circular block {name!r}")
            return expand(blocks[name][1], blocks[name][0], (*seen, name))
        if isinstance(value, dict):
            return {k: expand(v, path, seen) for k, v in value.items()}
        if not isinstance(value, list):
            return value
        out: list[Any] = []
        for item in value:
            got = expand(item, path, seen)
            if is_ref(item) and not isinstance(got, list):
                raise InputError(path, f"card text: block {item['$block']!r} in a list is no list")
            out += got if is_ref(item) else [got]
        return out

    done: dict[str, dict[str, Any]] = {}

    def resolve(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
        if name in done:
            return done[name]
        path, entry = raw[name]
        base = entry.get("$base")
        if base is not None and (base not in raw or base in seen):
            raise InputError(path, f"card text: {name!r} has an unknown or circular $base {base!r}")
        card = copy.deepcopy(resolve(base, (*seen, base))) if base is not None else {}
        drop, append = entry.get("$drop", []), entry.get("$append", {})
        missing = [k for k in [*drop, *append] if k not in card]
        unknown = [k for k in entry if k.startswith("$") and k not in ("$base", "$drop", "$append")]
        if missing or unknown:
            raise InputError(
                path, f"card text: {name!r}: no key {missing} in its base / unknown {unknown}"
            )
        for key in drop:
            del card[key]
        card.update({k: expand(v, path) for k, v in entry.items() if not k.startswith("$")})
        for key, more in append.items():
            card[key] = card[key] + expand(more, path)
        done[name] = card
        return card

    return {name: copy.deepcopy(resolve(name, (name,))) for name in raw}


CARD_INFO: dict[str, dict[str, Any]] = load_card_info()
