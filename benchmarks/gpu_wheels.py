"""The wheels ``benchmarks/gpu_check.sh`` carries to the GPU machine in ``.whl/`` (no index there).

The machine's image holds torch, transformers, lightning, peft, pytest and ~190 more packages
(``benchmarks/gpu_image.txt``) but not DeepSpeed, jsonargparse (LightningCLI) or rouge-score,
nor what those need. ``CARRIED`` names each of them, pinned to the versions the project's venv
runs, all Python 3.12 wheels for Linux x86-64:

* index wheels, fetched with ``pip download --only-binary=:all: --python-version 3.12``;
* rouge-score 0.1.2, which the index holds only as an sdist, built here (pure Python);
* DeepSpeed, which the index holds only as an sdist, built here with ``DS_BUILD_OPS=0``: a
  ``py3-none-any`` wheel with no compiled op, so its ops (CPU Adam under ZeRO-Offload) are
  compiled on first use there, by ninja and the image's compilers.

Left out on purpose: ``datasets`` (and its dill, multiprocess): ``medmoe.data.sources`` imports
it only to read file, ``save_to_disk`` or hub sources, and every run of the check trains on
the toy clinic or on random tensors, so no step imports it (``check`` traces this). lm-eval is
used by ``tests/test_harness_*.py`` only, which are not GPU tests.

Commands::

    python benchmarks/gpu_wheels.py build     # here (index needed): .whl/ from scratch, sizes
    python benchmarks/gpu_wheels.py check     # here: the carried set against the image
    python benchmarks/gpu_wheels.py install   # there: pip install --no-index --find-links .whl

``check`` exits non-zero when a wheel is missing, is not for CPython 3.12 on manylinux x86-64,
has a requirement neither another wheel nor the image meets, or the set exceeds 60 MiB (the
device tool carries 64 MiB in all), and when a distribution the check's code imports is in
neither the image nor ``.whl/``. Those imports are traced in a subprocess of this venv while
it imports the GPU tests, the benchmarks, the modules they import inside functions (``LAZY``)
and the classes the rehearsal's configs name (``medmoe fit ... --print_config``): every
``import`` made by medmoe, the tests, the benchmarks, the image's modules medmoe builds on
(``BASES``) and, transitively, the carried packages. The imports of the image's own packages
are not followed (they run there as installed). A version the image list does not give is
reported as not known, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
IMAGE = Path(__file__).resolve().with_name("gpu_image.txt")
LIMIT_MIB = 60
PYTHON = "3.12"
# what pip may take for the image's Ubuntu 24.04 (glibc 2.39)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# a marker environment of the GPU machine, for the wheels' Requires-Dist
MARKERS = {
    "python_version": PYTHON,
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


@dataclass(frozen=True)
class Carried:
    name: str
    version: str
    needed_by: str
    source: str = "index"  # the index's wheel; "sdist": built here; "deepspeed": DS_BUILD_OPS=0
    extras: str = ""  # the extras ``install`` asks for

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


CARRIED = (
    Carried("deepspeed", "0.19.8", "medmoe.strategies (ZeRO-2)", "deepspeed"),
    Carried("hjson", "3.1.0", "deepspeed"),
    Carried("pydantic", "2.14.4", "deepspeed (its config)"),
    Carried("pydantic-core", "2.50.5", "pydantic"),
    Carried("annotated-types", "0.8.0", "pydantic"),
    Carried("typing-inspection", "0.4.5", "pydantic"),
    # pydantic-core needs >= 4.16.0; the image's version is not known: pip takes this one
    # only where the image's is older
    Carried("typing-extensions", "4.16.0", "pydantic-core"),
    Carried("jsonargparse", "4.53.0", "medmoe.cli (LightningCLI)", extras="signatures"),
    Carried("docstring-parser", "0.18.0", "jsonargparse[signatures]"),
    Carried("typeshed-client", "2.15.0", "jsonargparse[signatures]"),
    Carried("rouge-score", "0.1.2", "medmoe.eval.rouge", "sdist"),
    Carried("nltk", "3.10.4", "rouge-score"),
    Carried("defusedxml", "0.7.1", "nltk"),
)
# what pip is asked for there; it resolves the rest from .whl/ and the image
ROOTS = ("deepspeed", "jsonargparse", "rouge-score")
# imported inside functions along the check's path, so not seen by importing its modules
LAZY = (
    "deepspeed",
    "deepspeed.ops.adam",
    "deepspeed.utils.zero_to_fp32",
    "matplotlib.backends.backend_agg",  # the rehearsal's routing heatmaps
    "peft",
    "safetensors.torch",
    "transformers.models.llama",
    "medmoe.adapters.lora",
    "medmoe.callbacks",
    "medmoe.data",
    "medmoe.losses",
    "medmoe.model",
    "medmoe.objectives.projection",
    "medmoe.strategies",
    "medmoe.zero_to_adapter",
    "torch.utils.tensorboard",  # the rehearsal's TensorBoardLogger
)
# the image's modules medmoe builds on: what they import lazily is the check's need too
BASES = ("lightning.pytorch.cli", "lightning.pytorch.strategies.deepspeed")
GPU_TESTS = ("conftest", "test_gpu")
BENCHMARKS = ("memory", "gpu_throughput")
REHEARSAL = (
    "fit",
    "--config",
    "configs/med.yaml",
    "--config",
    "configs/rehearsal/cpu.yaml",
    "--trainer.accelerator",
    "gpu",
    "--trainer.devices",
    "1",
    "--print_config",
)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mib(size: int) -> str:
    return f"{size / 2**20:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


# --------------------------------------------------------------------------- build
def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build(dest: Path) -> int:
    """``dest`` from scratch: the index's wheels, then the two built here."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    target = ["--python-version", PYTHON, "--implementation", "cp"]
    target += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    index = [c.spec for c in CARRIED if c.source == "index"]
    pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest), *index)
    # built here, not taken from pip's wheel cache (which keeps no record of DS_BUILD_OPS)
    built = ["wheel", "--no-deps", "--no-cache-dir", "-w", str(dest)]
    pip(*built, *(c.spec for c in CARRIED if c.source == "sdist"))
    # no op compiled: a pure-Python wheel. Its setup.py imports torch (this venv's), hence no
    # build isolation; the CUDA accelerator there takes the same op builders and sources
    deepspeed = [c.spec for c in CARRIED if c.source == "deepspeed"]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip(*built, "--no-build-isolation", *deepspeed, env=env)
    files = sorted(dest.glob("*.whl"))
    rows = [[f.name, mib(f.stat().st_size)] for f in files]
    print(table(["wheel", "MiB"], rows))
    print(f"total {mib(sum(f.stat().st_size for f in files))} MiB in {len(files)} wheels")
    return 0


