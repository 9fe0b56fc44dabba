"""`MLproject` and the README's option tables, written from the config dataclasses.

The options exist once, in config.py. This module renders the MLproject entry points and the
README's "Training options" table from them; `python -m covid_xray.project` rewrites both, and
a test fails when either is stale. MLflow passes a `-P name=value` that an entry point does
not declare on to its command as `--name value`: tune declares only its own options and takes
train's that way, so it sees exactly the ones a user gave.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from covid_xray.config import (
    DownloadConfig,
    EvaluateConfig,
    PredictConfig,
    PromoteConfig,
    TrainConfig,
    TuneConfig,
)

ROOT = Path(__file__).resolve().parent.parent
# Entry point -> (script, config). `main` is train, so a bare `mlflow run .` trains.
ENTRY_POINTS: dict[str, tuple[str, type]] = {
    "train": ("train", TrainConfig),
    "download": ("download", DownloadConfig),
    "tune": ("tune", TuneConfig),
    "evaluate": ("evaluate", EvaluateConfig),
    "promote": ("promote", PromoteConfig),
    "predict": ("predict", PredictConfig),
}
README_TABLES = {"train": TrainConfig}
HEADER = """\
# Written by `python -m covid_xray.project` from covid_xray/config.py: edit the config, not
# this file (tests/test_entrypoints.py fails when it is stale). Numbers are typed float so
# MLflow checks them; booleans are the strings true / false. tune declares only its own
# options: MLflow passes the train options you give (-P lr=0.001) on as --lr 0.001.
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
    lines = [HEADER.rstrip("\n"), "name: covid-xray", "", "conda_env: conda.yaml", "",
             "entry_points:"]
    for entry_point, (script, config) in ENTRY_POINTS.items():
        arguments = " ".join(f"--{item.name.replace('_', '-')} {{{item.name}}}"
                             for item in dataclasses.fields(config))
        lines += [f"  {entry_point}:" + (" &train" if entry_point == "train" else ""),
                  "    parameters:", *_parameters(config),
                  "    command: >-", f"      python entrypoints/{script}.py {arguments}", ""]
        if entry_point == "train":
            lines += ["  main: *train", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def options_table(config: type) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(config):
        default = json.dumps(item.default) if item.default == "" else str(item.default)
        rows.append(f"| `{item.name}` | `{default}` | {item.metadata['help']} |")
    return "\n".join(rows) + "\n"


def readme(text: str) -> str:
    """`text` with each generated table (between its two markers) written afresh."""
    for name, config in README_TABLES.items():
        pattern = re.compile(rf"(<!-- options:{name} -->\n).*?(<!-- /options:{name} -->)",
                             re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the <!-- options:{name} --> markers")
        text = pattern.sub(lambda match, c=config: match.group(1) + options_table(c)
                           + match.group(2), text)
    return text


def main() -> None:
    (ROOT / "MLproject").write_text(mlproject())
    path = ROOT / "README.md"
    path.write_text(readme(path.read_text()))
    print("wrote MLproject and README.md's option tables", file=sys.stderr)


if __name__ == "__main__":
    main()
