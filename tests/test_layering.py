"""Data goes one way: workflows -> actors -> models. models/ never imports Ray or DeepSpeed."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_never_import_ray_deepspeed_actors_or_workflows():
    files = sorted((ROOT / "models").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & {"ray", "deepspeed", "actors", "workflows"})
                 for f in files}
    assert not {f: names for f, names in offenders.items() if names}


def test_actors_never_import_workflows():
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & {"workflows"})
                 for f in sorted((ROOT / "actors").rglob("*.py"))}
    assert not {f: names for f, names in offenders.items() if names}
