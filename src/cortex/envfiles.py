"""What defines an API version's environment, read from its project folder: the files
(`requirements.txt`, `dependencies.sh`, `conda-packages.txt`), the model runtime the server adds
for ONNX and TensorFlow predictors, the key they make, the `.env` file, and the worker's
standard-library runtime put first on a worker's path. Building is `cortex.envbuild`; the
cache of built environments is `cortex.environments`.
"""

from __future__ import annotations

import hashlib
import io
import platform
import re
import shutil
import sys
from pathlib import Path

import dotenv.parser

import cortex
from cortex import errors, project

REQUIREMENTS = "requirements.txt"
DEPENDENCIES = "dependencies.sh"
CONDA_PACKAGES = "conda-packages.txt"
# The files that define an environment, in the order a build uses them.
ENV_FILES = (DEPENDENCIES, CONDA_PACKAGES, REQUIREMENTS)
DOTENV = ".env"
# A process's environment and arguments share about 2 MiB on Linux (ARG_MAX): a `.env` must
# leave room for the rest.
MAX_DOTENV_BYTES = 256 << 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The worker's modules, relative to the `cortex` package: standard library only.
_RUNTIME_MODULES = (
    "__init__.py",
    "predictor.py",
    "worker/__init__.py",
    "worker/__main__.py",
    "worker/forkserver.py",
    "worker/logship.py",
    "worker/models.py",
    "worker/queue.py",
    "worker/ranges.py",
    "worker/results.py",
    "worker/shipper.py",
    "worker/runtime.py",
)


def python_tag() -> str:
    """The interpreter environments are built for: part of every key."""
    version = ".".join(str(part) for part in sys.version_info[:3])
    return f"{sys.implementation.name}-{version}-{platform.machine()}"


# The model runtime each predictor type needs, installed unless requirements.txt names one:
# (the package without GPUs, with GPUs, the names that count as naming it).
_RUNTIMES = {
    "onnx": ("onnxruntime", "onnxruntime-gpu", ("onnxruntime",)),
    "tensorflow": (
        "tensorflow-cpu",
        "tensorflow",
        ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly", "tensorflow-intel"),
    ),
}


def requirement_names(text: str) -> set[str]:
    """The distribution names a requirements file asks for, normalised (PEP 503)."""
    names = set()
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def runtime_requirements(predictor_type: str, gpu: int, project_dir: Path) -> tuple[str, ...]:
    """What the server adds to an API's environment for its predictor type: ONNX Runtime or
    TensorFlow (their GPU builds with `compute.gpu`), unless requirements.txt names them."""
    if predictor_type not in _RUNTIMES:
        return ()
    cpu_package, gpu_package, names = _RUNTIMES[predictor_type]
    path = project_dir / REQUIREMENTS
    asked = requirement_names(path.read_text(errors="replace")) if path.is_file() else set()
    if asked & set(names):
        return ()
    return (gpu_package if gpu else cpu_package,)


def key_for(project_dir: Path, extra: tuple[str, ...] = ()) -> str | None:
    """The environment a project needs, named by the content of what defines it and the
    `extra` requirements the server adds (a model runtime); None if there is nothing to
    install (the server's interpreter runs it)."""
    digest = hashlib.sha256(f"cortex-env-1\0{cortex.__version__}\0{python_tag()}\0".encode())
    digest.update(("extra\0" + "\0".join(extra) + "\0").encode())
    found = bool(extra)
    for name in ENV_FILES:
        path = project_dir / name
        if path.is_file():
            found = True
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
        else:
            digest.update(f"{name}\0-\0".encode())
    return digest.hexdigest()[:24] if found else None


def conda_tool() -> str | None:
    """The conda-compatible installer on PATH, if any."""
    for name in ("micromamba", "mamba", "conda"):
        found = shutil.which(name)
        if found:
            return found
    return None


def read_dotenv(text: str, source: str = DOTENV) -> dict[str, str]:
    """A `.env` file's variables, as python-dotenv reads them (`NAME=value`, `export NAME=...`,
    `#` comments, single- or double-quoted values; no `${VAR}` expansion). A line that does not
    parse, or a name starting with CORTEX_ (the server's own), is refused with its line."""
    values: dict[str, str] = {}
    for binding in dotenv.parser.parse_stream(io.StringIO(text)):
        # A binding's text starts with the blank lines before it: its line is after them.
        original = binding.original.string
        skipped = original[: len(original) - len(original.lstrip())]
        line = binding.original.line + skipped.count("\n")
        if binding.error:
            shown = binding.original.string.strip()[:80]
            raise errors.InvalidSpec(f"{source}: line {line}: cannot be read: {shown!r}")
        if binding.key is None:
            continue  # a blank line or a comment
        if not _ENV_NAME.fullmatch(binding.key):
            raise errors.InvalidSpec(
                f"{source}: line {line}: {binding.key[:80]!r} is not a valid environment "
                "variable name (letters, digits and _, not starting with a digit)"
            )
        if binding.key.upper().startswith("CORTEX_"):
            raise errors.InvalidSpec(
                f"{source}: line {line}: {binding.key}: names starting with CORTEX_ are "
                "reserved for the server"
            )
        if "\0" in (binding.value or ""):
            raise errors.InvalidSpec(f"{source}: line {line}: a value may not hold a null")
        values[binding.key] = binding.value or ""
    return values


def check_project(project_dir: Path) -> None:
    """What a deploy refuses before it builds anything: a `.env` that does not read or is too
    big to be a process's environment, and `conda-packages.txt` on a server without conda."""
    dotenv_path = project_dir / DOTENV
    if dotenv_path.is_file():
        size = dotenv_path.stat().st_size
        if size > MAX_DOTENV_BYTES:
            raise errors.InvalidSpec(
                f"{DOTENV}: {size} bytes is more than a worker's environment can hold "
                f"(at most {MAX_DOTENV_BYTES}); put large values in files of the project"
            )
        read_dotenv(dotenv_path.read_text(errors="replace"))
    if (project_dir / CONDA_PACKAGES).is_file() and conda_tool() is None:
        raise errors.InvalidSpec(
            f"{CONDA_PACKAGES}: this server cannot install conda packages: neither micromamba, "
            "mamba nor conda is on its PATH (install one, or list the packages in "
            f"{REQUIREMENTS})"
        )


def runtime_dir(root: Path) -> Path:
    """A folder holding only the worker's modules (as the package `cortex`), to put first on a
    worker's path in any environment. Named by their content; written once."""
    package = Path(cortex.__file__).parent
    digest = hashlib.sha256()
    for name in _RUNTIME_MODULES:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes())

    def copy(tmp: Path) -> None:
        for name in _RUNTIME_MODULES:
            target = tmp / "cortex" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / name, target)

    return project.publish(root / f"runtime-{digest.hexdigest()[:16]}", copy)