# --------------------------------------------------------------------------- check
def read_image(path: Path) -> dict[str, str | None]:
    """The image's packages: normalised name -> version (None where not known)."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[normalise(name)] = version or None
    return packages


@dataclass
class Wheel:
    path: Path
    name: str
    version: str
    tags: list[str]
    requires: list[str]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        from packaging.utils import parse_wheel_filename

        name, version, _, tags = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            message = Parser().parsestr(archive.read(meta).decode())
        requires = message.get_all("Requires-Dist") or []
        return cls(path, normalise(name), str(version), sorted(map(str, tags)), requires)


def tag_problem(tags: list[str]) -> str | None:
    """Why none of a wheel's tags installs on CPython 3.12, Linux x86-64 (None: one does)."""
    for tag in tags:
        interpreter, abi, platform = tag.split("-")
        cpython = re.fullmatch(r"cp3(\d+)", interpreter)
        minor = int(cpython[1]) if cpython else None
        python_ok = interpreter in ("py3", "py312") or minor == 12 or bool(abi == "abi3" and minor)
        abi_ok = abi in ("none", "abi3", "cp312") and (minor or 0) <= 12
        glibc = re.fullmatch(r"manylinux_2_(\d+)_x86_64", platform)
        platform_ok = platform in ("any", "manylinux1_x86_64", "manylinux2010_x86_64") or (
            platform == "manylinux2014_x86_64" or bool(glibc and int(glibc[1]) <= 39)
        )
        if python_ok and abi_ok and platform_ok:
            return None
    return "not for cp312 / manylinux x86_64: " + ", ".join(tags)


