"""The package's plan, enforced: layers import downwards only, and the logged model loads
without the data or training layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DICOM, ROOT, clean_env

PACKAGE = ROOT / "covid_xray"
# Lowest first; a module may import its own layer and the ones before it. The top-level
# modules (config, cli, errors, lifecycle, files, project, pseudonyms, credentials) are the
# floor every layer stands on.
LAYERS = ("imaging", "data", "evaluation", "model", "tracking", "training", "serving", "pacs")
BASE = ("config", "cli", "errors", "lifecycle", "files", "project", "pseudonyms",
        "credentials")
# The logged model (model/) is what a deployment machine loads: it must not need demo data,
# splits or training code.
MODEL_MAY_IMPORT = {"imaging", "evaluation", "model"}
# The PACS node sits beside serving: it answers with the model, never trains or predicts folders.
PACS_MAY_NOT_IMPORT = {"training", "serving"}


def layer_of(module: str) -> str:
    """'covid_xray.imaging.dicom' -> 'imaging'; a base module -> 'base'."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "covid_xray":
        raise ValueError(module)
    if parts[1] in LAYERS:
        return parts[1]
    if parts[1] in BASE:
        return "base"
    raise AssertionError(f"{module}: not in a layer nor a base module; add it to one")


def rank(layer: str) -> int:
    return -1 if layer == "base" else LAYERS.index(layer)


def imports_of(path: Path, package: str = "") -> list[tuple[int, str]]:
    """Every covid_xray module `path` imports (function-level imports included). Relative
    imports (`from ..serving import x`) are resolved against `package`, the module's own
    package (by default the one `path` sits in under covid_xray/)."""
    if not package and path.is_relative_to(PACKAGE):
        package = ".".join(("covid_xray", *path.relative_to(PACKAGE).parent.parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if alias.name.startswith("covid_xray.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: up `level - 1` packages from this one
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *filter(None, [module])])
            if module == "covid_xray":  # from covid_xray import imaging / lifecycle
                found += [(node.lineno, f"covid_xray.{alias.name}") for alias in node.names]
            elif module.startswith("covid_xray."):
                # `from covid_xray.model import pyfunc` names a module of that package
                found.append((node.lineno, module))
    return found


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
                  or path.parent != PACKAGE)


def test_only_base_modules_stay_at_the_top_level():
    top = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    assert set(top) <= set(BASE), f"a module outside the layers: {set(top) - set(BASE)}"
    assert sorted(path.name for path in PACKAGE.iterdir() if path.is_dir()
                  and path.name != "__pycache__") == sorted(LAYERS)


def test_layers_import_downwards_only():
    upward = []
    for path in modules():
        own = layer_of("covid_xray." + ".".join(path.relative_to(PACKAGE).with_suffix("")
                                                .parts))
        for line, imported in imports_of(path):
            target = layer_of(imported)
            if rank(target) > rank(own):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {imported} "
                              f"({target})")
            if own == "model" and target not in MODEL_MAY_IMPORT | {"base"}:
                upward.append(f"{path.relative_to(ROOT)}:{line}: the logged model imports "
                              f"{imported}")
            if own == "pacs" and target in PACS_MAY_NOT_IMPORT:
                upward.append(f"{path.relative_to(ROOT)}:{line}: the PACS node imports "
                              f"{imported}")
    assert not upward, "\n".join(upward)


def test_each_layer_says_what_it_owns_and_may_import():
    for layer in LAYERS:
        docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert docstring and "imports" in docstring, layer


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_the_layering_test_sees_an_upward_import(layer, tmp_path):
    """The check itself can fail: an import from the layer above is reported."""
    above = LAYERS[LAYERS.index(layer) + 1]
    module = tmp_path / "probe.py"
    module.write_text(f"from covid_xray.{above}.anything import something\n")
    ((_, imported),) = imports_of(module)
    assert rank(layer_of(imported)) > rank(layer)


@pytest.mark.parametrize("statement", ["from ..serving import predict\n",
                                       "from ..serving.predict import find_dicoms\n",
                                       "from .. import serving\n"])
def test_the_layering_test_sees_a_relative_upward_import(statement, tmp_path):
    """A relative import is an import too: `from ..serving import predict` in the model layer
    is reported like its absolute spelling."""
    module = tmp_path / "probe.py"
    module.write_text(statement)
    ((_, imported),) = imports_of(module, package="covid_xray.model")
    assert layer_of(imported) == "serving"


def test_loading_the_logged_model_imports_no_data_or_training_code(tmp_path):
    """What `mlflow.pyfunc.load_model` runs on a deployment machine: the served model's code.
    A fresh interpreter imports it and builds the example request; no module of the data,
    training, tracking or serving layers may come along (demo data, splits, the loop)."""
    probe = (
        "import sys\n"
        "from covid_xray.model import served_model\n"
        "from covid_xray.model.requests import example_input\n"
        "example_input()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('covid_xray.'))\n"
        "print('\\n'.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.split()
    assert "covid_xray.model.pyfunc" in loaded
    assert not [name for name in loaded if name.split(".")[1] in
                ("data", "training", "tracking", "serving")], loaded


def test_the_registered_model_loads_and_answers_without_data_or_training_code(store):
    """The registered model itself, loaded by MLflow in a fresh interpreter from the registry
    and asked about a real film: no module of the data, training, tracking or serving layers
    is imported on the way."""
    probe = (
        "import sys, mlflow, pandas as pd\n"
        "from covid_xray.model.requests import encode_dicom\n"
        "model = mlflow.pyfunc.load_model('models:/covid-xray-densenet@champion')\n"
        f"answer = model.predict(pd.DataFrame({{'dicom_base64': [encode_dicom({str(REAL_DICOM)!r})]}}))\n"
        "assert answer.error[0] == '', answer.error[0]\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('covid_xray.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=store["root"],
                          env=clean_env(MLFLOW_TRACKING_URI=store["uri"]), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.split()
    assert "covid_xray.model.served_model" in loaded or "covid_xray.model.pyfunc" in loaded
    assert not [name for name in loaded if name.split(".")[1] in
                ("data", "training", "tracking", "serving")], loaded
