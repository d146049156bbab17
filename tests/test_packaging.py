"""Python packaging: what the sdist and the wheel carry, the sample config, `imr contrib-path`.

The sdist is built from the checkout and the wheel from that sdist (as pip does for a
source install), so a file missing from either fails here. Building needs setuptools from
PyPI (build isolation), as `pip install .` does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from imr.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
# "# key = value" is a commented default in contrib/imr.toml; other comments are prose.
_COMMENTED_SETTING = re.compile(r"^# ([a-z0-9_]+ = .*?)(\s+# .*)?$")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    sdist_dir, wheel_dir = out / "sdist", out / "wheel"
    # setuptools' sdist command through pip's isolated build: `pip download` of a
    # local directory is not possible, so call the backend the way build frontends do.
    subprocess.run(
        [sys.executable, "-c", _SDIST, str(sdist_dir)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = sdist_dir.glob("imr-*.tar.gz")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "-w", str(wheel_dir), str(sdist)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("imr-*.whl")
    return sdist, wheel


# setuptools.build_meta in a throwaway venv with the build requirements of pyproject.toml.
_SDIST = """
import subprocess, sys, tempfile, tomllib, venv
from pathlib import Path
out = sys.argv[1]
requires = tomllib.loads(Path("pyproject.toml").read_text())["build-system"]["requires"]
with tempfile.TemporaryDirectory() as env:
    venv.create(env, with_pip=True)
    python = Path(env) / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", *requires], check=True)
    code = "import setuptools.build_meta as b, sys; b.build_sdist(sys.argv[1])"
    subprocess.run([python, "-c", code, out], check=True)
"""


def test_wheel_carries_contrib_sample_config_and_license(built: tuple[Path, Path]) -> None:
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    contrib = {p.relative_to(ROOT).as_posix() for p in (ROOT / "contrib").rglob("*") if p.is_file()}
    assert contrib, "contrib/ is empty?"
    for path in contrib:
        assert "imr/" + path in names, f"{path} is not in the wheel"
    assert "imr/contrib/imr.toml" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_sdist_carries_license_contrib_and_setup(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in ("LICENSE", "setup.py", "contrib/imr.toml", "contrib/systemd/imr.service"):
        assert path in names, f"{path} is not in the sdist"


def test_metadata_license_expression_and_legacy_extra(built: tuple[Path, Path]) -> None:
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    assert metadata["License-Expression"] == "MIT"
    assert "LICENSE" in metadata.get_all("License-File", [])
    requires = metadata.get_all("Requires-Dist", [])
    iptables = [r for r in requires if r.startswith("python-iptables")]
    # Only as an extra: an nftables host installs imr without a compiler.
    assert iptables and all("extra ==" in r for r in iptables), iptables
    assert any('extra == "legacy"' in r for r in iptables)


def test_pyproject_has_no_license_table() -> None:
    # setuptools deprecates `license = {text = ...}` (PEP 639), an error from 2027-02-18.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]


def test_sample_config_comments_show_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every commented setting of contrib/imr.toml changes nothing."""
    sample = ROOT / "contrib" / "imr.toml"
    as_shipped = load_config(sample, missing_ok=False)
    lines = []
    for line in sample.read_text().splitlines():
        match = _COMMENTED_SETTING.match(line)
        lines.append(match.group(1) if match else line)
    uncommented = tmp_path / "imr.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    assert sum(1 for _ in filter(_COMMENTED_SETTING.match, sample.read_text().splitlines())) > 30
    assert load_config(uncommented, missing_ok=False) == as_shipped
    # And the two settings that are set fit the packaged imr.socket (SocketGroup=imr).
    assert as_shipped.server.socket_group == "imr"
    assert as_shipped.access.groups == {"imr": "block"}
    defaults = Config().model_dump()
    shipped = as_shipped.model_dump()
    shipped["server"]["socket_group"] = None
    shipped["access"]["groups"] = {}
    assert shipped == defaults


def test_contrib_path_prints_the_directory_and_files() -> None:
    imr = [sys.executable, "-m", "imr", "--config", str(ROOT / "contrib" / "imr.toml")]
    base = subprocess.run(
        [*imr, "contrib-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert (Path(base) / "systemd" / "imr.service").is_file()
    rules = subprocess.run(
        [*imr, "contrib-path", "modsecurity/imr-rules.conf"], capture_output=True, text=True
    )
    assert rules.returncode == 0 and Path(rules.stdout.strip()).is_file()
    for bad in ("nope.conf", "../pyproject.toml"):
        refused = subprocess.run([*imr, "contrib-path", bad], capture_output=True, text=True)
        assert refused.returncode == 1
        assert refused.stderr.startswith("imr: no contrib file")
        assert "Traceback" not in refused.stderr


def test_nftables_host_needs_no_python_iptables() -> None:
    """Without python-iptables every module imports; the legacy backend says what is missing."""
    code = (
        "import sys; sys.modules['iptc'] = None\n"
        "import imr.backends.iptables, imr.backends.nftables, imr.backends.ipset, imr.cli\n"
        "from imr.backends.iptables import _LegacyDriver\n"
        "from imr.backends.base import BackendError\n"
        "try:\n"
        "    _LegacyDriver.__new__(_LegacyDriver).__init__('IMR', None)\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "needs python-iptables" in result.stdout
