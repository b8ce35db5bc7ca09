"""Shared test set-up: offline, few threads, and small models."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub/timm, so a missed download fails fast instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Where the real defect data lives. Without ADTR_SHARED_DATA the tests look beside the clone and skip what is not
# there (a user's fresh clone); with it set (CI), a missing data set fails, so real-data tests never vanish silently.
REQUIRE_SHARED_DATA = bool(os.environ.get("ADTR_SHARED_DATA"))
SHARED_DATA = Path(os.environ.get("ADTR_SHARED_DATA") or REPO.parent / "shared" / "data")

# Tiny transformer sizes for fast tests; the architecture is the same as the paper's.
TINY = {"hidden_dim": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 4, "ffn_dim": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test on one torch thread, whichever files were collected: the same results alone or in the suite.
    Subprocesses (CLI, notebooks, DDP) set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data_set(name: str) -> Path:
    """A real data set of the shared data folder: skipped where it is absent, a failure where it was required."""
    root = SHARED_DATA / name
    if (root / "train" / "good").is_dir():
        return root
    msg = (
        f"real data set {name!r} not found at {root}; docs/data.md says where it comes from and how to build it,"
        " then set ADTR_SHARED_DATA to the folder holding it."
    )
    if REQUIRE_SHARED_DATA:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def bsdata_root() -> Path:
    """The real BSData pitting set (CI provides it beside the clone)."""
    return shared_data_set("bsdata_pitting")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that read real data (``-m "not real_data"`` leaves them out)."""
    for item in items:
        if "bsdata_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


def _brick(factory: pytest.TempPathFactory, folder: str, **sizes: int) -> Path:
    from adtr_anomalib.data import make_texture_dataset

    return make_texture_dataset(factory.mktemp(folder), "brick", **sizes)


@pytest.fixture(scope="session")
def textures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in texture dataset (brick), generated once per session."""
    return _brick(tmp_path_factory, "textures", image_size=128, n_train=48, n_test_good=12, n_test_defect_per_type=4)


@pytest.fixture(scope="session")
def tiny_textures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An even smaller one (64 px; 8 train, 4 good and 4 defective test images) for whole benchmarks."""
    return _brick(tmp_path_factory, "tiny_textures", image_size=64, n_train=8, n_test_good=4, n_test_defect_per_type=1)
