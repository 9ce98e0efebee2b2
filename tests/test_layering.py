"""Layering: the generic packages never import the shapes world (nor the top-level modules that do).

    conditioning ← pipelines ← training ← cli / embedded / shapes_world

Every module under condkit/conditioning, condkit/pipelines and condkit/training is parsed with
`ast`, so imports inside functions count as much as those at the top, and relative imports are
resolved to the module they name.
"""

import ast
from pathlib import Path

import pytest

import condkit

PACKAGE_ROOT = Path(condkit.__file__).resolve().parent
GENERIC = ("conditioning", "pipelines", "training")
# Top-level modules that import condkit.shapes_world, so importing them would import it too.
NEVER_FROM_GENERIC = ("condkit.shapes_world", "condkit.embedded", "condkit.cli")
ALSO_FORBIDDEN = {
    "conditioning": ("condkit.pipelines", "condkit.training"),  # shared/DESIGN.md: knows nothing of them
    "pipelines": ("condkit.training",),
    "training": (),
}


def modules(package: str) -> list[Path]:
    return sorted((PACKAGE_ROOT / package).rglob("*.py"))


def imported_modules(path: Path, root: Path = PACKAGE_ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it is; `root` is condkit's folder."""
    module = "condkit." + ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            # `from condkit import shapes_world` imports a submodule; `from condkit import load_pipeline`
            # imports whatever module the lazy public API maps that name to.
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}"))
                if base == "condkit" and alias.name in condkit._EXPORTS:
                    found.append((node.lineno, condkit._EXPORTS[alias.name]))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.append((node.lineno, argument.value))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def _names(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", GENERIC)
def test_generic_packages_do_not_import_the_shapes_world(package):
    forbidden = NEVER_FROM_GENERIC + ALSO_FORBIDDEN[package]
    files = modules(package)
    assert files, f"no modules found under condkit/{package}"
    offences = [
        f"{path.relative_to(PACKAGE_ROOT.parent)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path)
        if any(_names(name, prefix) for prefix in forbidden)
    ]
    assert not offences, "\n".join(offences)


def test_the_checker_sees_function_level_relative_and_lazy_imports(tmp_path):
    fake_root = tmp_path / "condkit"
    (fake_root / "training").mkdir(parents=True)
    source = (
        "def f():\n"
        "    from condkit.shapes_world.dataset import ShapesDataset\n"
        "    from ..shapes_world import MODEL_DIR\n"
        "    from condkit import load_pipeline\n"
        "    import importlib; importlib.import_module('condkit.shapes_world.scorer')\n"
    )
    (fake_root / "training" / "bad.py").write_text(source)
    names = [name for _, name in imported_modules(fake_root / "training" / "bad.py", fake_root)]
    assert "condkit.shapes_world.dataset" in names
    assert "condkit.shapes_world" in names  # the relative import, resolved
    assert "condkit.embedded" in names  # condkit.load_pipeline lives there
    assert "condkit.shapes_world.scorer" in names


def test_the_embedded_default_is_resolved_above_the_generic_layers():
    import condkit.embedded
    from condkit.pipelines.loading import load_pipeline
    from condkit.shapes_world import MODEL_DIR

    assert condkit.load_pipeline is condkit.embedded.load_pipeline
    assert condkit.embedded.default_model() == MODEL_DIR and (MODEL_DIR / "model_index.json").is_file()
    with pytest.raises(ValueError, match="no model given; expected a pipeline folder or hub id"):
        load_pipeline(None)
