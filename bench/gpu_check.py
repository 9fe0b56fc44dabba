"""The training loop on a CUDA GPU: it runs (AMP, channels_last, pinned memory, the default
recipe), and it does not wait for the GPU inside an epoch.

The second part counts host syncs with torch.cuda.set_sync_debug_mode("warn"), which warns at
every operation that makes the CPU wait for the GPU. One epoch of --steps steps should sync
about steps / train.SYNC_EVERY times (the progress check) plus a few at the epoch's end, not
once or more per step as a loop calling loss.item() does.

    python bench/gpu_check.py [--steps 50] [--img-size 64]
"""

from __future__ import annotations

import math
import time
import warnings

import click
import torch
from torch.utils.data import DataLoader, TensorDataset

from covid_xray.config import TrainConfig
from covid_xray.model.networks import build, resolve_device
from covid_xray.training.loop import (
    SYNC_EVERY,
    Recipe,
    Stepper,
    fit,
    make_optimizer,
    train_one_epoch,
)

DEFAULTS = TrainConfig()


def fake_loader(count: int, size: int, batch_size: int, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (count,), generator=generator)
    # Learnable: the positive class is brighter.
    images = torch.randn(count, 1, size, size, generator=generator) * 300 + labels.view(
        -1, 1, 1, 1) * 400
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle,
                      pin_memory=True, generator=generator)


@click.command()
@click.option("--steps", default=50, show_default=True)
@click.option("--img-size", default=64, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
def main(steps: int, img_size: int, batch_size: int) -> None:
    device = resolve_device("auto")
    if device.type != "cuda":
        raise click.ClickException("no CUDA GPU visible")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)

    # 1. fit() end to end with the default recipe.
    train = fake_loader(steps * batch_size, img_size, batch_size, shuffle=True)
    val = fake_loader(4 * batch_size, img_size, batch_size, shuffle=False)
    model = build("none", 2)
    optimizer = make_optimizer(model, DEFAULTS.optimizer, DEFAULTS.lr, DEFAULTS.weight_decay)
    recipe = Recipe.of(DEFAULTS)
    start = time.perf_counter()
    result = fit(model, train, val, optimizer=optimizer, epochs=3, patience=3, device=device,
                 recipe=recipe, progress=False)
    seconds = time.perf_counter() - start
    for row in result.history:
        print(f"epoch {row['epoch']}: lr {row['lr']:.2e} train loss {row['train_loss']:.4f} "
              f"val loss {row['val_loss']:.4f} val auc {row['val_auc']:.3f}")
    assert all(math.isfinite(row["val_loss"]) for row in result.history)
    print(f"fit: 3 epochs x {steps} steps of {batch_size} at {img_size} px in {seconds:.1f} s "
          f"({3 * steps * batch_size / seconds:.0f} img/s incl. validation); best epoch "
          f"{result.best_epoch}")

    # 2. Host syncs in one epoch.
    stepper = Stepper(device)
    model = stepper.prepare(build("none", 2))
    optimizer = make_optimizer(model, DEFAULTS.optimizer, DEFAULTS.lr, DEFAULTS.weight_decay)
    batches = [(images.pin_memory(), labels) for images, labels in train]
    train_one_epoch(model, batches[:3], optimizer, stepper, DEFAULTS.grad_clip)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, batches, optimizer, stepper, DEFAULTS.grad_clip,
                            label_smoothing=DEFAULTS.label_smoothing)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(warning.message).splitlines()[0] for warning in caught
             if "synchroniz" in str(warning.message)]
    print(f"host syncs in one epoch of {len(batches)} steps: {len(syncs)} (SYNC_EVERY = "
          f"{SYNC_EVERY}); kinds: {sorted(set(syncs))}")


if __name__ == "__main__":
    main()
