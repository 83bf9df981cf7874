"""CamSegDataModule: batch shapes, augmentation alignment, normalisation, 2.5D, full resolution."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from camseg.data.datamodule import CamSegDataModule, collate
from camseg.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from conftest import DatasetKit


def make_dm(root: Path, **kwargs: Any) -> CamSegDataModule:
    args: dict[str, Any] = {
        "root": str(root),
        "image_size": 32,
        "batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
        "train_transforms": None,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }
    args.update(kwargs)
    dm = CamSegDataModule(**args)
    dm.setup("fit")
    return dm


def rgb_root(tmp_path: Path, kit: DatasetKit, patients: int = 5, size: int = 40) -> Path:
    rng = np.random.default_rng(3)
    records = []
    for p in range(patients):
        for s in range(3):
            image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            positive = (p + s) % 2
            mask = np.zeros((size, size), np.uint8)
            mask[5:10, 5:10] = positive
            records.append(
                kit.Record(
                    f"c{p}_{s}", image, {"a": positive, "b": 1 - positive}, mask, group=f"c{p}"
                )
            )
    return kit.write(tmp_path / "rgb", records, ["a", "b"])


@pytest.mark.parametrize("source", ["grey", "rgb"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_batch_shapes_and_dtypes(
    tmp_path: Path, tiny_dataset: Path, kit: DatasetKit, source: str, in_channels: int
) -> None:
    root = tiny_dataset if source == "grey" else rgb_root(tmp_path, kit)
    k = 1 if source == "grey" else 2
    dm = make_dm(root, in_channels=in_channels, mean=[0.0], std=[1.0])
    assert dm.num_classes == k
    batch = next(iter(dm.train_dataloader()))
    b = batch["image"].shape[0]
    assert 1 <= b <= 4
    assert batch["image"].dtype == torch.float32
    assert batch["image"].shape == (b, in_channels, 32, 32)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (b, 32, 32)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (b, k)
    assert batch["has_mask"].all()
    assert batch["orig_size"].tolist() == [[48, 48] if source == "grey" else [40, 40]] * b
    assert len(batch["id"]) == b
    for name in ("val", "test"):
        loader = getattr(dm, f"{name}_dataloader")()
        assert next(iter(loader))["image"].shape[1:] == (in_channels, 32, 32)
    img = batch["image"]
    if source == "grey" and in_channels == 3:
        # A grey image repeated: three equal channels.
        assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 0], img[:, 2])


def test_channel_conversion_values(tmp_path: Path, kit: DatasetKit) -> None:
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 30, 90, 210
    records = [kit.Record(f"x{i}", colour, {"y": i % 2}, split="train") for i in range(2)]
    root = kit.write(tmp_path / "c", records, ["y"])
    grey = make_dm(root, in_channels=1, mean=[0.0], std=[1.0]).dataset("train", train=False)[0][
        "image"
    ]
    torch.testing.assert_close(grey, torch.full((1, 32, 32), 110 / 255))  # mean of 30, 90, 210
    rgb = make_dm(root, in_channels=3, mean=[0.0], std=[1.0]).dataset("train", train=False)[0][
        "image"
    ]
    torch.testing.assert_close(rgb[:, 0, 0], torch.tensor([30, 90, 210]) / 255)


def test_normalisation_uses_mean_and_std(tmp_path: Path, kit: DatasetKit) -> None:
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 51, 102, 204
    records = [kit.Record(f"x{i}", colour, {"y": i % 2}, split="train") for i in range(2)]
    root = kit.write(tmp_path / "n", records, ["y"])
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    img = make_dm(root, in_channels=3, mean=mean, std=std).dataset("train", train=False)[0]["image"]
    expected = [(v / 255 - m) / s for v, m, s in zip((51, 102, 204), mean, std)]
    for c in range(3):
        torch.testing.assert_close(img[c], torch.full((32, 32), expected[c]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"data\.mean/std need 1 or 3 values, got 2/3"):
        make_dm(root, in_channels=3, mean=[0.1, 0.2], std=std).dataset("train", train=False)


def square_root(tmp_path: Path, kit: DatasetKit, size: int = 48) -> Path:
    """Bright asymmetric squares in the left half on a dark background; the mask is exactly the square."""
    rng = np.random.default_rng(5)
    records = []
    for i in range(8):
        image = np.full((size, size), 10, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = int(rng.integers(8, 24)), int(rng.integers(6, 12))
        mask[y0 : y0 + 14, x0 : x0 + 10] = 1
        image[mask == 1] = 240
        records.append(kit.Record(f"q{i}", image, {"y": 1 if i % 2 else 0}, mask, split="train"))
    return kit.write(tmp_path / "sq", records, ["y"])


def test_masks_stay_aligned_through_augmentation(tmp_path: Path, kit: DatasetKit) -> None:
    root = square_root(tmp_path, kit)
    augs = [
        {"_target_": "albumentations.HorizontalFlip", "p": 1.0},
        {
            "_target_": "albumentations.Affine",
            "rotate": [15, 30],
            "translate_percent": [0.02, 0.08],
            "p": 1.0,
        },
    ]
    dm = make_dm(root, image_size=48, train_transforms=augs, mean=[0.0], std=[1.0])
    plain = dm.dataset("train", train=False)
    augmented = dm.dataset("train", train=True)
    for i in range(len(plain)):
        before, after = plain[i], augmented[i]
        image, mask = after["image"][0], after["mask"]
        inside, outside = image[mask == 1], image[mask == 0]
        assert inside.numel() > 50
        assert inside.mean() > 0.8 and outside.mean() < 0.2
        # Bright pixels and mask agree (interpolation blurs only the border of the square).
        bright = image > 0.5
        iou = (bright & (mask == 1)).sum() / (bright | (mask == 1)).sum()
        assert iou > 0.8
        # The transforms did run: the square moved from the left half to the right half, and rotated.
        cols = torch.nonzero(before["mask"])[:, 1].float().mean()
        cols_after = torch.nonzero(mask)[:, 1].float().mean()
        assert cols < 24 < cols_after
        assert not torch.equal(torch.flip(before["mask"], dims=[1]), mask)


def slice_root(tmp_path: Path, kit: DatasetKit) -> tuple[Path, dict[str, tuple[str, int]]]:
    """Two patients of 4 and 3 slices whose pixels equal 10 * (slice + 1) (+100 for the 2nd), rows shuffled."""
    records, where = [], {}
    for p, n in ((0, 4), (1, 3)):
        for s in range(n):
            name = f"v{p}_{s}"
            value = 10 * (s + 1) + 100 * p
            img = np.full((16, 16), value, np.uint8)
            records.append(
                kit.Record(name, img, {"y": s % 2}, group=f"v{p}", split="train", slice=s * 5)
            )
            where[name] = (f"v{p}", s)
    order = np.random.default_rng(0).permutation(len(records))
    return kit.write(tmp_path / "vol", [records[i] for i in order], ["y"]), where


def test_context_slices_stack_neighbours_in_slice_order(tmp_path: Path, kit: DatasetKit) -> None:
    root, where = slice_root(tmp_path, kit)
    sizes = {"v0": 4, "v1": 3}
    # std = 1/255: normalised values are the raw pixel values.
    dm = make_dm(
        root,
        image_size=16,
        in_channels=3,
        context_slices=1,
        mean=[0.0],
        std=[1 / 255],
        predict_split="all",
    )
    seen = 0
    for batch in dm.predict_dataloader():
        assert batch["image"].shape[1] == 3
        for img, sid in zip(batch["image"], batch["id"]):
            group, s = where[sid]
            base = 100 * (group == "v1")
            expected = [10 * (min(max(s + d, 0), sizes[group] - 1) + 1) + base for d in (-1, 0, 1)]
            got = img[:, 0, 0].round().tolist()
            assert got == expected, f"{sid}: channels {got}, expected {expected}"
            assert torch.all(img == img[:, :1, :1])  # constant planes: no mixing between slices
            seen += 1
    assert seen == 7
    with pytest.raises(ConfigError, match=r"data\.in_channels=2 is not a multiple of the 3 slices"):
        make_dm(root, in_channels=2, context_slices=1).dataset("all", train=False)


def test_context_slices_with_rgb_slices(tmp_path: Path, kit: DatasetKit) -> None:
    records = []
    for s in range(3):
        img = np.zeros((16, 16, 3), np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = s, 10 + s, 20 + s
        records.append(kit.Record(f"r{s}", img, {"y": s % 2}, group="g", split="train", slice=s))
    root = kit.write(tmp_path / "rgbvol", records, ["y"])
    dm = make_dm(root, image_size=16, in_channels=9, context_slices=1, mean=[0.0], std=[1 / 255])
    first = dm.dataset("train", train=False)[0]["image"][:, 0, 0].round().tolist()
    assert first == [
        0,
        10,
        20,
        0,
        10,
        20,
        1,
        11,
        21,
    ]  # slice 0 clamps its lower neighbour to itself


def test_full_resolution_masks_and_collate(tmp_path: Path, kit: DatasetKit) -> None:
    rng = np.random.default_rng(2)
    records, shapes = [], {}
    for i, (h, w) in enumerate([(40, 40), (56, 48), (40, 40), (24, 36), (32, 32), (32, 32)]):
        mask = (rng.random((h, w)) > 0.7).astype(np.uint8)
        image = (mask * 200 + 20).astype(np.uint8)
        split = "test" if i < 4 else "train"
        records.append(kit.Record(f"f{i}", image, {"y": i % 2}, mask, split=split))
        shapes[f"f{i}"] = (h, w)
    root = kit.write(tmp_path / "full", records, ["y"])
    dm = make_dm(root, image_size=32, eval_batch_size=8)
    dm.full_res_eval = True
    batch = next(iter(dm.test_dataloader()))
    assert batch["mask"].shape == (4, 32, 32)
    assert isinstance(batch["mask_full"], list)
    for sid, full, size in zip(batch["id"], batch["mask_full"], batch["orig_size"]):
        assert tuple(full.shape) == shapes[sid] == tuple(size.tolist())
        np.testing.assert_array_equal(
            full.numpy(), np.asarray(Image.open(root / f"masks/{sid}.png"))
        )
        assert full.dtype == torch.uint8  # as stored: 1 byte a pixel of a large image, not 8
    assert all(Path(p).name == f"{sid}.png" for p, sid in zip(batch["image_path"], batch["id"]))

    # Equal sizes stack into one tensor.
    same = dm.dataset("train", train=False, full_res=True)
    stacked = collate([same[0], same[1]])
    assert isinstance(stacked["mask_full"], torch.Tensor)
    assert stacked["mask_full"].shape == (2, 32, 32)
    # Without full_res there is no mask_full.
    assert "mask_full" not in next(iter(dm.train_dataloader()))


def test_predict_split_and_label_frequencies(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = {r["image"]: r for r in kit.read_rows(tiny_dataset)}
    label_of = {Path(k).stem: int(v["lesion"]) for k, v in rows.items()}
    for split in ("train", "val", "test", "all"):
        dm = make_dm(tiny_dataset, predict_split=split)
        ids = [i for batch in dm.predict_dataloader() for i in batch["id"]]
        expected = [s.id for s in dm.samples(split)]
        assert ids == expected
        if split == "all":
            assert sorted(ids) == sorted(label_of)
        else:
            groups = {s.group for s in dm.samples(split)}
            assert ids == [i for i in label_of if i.split("_")[0] in groups]
    train_ids = [s.id for s in dm.samples("train")]
    freq = dm.label_frequencies()
    assert freq.shape == (1,)
    assert freq.item() == pytest.approx(np.mean([label_of[i] for i in train_ids]))
    with pytest.raises(ConfigError, match=r"data\.predict_split='everything'"):
        CamSegDataModule(root=str(tiny_dataset), predict_split="everything")


def test_pseudo_masks_override_training_masks(tmp_path: Path, tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset, image_size=48)
    train = dm.samples("train")
    pseudo = {}
    for s in train[:3]:
        m = np.full((48, 48), 255, np.uint8)
        m[:10] = 0
        path = tmp_path / f"{s.id}.png"
        Image.fromarray(m).save(path)
        pseudo[s.id] = path
    dm.train_masks = pseudo
    ids, masks = [], []
    for batch in dm.train_dataloader():
        ids += batch["id"]
        masks.append(batch["mask"])
    assert sorted(ids) == sorted(pseudo)  # only samples with a pseudo-mask train stage 3
    m = torch.cat(masks)
    assert set(m.unique().tolist()) == {0, 255}
    assert (m[:, :10] == 0).all() and (m[:, 10:] == 255).all()


def test_loader_errors(tmp_path: Path, kit: DatasetKit) -> None:
    records = [
        kit.Record(
            f"e{i}", np.zeros((16, 16), np.uint8), {"y": i % 2}, split=("train", "test")[i // 2]
        )
        for i in range(4)
    ]
    root = kit.write(tmp_path / "e", records, ["y"])
    dm = make_dm(root, image_size=16)
    with pytest.raises(
        DatasetError, match=r"the 'val' split is empty; add patients, change data\.val"
    ):
        dm.val_dataloader()
    dm.train_masks = {"not-a-sample": tmp_path / "x.png"}
    with pytest.raises(DatasetError, match=r"no training sample has a pseudo-mask \(1 given\)"):
        dm.train_dataloader()
    (root / "images/e1.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"e1\.png: cannot read image"):
        dm.dataset("train", train=False)[1]
    for r in records:
        r.split = "test"
    no_train = make_dm(kit.write(tmp_path / "t", records, ["y"]), image_size=16)
    with pytest.raises(DatasetError, match=r"the 'train' split is empty"):
        no_train.label_frequencies()


def test_synthetic_root_is_generated_on_first_use(tmp_path: Path) -> None:
    pytest.importorskip("camseg.data.synthetic")
    root = tmp_path / "gen"
    dm = make_dm(
        root,
        synthetic={
            "flavor": "nodule",
            "patients": 4,
            "slices_per_patient": 3,
            "size": 32,
            "seed": 0,
        },
    )
    assert (root / "labels.csv").is_file()
    assert dm.classes == ["nodule"]
    assert len(dm.samples("all")) == 12


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        ({"p": 0.5}, r"data\.train_transforms\[0\]: no _target_"),
        (
            {"_target_": "albumentations.NoSuchFlip"},
            r"\[0\]: cannot build albumentations\.NoSuchFlip",
        ),
        (
            {"_target_": "collections.OrderedDict"},
            r"\[0\]: OrderedDict is not an albumentations transform",
        ),
    ],
)
def test_bad_augmentation_configs(tiny_dataset: Path, entry: dict, pattern: str) -> None:
    dm = make_dm(tiny_dataset, train_transforms=[entry])
    with pytest.raises(ConfigError, match=pattern):
        dm.train_dataloader()


def test_bad_masks_fail_with_the_file_name(tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset, image_size=48)
    ds = dm.dataset("all", train=False)
    mask_path = ds.items[0].mask
    assert mask_path is not None
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask_path)
    with pytest.raises(
        DatasetError, match=rf"{mask_path.name}: mask is 48x40 but its image is 48x48"
    ):
        ds[0]
    mask_path.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=rf"{mask_path.name}: cannot read mask"):
        ds[0]
