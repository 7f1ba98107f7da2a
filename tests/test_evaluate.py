import csv
import json
import math

import numpy as np
import pytest
import torch
from skimage import data as sample_images

from helpers.models import tiny_autoencoder
from illm import evaluate, images, metrics


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    model = tiny_autoencoder(seed=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """kodak: two 64x96 crops (no FID); clic2020: two 256x256 crops (one FID/256 patch each)."""
    root = tmp_path_factory.mktemp("datasets")
    photo = torch.from_numpy(np.ascontiguousarray(sample_images.astronaut())).permute(2, 0, 1)
    crops = {
        "kodak": [photo[:, 100:164, 200:296], photo[:, 300:364, 50:146]],
        "clic2020": [photo[:, :256, :256], photo[:, 256:, 256:]],
    }
    for name, pictures in crops.items():
        (root / name).mkdir()
        for index, picture in enumerate(pictures):
            images.save_image(root / name / f"image{index}.png", picture.contiguous())
    return {name: root / name for name in crops}


@pytest.fixture
def fast_fid(monkeypatch):
    """2048-d eigenvalue problems take seconds on a CPU: the pipeline is tested on 8 dimensions."""
    real_frechet_distance = metrics.frechet_distance
    monkeypatch.setattr(
        metrics, "frechet_distance", lambda real, fake: real_frechet_distance(real[:, :8], fake[:, :8])
    )


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run(tiny_weights, datasets, output, *extra):
    data = [f"{name}={folder}" for name, folder in datasets.items()]
    return evaluate.main(
        ["--weights", str(tiny_weights), "--data", *data, "-o", str(output), "--device", "cpu", *extra]
    )


@pytest.mark.slow  # FID Inception-v3 on every patch: half a minute on two cores
def test_evaluation_writes_results_per_image_rows_plots_and_bitstreams(
    tiny_weights, datasets, tmp_path, offline, fast_fid
):
    output = tmp_path / "results"
    status = run(
        tiny_weights, datasets, output, "--random-backbones", "--save-bitstreams", "--save-reconstructions"
    )
    assert status == 0

    with open(output / "results.csv") as file:
        assert file.readline().strip() == "model,dataset,bpp,fid,fid_swav,kid,lpips,dists,ms_ssim,psnr"
    results = {row["dataset"]: row for row in read_csv(output / "results.csv")}
    assert set(results) == {"kodak", "clic2020"}
    assert results["kodak"]["model"] == "tiny (random backbones)"
    kodak, clic = results["kodak"], results["clic2020"]
    assert kodak["fid"] == kodak["kid"] == kodak["fid_swav"] == ""  # no FID on Kodak
    assert kodak["ms_ssim"] == ""  # 64x96 is too small for five MS-SSIM scales
    assert math.isfinite(float(clic["fid"])) and math.isfinite(float(clic["kid"])) and clic["fid_swav"] == ""
    for row in results.values():
        for column in ("bpp", "lpips", "dists", "psnr"):
            assert math.isfinite(float(row[column]))

    per_image = read_csv(output / "per_image.csv")
    assert len(per_image) == 4
    assert list(per_image[0]) == list(evaluate.PER_IMAGE_COLUMNS)
    for row in per_image:
        bitstream = output / "bitstreams" / "tiny" / row["dataset"] / row["image"].replace(".png", ".illm")
        size = bitstream.stat().st_size
        pixels = int(row["height"]) * int(row["width"])
        assert int(row["bytes"]) == size and float(row["bpp"]) == pytest.approx(size * 8 / pixels, rel=1e-12)
        # the metrics are those of the decoded 8-bit image
        original = images.read_image(datasets[row["dataset"]] / row["image"])
        decoded = images.read_image(output / "reconstructions" / "tiny" / row["dataset"] / row["image"])
        assert float(row["psnr"]) == pytest.approx(
            metrics.psnr(original[None], decoded[None]).item(), rel=1e-5
        )
        assert float(row["encode_seconds"]) > 0 and float(row["decode_seconds"]) > 0
    for dataset in ("kodak", "clic2020"):
        mean_bpp = np.mean([float(r["bpp"]) for r in per_image if r["dataset"] == dataset])
        assert float(results[dataset]["bpp"]) == pytest.approx(mean_bpp, rel=1e-12)
        assert (output / f"rd_{dataset}.png").read_bytes().startswith(b"\x89PNG")

    summary = json.loads((output / "evaluation.json").read_text())
    assert summary["random_backbones"] is True and summary["comparable_to_official"] is False
    assert "161" in summary["missing"]["tiny (random backbones)"]["kodak"]["ms_ssim"]


def test_missing_metric_backbones_are_reported_not_fatal(tiny_weights, datasets, tmp_path, offline, capsys):
    output = tmp_path / "results"
    assert run(tiny_weights, datasets, output, "--metrics", "psnr,lpips,fid") == 0
    results = {row["dataset"]: row for row in read_csv(output / "results.csv")}
    assert results["clic2020"]["model"] == "tiny"
    assert (
        results["clic2020"]["lpips"] == results["clic2020"]["fid"] == ""
        and float(results["clic2020"]["psnr"]) > 0
    )
    assert results["clic2020"]["dists"] == ""  # not requested
    stderr = capsys.readouterr().err
    assert "lpips not computed" in stderr and "alexnet-owt-7be5be79.pth" in stderr
    assert "fid not computed" in stderr and "weights-inception" in stderr
    missing = json.loads((output / "evaluation.json").read_text())["missing"]["tiny"]["clic2020"]
    assert set(missing) == {"lpips", "fid"} and "network disabled in tests" in missing["lpips"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (["kodak"], "expects NAME=DIR"),
        (["kodak=/no/such/folder"], "/no/such/folder: no such folder"),
        (["=somewhere"], "expects NAME=DIR"),
        (["a/b=somewhere"], "dataset name 'a/b'"),
    ],
)
def test_bad_dataset_arguments_fail_with_one_line(tiny_weights, tmp_path, capsys, data, expected):
    status = evaluate.main(["--weights", str(tiny_weights), "--data", *data, "-o", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 1 and expected in error and error.count("\n") == 1


def test_empty_folder_and_bad_weights_fail_with_one_line(tiny_weights, datasets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert (
        evaluate.main(
            ["--weights", str(tiny_weights), "--data", f"kodak={empty}", "-o", str(tmp_path / "out")]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert "no images" in error and str(empty) in error and error.count("\n") == 1

    assert (
        evaluate.main(
            [
                "--weights",
                str(tmp_path / "missing.pt"),
                "--data",
                f"kodak={datasets['kodak']}",
                "-o",
                str(tmp_path / "out"),
                "--metrics",
                "psnr",
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert "missing.pt" in error and error.count("\n") == 1

    assert (
        evaluate.main(
            [
                "--weights",
                str(tiny_weights),
                "--data",
                f"kodak={datasets['kodak']}",
                "-o",
                str(tmp_path / "out"),
                "--metrics",
                "psnr,sharpness",
            ]
        )
        == 1
    )
    assert "sharpness" in capsys.readouterr().err


def test_official_results_are_shipped_with_the_official_columns():
    rows = evaluate.read_official_results()
    assert {(row["model"], row["dataset"]) for row in rows} >= {("MS-ILLM", "kodak"), ("No-GAN", "div2k")}
    assert list(rows[0]) == list(evaluate.RESULT_COLUMNS)
    assert all(row["fid"] is None for row in rows if row["dataset"] == "kodak")


def test_csv_cells_with_commas_and_quotes_read_back_unchanged(tmp_path):
    rows = [{"model": 'run "a", step 3', "psnr": 21.5}, {"model": "plain", "psnr": None}]
    evaluate.write_csv(tmp_path / "results.csv", ("model", "psnr"), rows)
    assert read_csv(tmp_path / "results.csv") == [
        {"model": 'run "a", step 3', "psnr": "21.5"},
        {"model": "plain", "psnr": ""},
    ]