def requirement_problems(
    wheel: Wheel, wheels: dict[str, Wheel], image: dict[str, str | None], extras: str
) -> tuple[list[str], list[str]]:
    """(unmet requirements, requirements met by the image at a version not known here)."""
    from packaging.requirements import Requirement

    unmet, unknown = [], []
    wanted = ["", *(e for e in extras.split(",") if e)]
    for text in wheel.requires:
        requirement = Requirement(text)
        if requirement.marker and not any(
            requirement.marker.evaluate({**MARKERS, "extra": extra}) for extra in wanted
        ):
            continue
        name = normalise(requirement.name)
        carried = wheels.get(name)
        if carried and requirement.specifier.contains(carried.version, prereleases=True):
            continue
        if name in image:
            version = image[name]
            if version is None:
                unknown.append(f"{name}{requirement.specifier}")
                continue
            if requirement.specifier.contains(version, prereleases=True):
                continue
            unmet.append(f"{requirement} (image {version})")
            continue
        unmet.append(f"{requirement} (carried: {carried.version if carried else 'none'})")
    return unmet, unknown


def check_wheels(dest: Path, image: dict[str, str | None]) -> tuple[list[str], dict[str, Wheel]]:
    files = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    wheels: dict[str, Wheel] = {}
    problems = []
    for path in files:
        wheel = Wheel.read(path)
        if wheel.name in wheels:
            problems.append(
                f"two wheels of {wheel.name}: {wheels[wheel.name].path.name}, {path.name}"
            )
        wheels[wheel.name] = wheel
    carried = {normalise(c.name): c for c in CARRIED}
    rows = []
    for name, entry in carried.items():
        wheel = wheels.get(name)
        if wheel is None:
            rows.append([name, entry.version, "-", "-", entry.needed_by, "MISSING"])
            problems.append(f"no wheel of {entry.spec} in {dest}")
            continue
        status = []
        if wheel.version != entry.version:
            status.append(f"version {wheel.version}, want {entry.version}")
        if name in image:
            status.append(f"image has {image[name] or 'a version not known here'}")
        if tag := tag_problem(wheel.tags):
            status.append(tag)
        unmet, unknown = requirement_problems(wheel, wheels, image, entry.extras)
        status += [f"needs {r}" for r in unmet]
        problems += [f"{wheel.path.name}: {s}" for s in status if not s.startswith("image has")]
        note = f"ok; image version not known: {', '.join(unknown)}" if unknown else "ok"
        rows.append(
            [
                name,
                wheel.version,
                ", ".join(wheel.tags),
                mib(wheel.path.stat().st_size),
                entry.needed_by,
                "; ".join(status) or note,
            ]
        )
    for name, wheel in wheels.items():
        if name not in carried:
            rows.append(
                [
                    name,
                    wheel.version,
                    ", ".join(wheel.tags),
                    mib(wheel.path.stat().st_size),
                    "-",
                    "NOT LISTED",
                ]
            )
            problems.append(f"{wheel.path.name} is not in CARRIED (stale? run make gpu-wheels)")
    total = sum(f.stat().st_size for f in files)
    print(f"## Wheels in {dest} (Python {PYTHON}, manylinux x86_64)")
    print()
    print(table(["package", "version", "tags", "MiB", "needed by", "status"], rows))
    print()
    ok = total < LIMIT_MIB * 2**20
    verdict = "ok" if ok else "TOO LARGE"
    print(f"total {mib(total)} MiB in {len(files)} wheels (limit {LIMIT_MIB} MiB): {verdict}")
    if not ok:
        problems.append(f"the wheels total {mib(total)} MiB, over {LIMIT_MIB} MiB")
    return problems, wheels


TRACER = r"""
import builtins, contextlib, importlib, io, json, os, sys
root, names, bases, cli = json.loads(sys.argv[1])
ours = tuple(os.path.join(root, d) + os.sep for d in ("src", "tests", "benchmarks"))
edges = {("<check>", name.partition(".")[0]) for name in names}
original = builtins.__import__

def recording(name, globals=None, locals=None, fromlist=(), level=0):
    module = original(name, globals, locals, fromlist, level)
    if level == 0 and globals:
        importer = globals.get("__name__") or "?"
        if (globals.get("__file__") or "").startswith(ours) or importer.startswith(tuple(bases)):
            importer = "<check>"
        edges.add((importer.partition(".")[0], name.partition(".")[0]))
    return module

builtins.__import__ = recording
sys.path[:0] = [os.path.join(root, d) for d in ("src", "tests", "benchmarks")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
for name in names:
    importlib.import_module(name)
from medmoe.cli import run_cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    run_cli(cli)
print("EDGES " + json.dumps(sorted(edges)))
"""


