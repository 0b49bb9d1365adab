"""Label-quality audit: score training labels with a trained network and meta mask network.

A voxel whose label is wrong tends to keep a high loss and to get a low weight from the meta mask network, so
``1 - weight`` (and the loss) rank voxels by how likely their label is corrupted. Where the corruption masks are
known, :py:func:`detection_summary` measures that ranking (voxel AUROC, mean weight on corrupted and unchanged
voxels).

The networks, preprocessing and inferer are built from the bundle's own configs, so the scores are those of the
model the bundle trained; the maps are then taken back to each image's own grid and affine (MONAI's ``Invertd``
through the preprocessing), so that a viewer overlays them on the image. The command writes a weight map per case,
a CSV that ranks the cases by how much of their labelled structures the meta network distrusts, with the most
suspect region of each and the two simple rankings beside it (mean loss, and 1 − Dice of the label against the
prediction), and a figure of the worst cases::

    python -m scripts.audit --dataset_dir data/default --ckpt_dir models --out_dir runs/audit
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Invertd
from scipy import ndimage
from scipy.stats import rankdata
from torch import nn

from scripts.cases import case_id
from scripts.losses import voxel_cross_entropy
from scripts.meta_net import MetaMaskNet
from scripts.utils import dice, figure, save_figure, write_csv, write_json, write_nifti

__all__ = [
    "RANKINGS",
    "CaseScore",
    "TrainedModels",
    "auroc",
    "case_ranking",
    "detection_summary",
    "load_trained",
    "ranking_quality",
    "score_cases",
    "suspect_region",
]

# the case scores a ranking can sort by: the meta network's (``score``) and the two a user could take instead
RANKINGS = ("score", "mean_loss", "dice_disagreement")


@dataclass
class CaseScore:
    """The maps of one case, channel dimension removed, on the grid of the bundle's preprocessing, or on the image's
    own grid (``score_cases(..., on_image_grid=True)``); ``affine`` is that grid's."""

    name: str
    image: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    loss: np.ndarray
    weight: np.ndarray | None
    corruption_mask: np.ndarray | None
    affine: np.ndarray


@dataclass
class TrainedModels:
    """A parsed bundle config with its trained segmentation network and, where one was trained, meta network."""

    parser: ConfigParser
    network: nn.Module
    meta_network: MetaMaskNet | None


