"""Feature extraction end to end on tiny synthetic slides: bags, attributes, resume, empty slides, sharding, CLI."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.data.bags import BagDataset
from milstudy.data.slides import write_pyramidal_tiff
from milstudy.features import extract_features, parse_shard

# Coarse slides (2 µm/px) keep tissue segmentation fast; tiles are 32 px at 4 µm/px = 64 level-0 px.
OPTIONS = dict(target_mpp=4.0, patch_size=32, batch_size=16, num_workers=0, device="cpu", progress=False)


def _tissue_image(size: int = 768, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.35 * size) ** 2
    image = np.full((size, size, 3), 245, np.uint8)
    pink = np.array([215, 120, 180]) + rng.integers(-25, 25, size=(size, size, 3))
    image[disc] = np.clip(pink, 0, 255)[disc]
    return image


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    write_pyramidal_tiff(root / "tissue.tiff", _tissue_image(), mpp=2.0, compression="zlib")
    write_pyramidal_tiff(root / "glass.tiff", np.full((256, 256, 3), 245, np.uint8), mpp=2.0, compression="zlib")
    manifest = pd.DataFrame({"slide_id": ["tissue", "glass", "gone"], "case_id": ["a", "b", "c"],
                             "path": ["tissue.tiff", "glass.tiff", "gone.tiff"], "label": ["ILC", "IDC", "IDC"]})
    return root, manifest


def test_extract_resume_and_load(cohort, tmp_path):
    torch.set_num_threads(1)
    root, manifest = cohort
    summary = extract_features(manifest, "tiny_cnn", tmp_path, slide_root=root, **OPTIONS)
    assert summary.set_index("slide_id")["status"].to_dict() == {"tissue": "done", "glass": "empty", "gone": "error"}
    assert "gone.tiff" in summary.set_index("slide_id").loc["gone", "message"]
    assert (tmp_path / "extraction_summary.csv").is_file()
    with h5py.File(tmp_path / "tissue.h5") as handle:
        n = int(handle.attrs["n_patches"])
        assert n > 20 and handle["features"].shape == (n, 64) and handle["features"].dtype == np.float32
        assert handle["coords"].dtype == np.int64 and handle.attrs["encoder"] == "tiny_cnn"
        assert handle.attrs["weight_hash"] == "random-init-seed0" and handle.attrs["size_level0"] == 64
        coords = handle["coords"][()]
    assert (coords % 64 == 0).all() and coords.min() >= 0 and coords.max() <= 768 - 64
    assert not list(tmp_path.glob(".*.tmp"))

    again = extract_features(manifest.iloc[:2], "tiny_cnn", tmp_path, slide_root=root, **OPTIONS)
    assert again["status"].tolist() == ["skipped", "skipped"]

    data = (tmp_path / "tissue.h5").read_bytes()
    (tmp_path / "tissue.h5").write_bytes(data[: len(data) // 2])  # a partial / corrupted output is redone
    redo = extract_features(manifest.iloc[:1], "tiny_cnn", tmp_path, slide_root=root, **OPTIONS)
    assert redo["status"].tolist() == ["done"]
    with pytest.warns(UserWarning, match="empty bags"):
        bags = BagDataset(manifest.iloc[:2], tmp_path, classes=["IDC", "ILC"])
    assert len(bags) == 1 and bags.skipped[0][0] == "glass"
    bag = bags[0]
    assert bag.features.shape == (n, 64) and bag.target == 1 and torch.equal(bag.coords, torch.from_numpy(coords))


def test_other_settings_are_not_skipped(cohort, tmp_path):
    root, manifest = cohort
    extract_features(manifest.iloc[:1], "tiny_cnn", tmp_path, slide_root=root, **OPTIONS)
    other = extract_features(manifest.iloc[:1], "tiny_cnn", tmp_path, slide_root=root, **{**OPTIONS, "patch_size": 64})
    assert other["status"].tolist() == ["done"]


def test_shards_partition_the_manifest(tmp_path):
    manifest = pd.DataFrame({"slide_id": [f"s{i}" for i in range(7)], "path": [f"/nowhere/s{i}.tiff" for i in range(7)]})
    seen = []
    for i in range(3):
        summary = extract_features(manifest, "tiny_cnn", tmp_path, shard=f"{i}/3", **OPTIONS)
        seen += summary["slide_id"].tolist()
        assert (tmp_path / f"extraction_summary_shard{i}of3.csv").is_file()
    assert sorted(seen) == sorted(manifest["slide_id"]) and len(seen) == 7
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("3/3")


def test_cli_reports_errors_with_exit_code(cohort, tmp_path, capsys):
    from milstudy.cli import main

    root, manifest = cohort
    path = tmp_path / "m.csv"
    manifest.iloc[1:].to_csv(path, index=False)
    code = main(["features", "extract", "--manifest", str(path), "--encoder", "tiny_cnn", "--out", str(tmp_path / "f"),
                 "--slide-root", str(root), "--mpp", "4.0", "--patch-size", "32", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "empty 1" in out and "error: gone" in out


def test_manifest_mask_path_writes_instance_labels(cohort, tmp_path):
    from PIL import Image

    root, manifest = cohort
    label_map = np.ones((192, 192), np.uint8)  # 4 level-0 px per mask px; tumour (2) in the left half
    label_map[:, :96] = 2
    Image.fromarray(label_map).save(tmp_path / "tissue_mask.png")
    rows = manifest.iloc[:1].assign(mask_path=str(tmp_path / "tissue_mask.png"), mask_downsample=4.0)
    extract_features(rows, "tiny_cnn", tmp_path / "bags", slide_root=root, **OPTIONS)
    bag = BagDataset(rows, tmp_path / "bags", classes=["IDC", "ILC"])[0]
    expected = (bag.coords[:, 0] < 384).long()  # 64-px patches entirely left of x = 384
    assert torch.equal(bag.instance_labels, expected) and 0 < expected.sum() < len(expected)


def _clam_patches(path, coords, patch_level, patch_size, downsample):
    """CLAM ``create_patches_fp.py`` output (``wsi_core/WholeSlideImage.py`` ``process_contour`` -> ``save_hdf5``,
    mahmoodlab/CLAM master): ``coords`` with ``patch_level``, ``patch_size`` (px at that level), ``downsample``."""
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update({"patch_level": patch_level, "patch_size": patch_size,
                              "downsample": np.array(downsample, np.float64), "name": path.stem})


def _trident_patches(path, coords, patch_size, patch_size_level0):
    """TRIDENT ``WSI.extract_tissue_coords`` output (``trident/wsi_objects/WSI.py``, mahmoodlab/TRIDENT@0408667):
    ``patches/<name>_patches.h5``, attributes on ``coords``."""
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update({"patch_size": patch_size, "patch_size_level0": patch_size_level0,
                              "level0_magnification": 5, "target_magnification": 2.5, "overlap": 0,
                              "name": "tissue", "savetodir": str(path.parent.parent)})


def test_clam_and_trident_coordinates_are_reused_and_our_bags_carry_their_attributes(cohort, tmp_path):
    """Extraction at coordinates written by CLAM or TRIDENT embeds exactly those patches (here: the ones our own
    tiling picks, so the features must be identical); a footprint that does not match the settings is refused."""
    torch.set_num_threads(1)
    root, manifest = cohort
    tissue = manifest.iloc[:1]
    ours = extract_features(tissue, "tiny_cnn", tmp_path / "ours", slide_root=root, **OPTIONS)
    with h5py.File(tmp_path / "ours" / "tissue.h5") as handle:
        coords, features = handle["coords"][()], handle["features"][()]
        assert handle["coords"].attrs["patch_size_level0"] == 64 and handle["coords"].attrs["patch_size"] == 32
    picked = coords[::3]  # another tool's choice: every third patch
    (tmp_path / "clam" / "patches").mkdir(parents=True)
    _clam_patches(tmp_path / "clam" / "patches" / "tissue.h5", picked, patch_level=0, patch_size=64,
                  downsample=(1.0, 1.0))
    (tmp_path / "trident" / "patches").mkdir(parents=True)
    _trident_patches(tmp_path / "trident" / "patches" / "tissue_patches.h5", picked, 32, 64)
    for tool in ("clam", "trident"):
        out = tmp_path / f"from_{tool}"
        summary = extract_features(tissue, "tiny_cnn", out, slide_root=root, coords_dir=tmp_path / tool, **OPTIONS)
        assert summary["status"].tolist() == ["done"] and ours["status"].tolist() == ["done"]
        with h5py.File(out / "tissue.h5") as handle:
            np.testing.assert_array_equal(handle["coords"][()], picked)
            np.testing.assert_allclose(handle["features"][()], features[::3], atol=1e-6)
    wrong = extract_features(tissue, "tiny_cnn", tmp_path / "wrong", slide_root=root, coords_dir=tmp_path / "trident",
                             **{**OPTIONS, "target_mpp": 2.0})
    assert wrong["status"].tolist() == ["error"]
    assert "cover 64 level-0 px, but 32 px at 2.0 µm/px cover 32" in wrong["message"].iloc[0]
    missing = extract_features(tissue, "tiny_cnn", tmp_path / "none", slide_root=root, coords_dir=tmp_path, **OPTIONS)
    assert "no patch coordinates for slide tissue" in missing["message"].iloc[0]


def test_resize_feeds_the_encoder_resampled_patches_and_keys_the_resume(cohort, tmp_path, monkeypatch):
    """--resize: the encoder sees patches of the asked size; a rerun without it redoes the bag."""
    import milstudy.features as features_module
    from milstudy.encoders import build_encoder

    torch.set_num_threads(1)
    root, manifest = cohort
    seen = []
    original = build_encoder

    def spying_encoder(*args, **kwargs):
        encoder = original(*args, **kwargs)
        encoder.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
        return encoder

    monkeypatch.setattr("milstudy.encoders.build_encoder", spying_encoder)
    tissue = manifest.iloc[:1]
    done = features_module.extract_features(tissue, "tiny_cnn", tmp_path, slide_root=root, resize=48, **OPTIONS)
    assert done["status"].tolist() == ["done"] and set(seen) == {(48, 48)}
    again = features_module.extract_features(tissue, "tiny_cnn", tmp_path, slide_root=root, **OPTIONS)
    assert again["status"].tolist() == ["done"] and "resize" in again["message"].iloc[0]
    with pytest.raises(ValueError, match="--resize must be a positive"):
        features_module.extract_features(tissue, "tiny_cnn", tmp_path, slide_root=root, resize=0, **OPTIONS)
