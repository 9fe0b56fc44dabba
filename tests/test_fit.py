"""`fit`'s choice of the weights it keeps: the best epoch, ties, NaN AUCs, patience, and the
restored weights being exactly that epoch's."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from covid_xray.training.loop import BestEpoch, Recipe, fit


def choices(patience: int, epochs: list[tuple[float, float]]) -> tuple[list[bool], int, bool]:
    """Feed (val_auc, val_loss) per epoch; return which were new bests, the best epoch, and
    whether patience ran out at the last one."""
    best = BestEpoch(patience)
    better = [best.better(epoch, auc, loss) for epoch, (auc, loss) in enumerate(epochs, 1)]
    return better, best.epoch, best.patience_spent


def test_a_higher_auc_wins_and_a_tie_goes_to_the_lower_loss():
    assert choices(5, [(0.60, 0.70), (0.70, 0.65), (0.65, 0.50)]) == ([True, True, False], 2,
                                                                      False)
    # The same AUC (it saturates at 1.0 on easy data): the lower validation loss wins...
    assert choices(5, [(1.0, 0.40), (1.0, 0.30)]) == ([True, True], 2, False)
    # ...and an equal AUC at a higher or equal loss does not.
    assert choices(5, [(1.0, 0.30), (1.0, 0.30), (1.0, 0.35)]) == ([True, False, False], 1,
                                                                   False)


def test_a_nan_auc_ranks_below_any_auc_but_the_first_epoch_is_kept_until_beaten():
    nan = math.nan
    assert choices(5, [(nan, 0.70), (0.20, 0.90)]) == ([True, True], 2, False)
    assert choices(5, [(0.55, 0.70), (nan, 0.10)]) == ([True, False], 1, False)
    assert choices(5, [(nan, 0.70), (nan, 0.60)]) == ([True, True], 2, False)  # by the loss


def test_patience_counts_epochs_in_a_row_without_a_better_one():
    epochs = [(0.6, 0.5), (0.5, 0.5), (0.7, 0.4), (0.6, 0.5), (0.6, 0.5)]
    best = BestEpoch(patience=2)
    spent = []
    for epoch, (auc, loss) in enumerate(epochs, 1):
        best.better(epoch, auc, loss)
        spent.append(best.patience_spent)
    assert spent == [False, False, False, False, True]  # the gain at epoch 3 reset the count
    assert best.epoch == 3 and best.val_auc == 0.7


def test_fit_restores_exactly_the_weights_of_the_epoch_it_reports():
    """A small network trained hard enough that validation moves between epochs: the weights
    fit leaves in the model are the ones it held at the reported best epoch, that epoch is the
    best by the rule above, and an early stop comes `patience` epochs after it."""
    torch.manual_seed(0)
    images = torch.randn(96, 1, 8, 8)
    labels = torch.randint(0, 2, (96,))
    images[labels == 1] += 0.15  # a weak signal: validation goes up and down
    train = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(images[64:], labels[64:]), batch_size=16)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    snapshots = []
    result = fit(model, train, val, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                 epochs=12, patience=3, device=torch.device("cpu"),
                 # plain SGD: the weights kept are the model's own (no moving average)
                 recipe=Recipe(schedule="constant", warmup_epochs=0, ema_decay=0,
                               label_smoothing=0),
                 on_epoch=lambda row: snapshots.append(copy.deepcopy(model.state_dict())),
                 progress=False)
    history = result.history
    assert len({round(row["val_auc"], 6) for row in history}) > 2  # validation did move
    assert result.best_epoch < len(history)  # so restoring changed the weights
    expected = BestEpoch(patience=3)
    for row in history:
        expected.better(int(row["epoch"]), row["val_auc"], row["val_loss"])
    assert result.best_epoch == expected.epoch
    assert result.best_val_auc == pytest.approx(history[result.best_epoch - 1]["val_auc"])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, snapshots[result.best_epoch - 1][name], rtol=0,
                                   atol=0)
    if result.stopped_early:
        assert len(history) == result.best_epoch + 3
    else:
        assert len(history) == 12


def test_balance_weights_give_every_class_the_same_total_weight():
    from covid_xray.config import TrainConfig

    labels = [0] * 30 + [1] * 10  # weights n / (k * count): 40/60 and 40/20
    recipe = Recipe.of(TrainConfig(balance="weights"), labels)
    assert recipe.class_weights == pytest.approx((2 / 3, 2.0))
    assert 30 * recipe.class_weights[0] == pytest.approx(10 * recipe.class_weights[1])
    assert Recipe.of(TrainConfig(balance="none"), labels).class_weights is None
    assert Recipe.of(TrainConfig(), labels).class_weights is None  # undersample: equal already


def test_fit_called_directly_trains_the_train_commands_recipe():
    from covid_xray.config import TrainConfig

    assert Recipe() == Recipe.of(TrainConfig())
