"""The package's imports point one way: no circles, no import of a module on the same or a
higher floor (``bench/cfg_path.py`` computes the floors from the source)."""

from conftest import load_script


def test_imports_point_down_without_circles():
    import_graph = load_script("bench/cfg_path.py", "import_graph")
    floors = load_script("bench/cfg_path.py", "floors")
    graph = import_graph()
    floor, circles = floors(graph)
    assert "dcgan_mn.training" in graph and "dcgan_mn.norms.module" in graph
    assert circles == []
    up = [f"{m} -> {d}" for m, ds in graph.items() for d in ds if floor[d] >= floor[m]]
    assert up == []
    assert (
        floor["dcgan_mn.errors"] == 0
        and floor["dcgan_mn.training"] > floor["dcgan_mn.launch"] > floor["dcgan_mn.runfolder"]
    )


def test_every_subpackage_is_installed():
    # pyproject lists the packages by name: a new subpackage missing there works in an editable
    # install and is absent from a wheel.
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "dcgan_mn").rglob("__init__.py")
    }
    assert found == listed
