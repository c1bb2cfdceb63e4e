"""Fetch transformers' own common model tests for the installed transformers release (`make test-hf`).

    pip download --no-binary :all: transformers==<installed> --> the sdist's tests/*.py
      --> <cache>/<version>/transformers_tests/ (a package: the files use relative imports)

The sdist ships `tests/test_modeling_common.py` (`ModelTesterMixin`, 124 tests) and
`tests/test_configuration_common.py` (`ConfigTester`) but not the three modules they import from sub-packages
that the sdist leaves out. Those are written here, each said plainly:

- `exporters/test_export.py`: `ExportTesterMixin` (the `torch.export` tests) as an empty mixin. Export is not
  supported (`_can_compile_fullgraph = False`: the object path reads box counts on the host).
- `generation/test_utils.py`: `GenerationTesterMixin` as an empty mixin. `generate` is tested by our own suite
  (tests/model/test_hf_common.py, tests/inference).
- `utils/test_configuration_utils.py`: `config_common_kwargs`, the non-default values `ConfigTester` sets on
  every `PreTrainedConfig` attribute, taken from `PreTrainedConfig()` itself so a new release's attributes
  are covered.

Prints the folder to put on `sys.path` (tests/hf/conftest.py reads `MGLLAVA_TRANSFORMERS_TESTS`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

PACKAGE = "transformers_tests"
STUBS = {
    "exporters/test_export.py": '"""Left out of the sdist; export is not supported by MG-LLaVA."""\n\n\n'
    "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": '"""Left out of the sdist; generate is tested by our own suite."""\n\n\n'
    "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": '"""Left out of the sdist: the values ConfigTester sets."""\n\n'
    "from transformers import PreTrainedConfig\n\n"
    "_SKIP = {'transformers_version', 'architectures', 'dtype', 'id2label', 'label2id'}\n"
    "config_common_kwargs = {\n"
    "    key: (not value if isinstance(value, bool) else value)\n"
    "    for key, value in PreTrainedConfig().to_dict().items()\n"
    "    if key not in _SKIP and (value is None or isinstance(value, (bool, int, float, str)))\n"
    "}\n",
}


def _download(release: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, f"transformers=={release}", "-d", str(into)], check=True)
    (sdist,) = into.glob("transformers-*.tar.gz")
    return sdist


def _extract(sdist: Path, package: Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                (package / parts[2]).write_bytes(tar.extractfile(member).read())
    if not (package / "test_modeling_common.py").exists():
        raise RuntimeError(f"{sdist.name} has no tests/test_modeling_common.py")


def prepare(cache: Path) -> Path:
    """The folder holding `transformers_tests` for the installed release (built once per release)."""
    release = version("transformers")
    root = cache / release
    package = root / PACKAGE
    if (package / "__init__.py").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as staging:
        target = Path(staging) / PACKAGE
        target.mkdir()
        _extract(_download(release, Path(staging)), target)
        for name, text in STUBS.items():
            path = target / name
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (target / "__init__.py").touch()
        target.rename(package)  # whole or not at all: an interrupted run leaves no half-written package
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache/transformers-tests"))
    print(prepare(parser.parse_args().cache.resolve()))


if __name__ == "__main__":
    main()