def trace_imports() -> dict[str, set[str]]:
    """Top-level package -> the top-level packages it imports ("<check>": the check's code)."""
    names = [*GPU_TESTS, *BENCHMARKS, *LAZY]
    payload = json.dumps([str(ROOT), names, list(BASES), list(REHEARSAL)])
    result = subprocess.run(
        [sys.executable, "-c", TRACER, payload], cwd=ROOT, capture_output=True, text=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("EDGES ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the import trace failed:\n{result.stderr[-4000:]}")
    graph: dict[str, set[str]] = {}
    for importer, imported in json.loads(lines[-1][len("EDGES ") :]):
        graph.setdefault(importer, set()).add(imported)
    return graph


def check_imports(image: dict[str, str | None], wheels: dict[str, Wheel]) -> list[str]:
    """Every distribution imported by the check's code, or by a carried one, is there.

    The imports of the image's own packages are its business (they run there as installed),
    except those of ``BASES``, the image's modules medmoe builds on.
    """
    from importlib.metadata import packages_distributions

    distributions = {top: normalise(ds[0]) for top, ds in packages_distributions().items()}
    skip = {"medmoe", *GPU_TESTS, *BENCHMARKS} | set(sys.stdlib_module_names)
    graph = trace_imports()
    needed: dict[str, set[str]] = {}
    frontier, seen = ["<check>"], {"<check>"}
    while frontier:
        importer = frontier.pop()
        for imported in graph.get(importer, ()):
            if imported in skip or imported == importer:
                continue
            dist = distributions.get(imported, f"<{imported}: no distribution>")
            needed.setdefault(dist, set()).add(importer.strip("<>"))
            if dist not in image and imported not in seen:
                seen.add(imported)
                frontier.append(imported)
    rows, problems = [], []
    for dist in sorted(needed):
        by = ", ".join(sorted(needed[dist]))
        if dist in image:
            where = f"image {image[dist] or '(version not known)'}"
        elif dist in wheels:
            where = f"wheel {wheels[dist].path.name}"
        else:
            where = "MISSING"
            problems.append(f"{dist} (imported by {by}) is in neither the image nor the wheels")
        rows.append([dist, by, where])
    print()
    print("## Distributions the check imports (traced in this venv)")
    print()
    print(table(["distribution", "imported by", "on the GPU machine"], rows))
    return problems


def check(dest: Path) -> int:
    image = read_image(IMAGE)
    problems, wheels = check_wheels(dest, image)
    problems += check_imports(image, wheels)
    print()
    if problems:
        print(f"{len(problems)} problem(s):")
        print("\n".join(f"- {p}" for p in problems))
        return 1
    print("carried set complete: every import is in the image or in the wheels")
    return 0


# --------------------------------------------------------------------------- install
def install(dest: Path) -> int:
    """On the GPU machine: pip resolves the roots from ``dest`` and what is installed.

    Should the resolver refuse (a requirement the image's own version does not meet), the
    carried wheels not installed go in without resolution, and the exit status says so.
    """
    from importlib.metadata import PackageNotFoundError, version

    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(dest)]
    pip += ["--no-cache-dir", "--disable-pip-version-check"]
    roots = [c for c in CARRIED if c.name in ROOTS]
    specs = [f"{c.name}[{c.extras}]=={c.version}" if c.extras else c.spec for c in roots]
    print("$ " + " ".join(pip + specs), flush=True)
    if subprocess.run(pip + specs).returncode == 0:
        return 0
    absent = []
    for carried in CARRIED:
        try:
            version(carried.name)
        except PackageNotFoundError:
            absent.append(carried.spec)
    print(f"pip's resolver failed: installing {absent} without resolution", flush=True)
    subprocess.run([*pip, "--no-deps", *absent])
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("build", "check", "install"))
    p.add_argument("--dest", type=Path, default=WHEELS, help="the wheel folder (default .whl)")
    args = p.parse_args(argv)
    return {"build": build, "check": check, "install": install}[args.command](args.dest)


if __name__ == "__main__":
    sys.exit(main())
