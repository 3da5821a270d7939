"""The public API is what the docs say it is: the names `chatbus` exports (`__all__`), and
the public modules that the package docstring and the README's "Layout" section list."""

import importlib
import re
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

import chatbus

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_exported_name_exists() -> None:
    missing = [name for name in chatbus.__all__ if not hasattr(chatbus, name)]

    assert missing == []


def test_every_public_name_is_exported_once() -> None:
    public = {
        name
        for name, value in vars(chatbus).items()
        if (not name.startswith("_") or name == "__version__") and not isinstance(value, ModuleType)
    }

    assert sorted(chatbus.__all__) == sorted(public)


def test_version_is_the_installed_distribution_s() -> None:
    assert chatbus.__version__ == version("chatbus")


def public_modules_in_the_docstring() -> set[str]:
    assert chatbus.__doc__ is not None
    return set(re.findall(r"`chatbus\.(\w+)`", chatbus.__doc__))


def public_modules_in_the_readme() -> set[str]:
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    sentence = re.search(
        r"and\s+the\s+modules\s+(.+?);\s+the\s+rest\s+are\s+internals", layout, re.DOTALL
    )
    assert sentence is not None, "the Layout section no longer names the public modules"
    return set(re.findall(r"`(\w+)`", sentence[1]))


def test_the_docstring_and_the_readme_name_the_same_public_modules() -> None:
    assert public_modules_in_the_docstring() == public_modules_in_the_readme()


@pytest.mark.parametrize("module", sorted(public_modules_in_the_docstring()))
def test_a_public_module_has_what_it_exports(module: str) -> None:
    imported = importlib.import_module(f"chatbus.{module}")

    missing = [name for name in getattr(imported, "__all__", ()) if not hasattr(imported, name)]

    assert missing == []


def test_the_readme_s_examples_import_only_the_public_api() -> None:
    imported_from = set(re.findall(r"^from chatbus\.(\w+) import", README, re.MULTILINE))

    assert imported_from - public_modules_in_the_docstring() == set()