def _load_state(path: Path, key: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The state dict saved under ``key`` in ``path`` (ignite saves a lone object's state dict unwrapped)."""
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at {path}; train the bundle first or set ckpt_dir.")
    state = torch.load(path, map_location=device, weights_only=True)
    return state[key] if key in state and isinstance(state[key], Mapping) else state


def load_trained(
    config_files: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    with_meta_network: bool = True,
    meta_network_path: str | Path | None = None,
) -> TrainedModels:
    """
    Parse the bundle configs with ``overrides`` and load ``model.pt`` (and ``meta_network.pt``) from ``ckpt_dir``.

    Args:
        config_files: the configs the model was trained with, e.g. ``[configs/train.json]``.
        overrides: the same overrides as in training (``dataset_dir``, ``ckpt_dir``, ``patch_size``, ...).
        with_meta_network: also load the meta mask network; False for methods that train none.
        meta_network_path: the meta network's file, where it is not ``ckpt_dir/meta_network.pt`` (the MONAI Label
            app keeps it in ``models/meta/``, out of the files it offers as segmentation models).
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(dict(overrides or {}))
    device = parser.get_parsed_content("device")
    ckpt_dir = Path(parser.get_parsed_content("ckpt_dir"))
    network = parser.get_parsed_content("network")
    network.load_state_dict(_load_state(ckpt_dir / "model.pt", "model", device))
    meta_network = None
    if with_meta_network:
        meta_network = parser.get_parsed_content("meta_network")
        path = Path(meta_network_path) if meta_network_path else ckpt_dir / "meta_network.pt"
        meta_network.load_state_dict(_load_state(path, "meta_network", device))
        meta_network.eval()
    return TrainedModels(parser, network.eval(), meta_network)


@torch.no_grad()
def score_cases(
    models: TrainedModels, split: str = "training", datalist: str | Path | None = None, on_image_grid: bool = False
) -> Iterator[CaseScore]:
    """
    Yield the loss map, and the weight map where a meta network is loaded, of every case of a datalist split.

    The loss is the per-voxel cross-entropy of the network's prediction (sliding-window inference with the
    validation inferer) against the case's label as listed, i.e. the possibly corrupted training label.

    Args:
        models: the trained networks and their parsed config.
        split: the datalist split to score.
        datalist: a datalist JSON other than the config's (MONAI Label's scoring writes one of the submitted labels).
        on_image_grid: take every map back to the image's own grid and affine (MONAI's ``Invertd`` through the
            validation preprocessing, which pads to the patch size), for a viewer to overlay; else the maps stay on
            the padded grid the network saw.
    """
    parser = models.parser
    device = parser.get_parsed_content("device")
    dataset_dir = parser.get_parsed_content("dataset_dir")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    datalist = datalist or parser.get_parsed_content("datalist")
    for entry in load_decathlon_datalist(datalist, True, split, base_dir=dataset_dir):
        data = preprocessing(entry)
        image = torch.as_tensor(data["image"])[None].to(device)
        label = torch.as_tensor(data["label"])[None].to(device)
        logits = inferer(image, models.network)
        loss = voxel_cross_entropy(logits, label)
        maps = {"image": image[0], "label": label[0], "prediction": logits[0].argmax(0, keepdim=True), "loss": loss}
        if models.meta_network is not None:
            maps["weight"] = models.meta_network(models.meta_network.build_input(loss, logits, label, image))
        if "corruption_mask" in data:
            maps["corruption_mask"] = torch.as_tensor(data["corruption_mask"]).to(device)
        affine = np.asarray(data["image"].affine)
        if on_image_grid:
            maps, affine = _to_image_grid(maps, data["label"], preprocessing)
        arrays = {key: value[0].cpu().numpy() for key, value in maps.items()}
        yield CaseScore(
            name=case_id(entry["label"]),
            image=arrays["image"],
            label=arrays["label"],
            prediction=arrays["prediction"],
            loss=arrays["loss"],
            weight=arrays.get("weight"),
            corruption_mask=arrays["corruption_mask"] > 0 if "corruption_mask" in arrays else None,
            affine=affine,
        )


# maps that hold classes: inverted with nearest-neighbour interpolation
_DISCRETE_MAPS = ("label", "prediction", "corruption_mask")


def _to_image_grid(
    maps: Mapping[str, torch.Tensor], reference: MetaTensor, preprocessing: Any
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """``maps`` (each (1, *spatial) on the preprocessed grid) on the grid of the loaded image, by inverting the
    spatial transforms ``preprocessing`` applied to ``reference``, the preprocessed label, which records them (under
    its own key, ``label``: the inverse runs the transforms of that key); returns them with that grid's affine."""
    keys = [f"map_{key}" for key in maps]
    data = {"label": reference}
    for key, value in zip(keys, maps.values(), strict=True):
        data[key] = MetaTensor(value.detach().cpu(), meta=reference.meta)
    invert = Invertd(
        keys=keys,
        transform=preprocessing,
        orig_keys="label",
        nearest_interp=[key in _DISCRETE_MAPS for key in maps],
    )
    inverted = invert(data)
    result = {key: torch.as_tensor(inverted[k]) for key, k in zip(maps, keys, strict=True)}
    return result, np.asarray(inverted[keys[0]].affine)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (ties count one half); NaN if a class
    is empty.

    Computed as the Mann-Whitney statistic from average ranks, which is exact and takes one sort, so it suits
    millions of voxels.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"scores and positives must have the same size, got {scores.size} and {positives.size}.")
    num_pos = int(positives.sum())
    num_neg = positives.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    rank_sum = rankdata(scores)[positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def detection_summary(cases: Sequence[CaseScore]) -> dict[str, float]:
    """How well the loss and ``1 - weight`` single out corrupted voxels over all ``cases`` with a corruption mask.

    Returns ``auroc_loss``, ``auroc_weight`` (AUROC of ``1 - weight``), ``weight_corrupted`` and
    ``weight_unchanged`` (mean weight on changed and unchanged voxels); NaN where not defined (no mask, no
    corrupted voxel, or no meta network).
    """
    nan = float("nan")
    known = [c for c in cases if c.corruption_mask is not None]
    if not known:
        return {"auroc_loss": nan, "auroc_weight": nan, "weight_corrupted": nan, "weight_unchanged": nan}
    mask = np.concatenate([c.corruption_mask.ravel() for c in known])
    summary = {"auroc_loss": auroc(np.concatenate([c.loss.ravel() for c in known]), mask)}
    if any(c.weight is None for c in known):
        return {**summary, "auroc_weight": nan, "weight_corrupted": nan, "weight_unchanged": nan}
    weight = np.concatenate([c.weight.ravel() for c in known])
    return {
        **summary,
        "auroc_weight": auroc(1.0 - weight, mask),
        "weight_corrupted": float(weight[mask].mean()) if mask.any() else nan,
        "weight_unchanged": float(weight[~mask].mean()) if not mask.all() else nan,
    }


def case_ranking(cases: Sequence[CaseScore], low_weight: float = 0.5, band: int = 2) -> list[dict[str, Any]]:
    """
    Rank cases by estimated label corruption: the share of low-weight voxels around their labelled structures.

    A voxel has low weight when its weight is below ``low_weight`` times the median weight of all voxels of all
    ``cases``, so the threshold follows the meta network's overall scale. Corruption of a segmentation sits on and
    near its structures, so the score counts low-weight voxels in the *neighbourhood* of the structures (the
    labelled and the predicted foreground, dilated by ``band`` voxels: a structure the label misses entirely is
    still covered) and divides by its size; far background does not dilute it. Also reported: the
    share of low-weight voxels inside the label, and on its boundary (voxels within one voxel of a class change);
    where the most suspect region lies (:py:func:`suspect_region`: ``region_min``, ``region_max``, its voxel
    bounds, and ``region_centre``, its centre in the affine's world coordinates); and the two simple case scores a
    user could rank by instead, ``mean_loss`` and ``dice_disagreement`` (1 − the mean Dice, over the foreground
    classes, of the label against the network's prediction).
    Where a corruption mask is known, the row adds the truth: ``corrupted`` and ``changed_fraction``.

    Returns:
        one row per case, highest score first, with its ``rank`` (1 = most suspect).
    """
    if any(c.weight is None for c in cases):
        raise ValueError(
            "case_ranking needs the weight maps of a meta network; load_trained(..., with_meta_network=True)."
        )
    if not cases:
        return []
    threshold = low_weight * float(np.median(np.concatenate([c.weight.ravel() for c in cases])))
    rows = []
    for case in cases:
        low = case.weight < threshold
        foreground = case.label > 0
        structures = foreground | (case.prediction > 0)
        neighbourhood = ndimage.binary_dilation(structures, iterations=band) if structures.any() else structures
        boundary = ndimage.grey_dilation(case.label, size=3) != ndimage.grey_erosion(case.label, size=3)
        row: dict[str, Any] = {
            "case": case.name,
            # no structure in the label or the prediction: nothing near one to distrust
            "score": _share(low, neighbourhood) if neighbourhood.any() else 0.0,
            "low_weight_inside": _share(low, foreground),
            "low_weight_boundary": _share(low, boundary),
            "mean_weight": float(case.weight.mean()),
            "mean_loss": float(case.loss.mean()),
            "dice_disagreement": 1.0 - _mean_dice(case.label, case.prediction),
            **suspect_region(low & neighbourhood, case.affine),
        }
        if case.corruption_mask is not None:
            row["corrupted"] = bool(case.corruption_mask.any())
            row["changed_fraction"] = _share(case.corruption_mask, foreground | case.corruption_mask)
        rows.append(row)
    rows.sort(key=lambda r: r["score"], reverse=True)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def suspect_region(suspect: np.ndarray, affine: np.ndarray) -> dict[str, list[float] | list[int] | int]:
    """The largest connected component (26-connected) of the ``suspect`` voxels: its voxel bounds ``region_min``
    and ``region_max`` (inclusive), ``region_centre``, the centre of its bounds in world coordinates (``affine``
    applied), and ``region_voxels``, its size; empty lists and 0 when no voxel is suspect."""
    components, count = ndimage.label(suspect, structure=np.ones((3,) * suspect.ndim))
    if count == 0:
        return {"region_min": [], "region_max": [], "region_centre": [], "region_voxels": 0}
    sizes = np.bincount(components.ravel())[1:]
    largest = np.argwhere(components == int(np.argmax(sizes)) + 1)
    low, high = largest.min(axis=0), largest.max(axis=0)
    centre = affine @ np.append((low + high) / 2.0, 1.0)
    return {
        "region_min": low.tolist(),
        "region_max": high.tolist(),
        "region_centre": [round(float(c), 3) for c in centre[: suspect.ndim]],
        "region_voxels": int(sizes.max()),
    }


def _mean_dice(label: np.ndarray, prediction: np.ndarray) -> float:
    """The mean Dice over the foreground classes present in the label or the prediction; 1 when neither has any."""
    classes = [c for c in np.union1d(np.unique(label), np.unique(prediction)) if c > 0]
    return float(np.mean([dice(label == c, prediction == c) for c in classes])) if classes else 1.0


def _share(selected: np.ndarray, region: np.ndarray) -> float:
    """Share of ``region`` voxels that are ``selected``; NaN for an empty region."""
    size = int(region.sum())
    return float((selected & region).sum() / size) if size else float("nan")


def ranking_quality(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How well the ranking finds the truly corrupted cases (rows with ``corrupted``): case AUROC and precision
    at k of the meta network's ``score``, and the case AUROC of each simple score the rows hold
    (``case_auroc_mean_loss``, ``case_auroc_dice_disagreement``), so that the docs can say which ranks best.

    ``precision_at_k`` takes k = the number of truly corrupted cases: the share of them among the k most suspect.
    """
    known = [r for r in rows if "corrupted" in r]
    corrupted = np.array([r["corrupted"] for r in known], dtype=bool)
    others = [name for name in RANKINGS[1:] if known and all(name in r for r in known)]
    if not known or corrupted.all() or not corrupted.any():
        nan = float("nan")
        undefined = {"case_auroc": nan, "precision_at_k": nan, "k": int(corrupted.sum())}
        return {**undefined, **{f"case_auroc_{name}": nan for name in others}}
    k = int(corrupted.sum())
    top = sorted(known, key=lambda r: r["rank"])[:k]
    quality = {
        "case_auroc": auroc(np.array([r["score"] for r in known]), corrupted),
        "precision_at_k": sum(r["corrupted"] for r in top) / k,
        "k": k,
    }
    for name in others:
        quality[f"case_auroc_{name}"] = auroc(np.array([r[name] for r in known]), corrupted)
    return quality


def plot_overview(cases: Sequence[CaseScore], rows: Sequence[Mapping[str, Any]], path: Path, top_k: int = 4) -> None:
    """Image | label | weight map of the ``top_k`` most suspect cases, each on its slice with the most low-weight
    voxels near the label. Drawn on a pyplot-free ``Figure`` (:py:func:`scripts.utils.figure`), so that the
    caller's matplotlib backend and pyplot state are left alone."""
    by_name = {c.name: c for c in cases}
    shown = [by_name[r["case"]] for r in rows[:top_k]]
    fig = figure(figsize=(9, 3 * len(shown)))
    axes = fig.subplots(len(shown), 3, squeeze=False)
    for row, case, summary in zip(axes, shown, rows[: len(shown)], strict=True):
        z = int(np.argmax(((1.0 - case.weight) * (case.label > 0)).sum(axis=(0, 1))))
        row[0].imshow(case.image[..., z].T, cmap="gray", origin="lower")
        row[1].imshow(case.label[..., z].T, cmap="viridis", origin="lower", interpolation="nearest")
        weights = row[2].imshow(case.weight[..., z].T, cmap="magma", origin="lower", vmin=0.0)
        row[1].contour((case.label[..., z] > 0).T, levels=[0.5], colors="white", linewidths=0.6)
        row[2].contour((case.label[..., z] > 0).T, levels=[0.5], colors="cyan", linewidths=0.6)
        fig.colorbar(weights, ax=row[2], fraction=0.046)
        for ax, name in zip(row, ("image", "label under review", "MCPM weight (label outlined)"), strict=True):
            ax.set_title(f"#{summary['rank']} {case.name} z={z}: {name}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_audit(
    config_files: Sequence[str | Path],
    overrides: Mapping[str, Any],
    out_dir: Path,
    split: str = "training",
    low_weight: float = 0.5,
    top_k: int = 4,
) -> dict[str, Any]:
    """Score every case of ``split`` and write ``weights/<case>_weight.nii.gz`` (on the image's own grid and affine),
    ``ranking.csv``, ``overview.png`` and ``summary.json`` (voxel and case-level detection quality where corruption
    masks are known, with the case AUROC of the simple rankings beside the meta network's) to ``out_dir``.

    The files are written atomically (:py:mod:`scripts.utils`), so an interrupted audit leaves no half-written one.
    """
    models = load_trained(config_files, overrides)
    cases = list(score_cases(models, split, on_image_grid=True))
    if not cases:
        datalist = models.parser.get_parsed_content("datalist")
        raise ValueError(f"the datalist {datalist} has no {split!r} cases to audit.")
    for case in cases:
        write_nifti(case.weight.astype(np.float32), case.affine, out_dir / "weights" / f"{case.name}_weight.nii.gz")
    rows = case_ranking(cases, low_weight=low_weight)
    write_csv(rows, out_dir / "ranking.csv")
    plot_overview(cases, rows, out_dir / "overview.png", top_k=top_k)
    summary = {"cases": len(cases), **detection_summary(cases), **ranking_quality(rows)}
    write_json(summary, out_dir / "summary.json", indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point: audit the training labels of a trained MCPM bundle."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config_file", nargs="+", default=["configs/train.json"], help="the configs the model was trained with"
    )
    parser.add_argument("--dataset_dir", help="dataset folder (default: the config's)")
    parser.add_argument("--datalist", help="datalist JSON (default: the config's, <dataset_dir>/datalist.json)")
    parser.add_argument("--ckpt_dir", help="folder of model.pt and meta_network.pt (default: the config's)")
    parser.add_argument("--bundle_root", default=".", help="bundle root the config paths are relative to")
    parser.add_argument("--out_dir", type=Path, default=Path("runs/audit"))
    parser.add_argument("--split", default="training", help="datalist split to audit")
    parser.add_argument("--low_weight", type=float, default=0.5, help="low weight = below this times the median weight")
    parser.add_argument("--top_k", type=int, default=4, help="cases shown in overview.png")
    args = parser.parse_args(argv)
    keys = ("bundle_root", "dataset_dir", "datalist", "ckpt_dir")
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key)}
    summary = run_audit(args.config_file, overrides, args.out_dir, args.split, args.low_weight, args.top_k)
    print(json.dumps(summary, indent=2))
    out = args.out_dir
    print(f"ranking: {out / 'ranking.csv'}; weight maps: {out / 'weights'}; figure: {out / 'overview.png'}")
    return summary


if __name__ == "__main__":
    main()
