"""Decoding one film: every pydicom plugin installed, per transfer syntax, side by side.

One synthetic 2048 px film per encoding of the synthetic mix (covid_xray.data.synthetic.ENCODINGS).
Each available plugin decodes it --rounds times, alternating, so drift on a noisy machine hits
all alike; the median wall and CPU times are printed with the plugin's speed relative to
GDCM (pydicom's first choice) and whether its pixels equal GDCM's bit for bit. `covid_xray`
is our imagecodecs plugin (covid_xray/decoders.py), the one read_xray asks first.

    python bench/decoders.py [--size 2048] [--rounds 5]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pydicom
from pydicom.pixels import get_decoder, pixel_array

from covid_xray.data.synthetic import ENCODINGS, make_dataset
from covid_xray.imaging import decoders
from covid_xray.imaging.decoders import available_cores


@click.command()
@click.option("--size", default=2048, show_default=True, help="Rows of each film.")
@click.option("--rounds", default=5, show_default=True)
def main(size: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = make_dataset(Path(scratch) / "data", num_studies=len(ENCODINGS),
                                image_size=size, multi_image_studies=0, seed=0, progress=False)
        files = sorted(data_dir.glob("train/*/*/*.dcm"))
        print(f"{len(files)} films, {size} px rows; {available_cores()} cores; median of "
              f"{rounds}; x = GDCM's wall time / the plugin's")
        print(f"{'transfer syntax':<44} {'bits':>4}  {'plugin':<10} {'wall ms':>8} "
              f"{'cpu ms':>7} {'x':>6}  same pixels as GDCM")
        for path in files:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = header.file_meta.TransferSyntaxUID
            if not syntax.is_compressed:
                continue  # nothing to decode: every plugin copies bytes
            plugins = get_decoder(syntax).available_plugins
            walls: dict[str, list[float]] = {name: [] for name in plugins}
            cpus: dict[str, list[float]] = {name: [] for name in plugins}
            pixels: dict[str, np.ndarray | None] = dict.fromkeys(plugins)
            for _ in range(rounds):
                for name in list(walls):
                    wall, cpu = time.perf_counter(), time.process_time()
                    try:
                        pixels[name] = pixel_array(path, decoding_plugin=name)
                    except Exception:  # this plugin cannot decode this syntax or depth
                        del walls[name]
                        continue
                    walls[name].append(time.perf_counter() - wall)
                    cpus[name].append(time.process_time() - cpu)
            reference = pixels.get("gdcm")
            gdcm_wall = statistics.median(walls["gdcm"]) if "gdcm" in walls else None
            for name in sorted(walls, key=lambda n: (n != decoders.LABEL, n)):
                wall = statistics.median(walls[name])
                ratio = f"{gdcm_wall / wall:6.2f}" if gdcm_wall else "     -"
                same = ("-" if reference is None else
                        "yes" if np.array_equal(pixels[name], reference) else "NO")
                print(f"{syntax.name[:44]:<44} {header.BitsStored:>4}  {name:<10} "
                      f"{wall * 1000:8.1f} {statistics.median(cpus[name]) * 1000:7.1f} "
                      f"{ratio}  {same}")


if __name__ == "__main__":
    main()
