"""ADTR and ADTR+ trained with Lightning's DDP on two CPU processes (gloo) match a one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Two training processes: minutes.
pytestmark = pytest.mark.slow

# One process against two, same global batch and seed. ADTR sees the same images per step either way, so its
# metrics agree closely; ADTR+ draws its confetti anomalies from each process's own random stream, so it
# differs as much as two seeds of one process do (measured: image AUROC 0.833 / 0.792 for seeds 0 / 1,
# pixel AUPRO 0.655 / 0.641), and gets that spread as tolerance.
TOLERANCE = {
    "ADTR": {"image_AUROC": 0.02, "pixel_AUROC": 0.01, "pixel_AUPRO": 0.02},
    "ADTRPlus": {"image_AUROC": 0.06, "pixel_AUROC": 0.02, "pixel_AUPRO": 0.04},
}


def _run(root: Path, out: Path, devices: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.ddp_worker", "--root", str(root), "--out", str(out), "--devices"]
    result = subprocess.run(
        [*command, str(devices)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    errors = "".join(f"\n--- {path.name}:\n{path.read_text()}" for path in sorted(out.glob("rank*.error")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + errors
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.fixture(scope="module")
def runs(textures_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    return {devices: _run(textures_root, tmp_path_factory.mktemp(f"ddp{devices}"), devices) for devices in (1, 2)}


def test_two_processes_ran(runs: dict[int, list[dict]]) -> None:
    assert [report["world_size"] for report in runs[2]] == [2, 2]
    assert runs[1][0]["world_size"] == 1


def test_statistics_cover_the_whole_training_set_on_every_rank(runs: dict[int, list[dict]]) -> None:
    """Each rank reads half the images; the feature statistics are summed over both, so they equal one process's."""
    single, (rank0, rank1) = runs[1][0], runs[2]
    assert rank0["feature_mean"] == pytest.approx(single["feature_mean"], abs=1e-5)
    assert rank1["feature_mean"] == rank0["feature_mean"]
    assert rank1["map_mean_sum"] == rank0["map_mean_sum"]  # every rank (and the checkpoint) has the same map prior
    assert rank1["plus_map_mean_sum"] == rank0["plus_map_mean_sum"]


def test_each_rank_caches_only_correct_features(runs: dict[int, list[dict]]) -> None:
    for report in runs[2]:
        assert report["cached"], "the feature cache was not used"
        assert report["cache_max_difference"] == 0.0  # every cached map equals the features of its own image
    assert len(runs[1][0]["cached"]) == 48  # one process sees every training image


def test_moved_anomalies_are_the_same_on_every_rank(runs: dict[int, list[dict]]) -> None:
    (rank0, rank1), single = runs[2], runs[1][0]
    assert rank0["moved"] == rank1["moved"] == single["moved"]
    assert len(rank0["moved"]) == 4  # one per defect type


@pytest.mark.parametrize("model", ["ADTR", "ADTRPlus"])
def test_metrics_match_one_process(runs: dict[int, list[dict]], model: str) -> None:
    single, distributed = runs[1][0]["metrics"][model], runs[2][0]["metrics"][model]
    for name, tolerance in TOLERANCE[model].items():
        assert distributed[name] == pytest.approx(single[name], abs=tolerance), (name, single, distributed)
    assert distributed["pixel_AUROC"] > 0.85, distributed  # far above chance: the distributed model did learn
