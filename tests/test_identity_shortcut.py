"""Paper §3.2 measured: a linear reconstructor against ADTR's query attention on real backbone features.

The paper argues that a linear reconstructor drifts toward the identity and then reconstructs anomalies as well
as normal features, while the query attention does not. ``benchmarks/identity_shortcut.py`` measures it (equal
steps, swept learning rates, 3 seeds, brick and grass; benchmarks/README.md): the linear weight does move toward
the identity, but at this budget it still separates anomalous from normal tokens as well as the attention model on
brick (token AUROC 0.999 against 0.983) and a little worse on grass (0.912 against 0.928). This is the same
measurement on brick, one seed, a smaller budget.

Separation is judged by one function, which must reject a model that outputs zeros (its error is the feature
energy: it reconstructs nothing) and a model that copies its input (no error, no separation).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.identity_shortcut import TokenSet, attention, identity_distance, linear, score, token_errors
from benchmarks.identity_shortcut import token_set as make_token_set
from benchmarks.identity_shortcut import train as train_model

# Trains two reconstructors to a separation: about a minute.
pytestmark = pytest.mark.slow

STEPS = 200
# Learning rates of the experiment's sweep (lowest training loss on normal images, benchmarks/identity_shortcut.py).
LR = {"linear": 1e-2, "attention": 3e-3}
# A reconstructor must bring normal tokens' error below this share of their feature energy.
RECONSTRUCTS = 0.8
# ...and separate anomalous tokens better than their feature energy alone does (the zero-output model).
OVER_ENERGY = 0.03


def reconstructs_and_separates(candidate: dict[str, float], zero: dict[str, float]) -> bool:
    """Normal tokens reconstructed, and anomalous ones told apart by the error beyond what their energy tells."""
    return candidate["normal_relative"] < RECONSTRUCTS and candidate["token_AUROC"] >= zero["token_AUROC"] + OVER_ENERGY


@pytest.fixture(scope="module")
def tokens(textures_root: Path) -> TokenSet:
    return make_token_set(textures_root)


@pytest.fixture(scope="module")
def results(tokens: TokenSet) -> dict[str, dict[str, float]]:
    channels, grid = tokens.train.shape[1], tokens.train.shape[-2:]
    torch.manual_seed(0)
    conv = linear(channels)
    start = identity_distance(conv)
    train_model(conv, tokens.train, STEPS, LR["linear"], seed=0)
    torch.manual_seed(0)
    query = attention(channels, grid.numel())
    train_model(query, tokens.train, STEPS, LR["attention"], seed=0)
    return {
        "linear": {**score(token_errors(conv, tokens.test), tokens), "start": start, "end": identity_distance(conv)},
        "attention": score(token_errors(query, tokens.test), tokens),
        "zero": score(token_errors(None, tokens.test), tokens),
        "copy": score(token_errors(nn.Identity(), tokens.test), tokens),
    }


@pytest.mark.parametrize("model", ["linear", "attention"])
def test_both_reconstructors_learn_to_separate(results: dict, model: str) -> None:
    assert reconstructs_and_separates(results[model], results["zero"]), results


@pytest.mark.parametrize("reference", ["zero", "copy"])
def test_the_check_rejects_a_zero_and_a_copy_model(results: dict, reference: str) -> None:
    assert not reconstructs_and_separates(results[reference], results["zero"]), results[reference]


def test_the_linear_model_drifts_toward_the_identity(results: dict) -> None:
    assert results["linear"]["end"] < results["linear"]["start"] - 0.15, results["linear"]  # measured: 1.156 -> 0.914
    assert results["linear"]["normal_relative"] < 0.1  # and it reconstructs normal features almost exactly


def test_at_this_budget_the_linear_model_still_separates_brick_at_least_as_well(results: dict) -> None:
    """What the experiment log reports: the paper's order (attention above linear) does not show on brick here.

    If this starts failing, the measurement changed: re-run the experiment and update the experiment log's table.
    """
    assert results["linear"]["token_AUROC"] >= results["attention"]["token_AUROC"] - 0.005, results
