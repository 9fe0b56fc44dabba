"""What answering without hooks costs: the served model's forward and Grad-CAM as they are
now (features from the forward taken apart at the head, Grad-CAM's gradient taken with
respect to the call's own feature maps: nothing on the shared network, so concurrent
requests run side by side) against the way they were, made safe the only way that way can
be (hooks on the shared network, gradients zeroed and a backward pass on it: one call at a
time, under a lock). Without the lock that way swapped features between requests and
segfaulted the server.

Answers per second for 1 and for --clients concurrent clients, each asking --requests times
about a batch of --batch films, both ways alternated in one process, best of --rounds:

    python bench/concurrent_answers.py [--img-size 224] [--clients 8] [--batch 2]
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import click
import numpy as np
import torch

from covid_xray.evaluation.gradcam import grad_cam
from covid_xray.imaging.preprocess import Preprocessing
from covid_xray.imaging.workers import decode
from covid_xray.model.networks import Classifier, build
from covid_xray.model.requests import example_input

LOCK = threading.Lock()


def hooked_answer(classifier: Classifier, batch: torch.Tensor) -> np.ndarray:
    """The old forward: a hook on the shared network catches the penultimate features."""
    caught = []
    network = classifier.network
    with LOCK:
        handle = network.classifier.register_forward_hook(
            lambda module, inputs, output: caught.append(inputs[0]))
        try:
            with torch.no_grad():
                probabilities = torch.softmax(network(batch), dim=1)
        finally:
            handle.remove()
    return probabilities.numpy()


def hooked_grad_cam(classifier: Classifier, model_input: np.ndarray, index: int) -> np.ndarray:
    """The old Grad-CAM: hooks for the maps and their gradient, zeroed gradients and a
    backward pass through the shared network's parameters."""
    network = classifier.network
    maps, grads = [], []
    with LOCK:
        forward = network.features.register_forward_hook(
            lambda module, inputs, output: maps.append(output))
        try:
            network.zero_grad()
            logits = network(torch.from_numpy(model_input[None]))
            maps[0].register_hook(grads.append)
            logits[0, index].backward()
        finally:
            forward.remove()
            network.zero_grad(set_to_none=True)
    weights = grads[0].mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * maps[0].detach()).sum(dim=1))[0].numpy()


def rate(ask: Callable[[], None], clients: int, requests: int) -> float:
    """Requests answered per second with `clients` asking at once, `requests` each."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(lambda: [ask() for _ in range(requests)])
                       for _ in range(clients)]:
            future.result()
    return clients * requests / (time.perf_counter() - start)


@click.command()
@click.option("--img-size", default=224, show_default=True)
@click.option("--clients", default=8, show_default=True)
@click.option("--requests", default=2, show_default=True, help="per client")
@click.option("--batch", default=2, show_default=True, help="films per request")
@click.option("--rounds", default=2, show_default=True)
def main(img_size: int, clients: int, requests: int, batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    classifier = Classifier(build("none", 2), ("negative", "opacity")).eval()
    source = io.BytesIO(__import__("base64").b64decode(example_input().dicom_base64[0]))
    model_input = decode(Preprocessing(img_size), source).model_input
    films = torch.from_numpy(np.stack([model_input] * batch))
    # As served: the forward runs without autograd (grad mode is per thread: set in each).
    answer = torch.no_grad()(classifier.answer)
    ways = {
        "forward": {"hooks, one at a time": lambda: hooked_answer(classifier, films),
                    "no hooks (now)": lambda: answer(films)},
        "forward + Grad-CAM per film": {
            "hooks, one at a time": lambda: [hooked_answer(classifier, films)] + [
                hooked_grad_cam(classifier, model_input, 1) for _ in range(batch)],
            "no hooks (now)": lambda: [answer(films)] + [
                grad_cam(classifier.network, model_input, 1) for _ in range(batch)]},
    }
    print(f"DenseNet121 at {img_size} px on {torch.get_num_threads()} torch threads, "
          f"{batch} films per request, best of {rounds}")
    answer(films)  # warm-up: oneDNN picks its kernels once
    for task, contenders in ways.items():
        for concurrent in (1, clients):
            best = {name: 0.0 for name in contenders}
            for _ in range(rounds):  # alternated, so a noisy moment hits both
                for name, ask in contenders.items():
                    best[name] = max(best[name], rate(ask, concurrent, requests))
            old, new = best.values()
            print(f"{task}, {concurrent} client(s): "
                  + ", ".join(f"{name} {value:.2f} req/s" for name, value in best.items())
                  + f"; now/before {new / old:.2f}x")


if __name__ == "__main__":
    main()
