"""No pickle where user files are read: no module of jaxlm imports a pickle-based loader or lets
numpy unpickle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxlm"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}


def pickle_uses(source: str) -> list[str]:
    """What in `source` could unpickle: imports of pickle-based modules, `allow_pickle=True`, an
    `np.load` that does not say `allow_pickle=False`, and `read_pickle` calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            flags = {k.arg: k.value for k in node.keywords}
            pickle_flag = flags.get("allow_pickle")
            if isinstance(pickle_flag, ast.Constant) and pickle_flag.value is True:
                found.append(f"{name}(allow_pickle=True) at line {node.lineno}")
            elif name == "load" and not (isinstance(pickle_flag, ast.Constant) and pickle_flag.value is False) \
                    and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") in ("np", "numpy"):
                found.append(f"np.load without allow_pickle=False at line {node.lineno}")
            elif name == "read_pickle":
                found.append(f"read_pickle at line {node.lineno}")
    return found


@pytest.mark.parametrize("module", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))
def test_no_module_can_unpickle(module):
    assert pickle_uses((PACKAGE / module).read_text()) == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "from joblib import load", "import torch", "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)", "import pandas as pd\npd.read_pickle('x')",
])
def test_the_check_sees_each_way_to_unpickle(snippet):
    assert pickle_uses(snippet)


def test_the_check_accepts_safe_loads():
    assert pickle_uses("import numpy as np\nnp.load('x.npy', allow_pickle=False)\nimport json") == []
