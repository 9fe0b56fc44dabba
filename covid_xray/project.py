"""`MLproject`, the environment files and the option tables of docs/options.md, written from
their one source each. It sits at the top level, beside config.py, because it serves the
project (its files and docs), not any layer of the library.

The options exist once, in config.py; the dependencies once, in pyproject.toml. This module
renders the MLproject entry points and every option table (and tune's search space) in
docs/options.md from the first, `python_env.yaml` (uv / virtualenv) and `conda.yaml` from the
second; `python -m covid_xray.project` rewrites all four, and a test fails when any is stale.
MLflow passes a `-P name=value` that an entry point does not declare on to its command as
`--name value`: tune declares only its own options and takes train's that way, so it sees
exactly the ones a user gave.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from covid_xray.config import (
    DEFAULT_SPACE,
    DownloadConfig,
    EvaluateConfig,
    PacsConfig,
    PredictConfig,
    PromoteConfig,
    ScoreSparkConfig,
    TrainConfig,
    TuneConfig,
)

ROOT = Path(__file__).resolve().parent.parent
# Entry point (and its script, entrypoints/<name>.py) -> its options. `main` is train, so a
# bare `mlflow run .` trains.
ENTRY_POINTS: dict[str, type] = {
    "train": TrainConfig,
    "download": DownloadConfig,
    "tune": TuneConfig,
    "evaluate": EvaluateConfig,
    "promote": PromoteConfig,
    "predict": PredictConfig,
    "score_spark": ScoreSparkConfig,
    "pacs": PacsConfig,
}
OPTIONS_DOC = ROOT / "docs" / "options.md"
PYTHON = "3.11"
HEADER = """\
# Written by `python -m covid_xray.project` from covid_xray/config.py: edit the config, not
# this file (tests/test_entrypoints.py fails when it is stale). Numbers are typed float so
# MLflow checks them; booleans are the strings true / false. tune declares only its own
# options: MLflow passes the train options you give (-P lr=0.001) on as --lr 0.001.
# Commands run `python -m entrypoints.<name>` from the project folder, so they import this
# checkout's covid_xray in any environment, whether or not the project is installed in it.
# MLflow reads one environment key: python_env (uv, virtualenv); conda users see README.md.
"""
ENV_HEADER = """\
# Written by `python -m covid_xray.project` from pyproject.toml's dependencies (edit those;
# tests/test_entrypoints.py fails when this file is stale). The project itself is not
# installed here: MLproject's commands import it from the project folder.
"""


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a YAML string, quoted when it must be


def _parameters(config: type) -> list[str]:
    lines = []
    for item in dataclasses.fields(config):
        kind = "float" if item.type in ("int", "float") else "string"
        lines.append(f"      {item.name}: {{type: {kind}, default: {_yaml_scalar(item.default)}}}")
    return lines


def mlproject() -> str:
    lines = [HEADER.rstrip("\n"), "name: covid-xray", "", "python_env: python_env.yaml", "",
             "entry_points:"]
    for entry_point, config in ENTRY_POINTS.items():
        arguments = " ".join(f"--{item.name.replace('_', '-')} {{{item.name}}}"
                             for item in dataclasses.fields(config))
        lines += [f"  {entry_point}:" + (" &train" if entry_point == "train" else ""),
                  "    parameters:", *_parameters(config),
                  "    command: >-", f"      python -m entrypoints.{entry_point} {arguments}", ""]
        if entry_point == "train":
            lines += ["  main: *train", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# Extras every MLproject entry point may need, so MLflow's environments install them: the
# pacs node's DICOM networking (small, pure Python).
ENVIRONMENT_EXTRAS = ("pacs",)


def dependencies() -> list[str]:
    """The project's runtime dependencies, as pyproject.toml lists them, with the extras an
    entry point needs (`ENVIRONMENT_EXTRAS`)."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *(item for name in ENVIRONMENT_EXTRAS
                                        for item in extras[name])]


def python_env() -> str:
    """MLflow's python_env.yaml: what `--env-manager uv` and `virtualenv` install."""
    lines = [ENV_HEADER.rstrip("\n"), f'python: "{PYTHON}"', "build_dependencies:",
             "  - pip", "dependencies:", *(f"  - {item}" for item in dependencies())]
    return "\n".join(lines) + "\n"


def conda_env() -> str:
    """The same environment for conda (`conda env create -f conda.yaml`)."""
    lines = [ENV_HEADER.rstrip("\n"), "name: covid-xray", "channels:", "  - conda-forge",
             "dependencies:", f"  - python={PYTHON}", "  - pip", "  - pip:",
             *(f"      - {item}" for item in dependencies())]
    return "\n".join(lines) + "\n"


# File -> its text, as written from the sources above.
GENERATED = {"MLproject": mlproject, "python_env.yaml": python_env, "conda.yaml": conda_env}


def options_table(config: type) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(config):
        default = json.dumps(item.default) if item.default == "" else str(item.default)
        rows.append(f"| `{item.name}` | `{default}` | {item.metadata['help']} |")
    return "\n".join(rows) + "\n"


def space_table() -> str:
    """tune's built-in search space, one row per searched option."""
    rows = ["| option | searched over |", "|---|---|"]
    for name, spec in DEFAULT_SPACE.items():
        if spec["type"] == "categorical":
            values = ", ".join(f"`{json.dumps(choice)}`" for choice in spec["choices"])
        else:
            values = f"{spec['low']:g} to {spec['high']:g}" + (" (log)" if spec.get("log")
                                                                else "")
        rows.append(f"| `{name}` | {values} |")
    return "\n".join(rows) + "\n"


def tables() -> dict[str, str]:
    """Marker name -> the table written between its markers in docs/options.md."""
    return {name: options_table(config) for name, config in ENTRY_POINTS.items()} | {
        "space": space_table()}


def options_doc(text: str) -> str:
    """`text` with each generated table (between its two markers) written afresh."""
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- options:{name} -->\n).*?(<!-- /options:{name} -->)",
                             re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{OPTIONS_DOC.name} lacks the <!-- options:{name} --> markers")
        text = pattern.sub(lambda match, t=table: match.group(1) + t + match.group(2), text)
    return text


def main() -> None:
    for name, render in GENERATED.items():
        (ROOT / name).write_text(render())
    OPTIONS_DOC.write_text(options_doc(OPTIONS_DOC.read_text()))
    print(f"wrote {', '.join(GENERATED)} and the tables of docs/options.md", file=sys.stderr)


if __name__ == "__main__":
    main()
