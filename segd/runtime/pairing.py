"""Which libedgetpu works inside which TFLite runtime, decided from data
(``segd/data/edgetpu_pairings.toml``) before anything loads the delegate.

libedgetpu is linked against the TFLite C++ delegate ABI of the TensorFlow it was built from;
inside another TFLite it can segfault at interpreter creation (google-coral/edgetpu#812). So
the Edge TPU worker identifies the libedgetpu it is about to load (:class:`Library`), looks it
up (:func:`identify`), and picks a runtime the table calls good for it (:func:`decide`) or
refuses with a message naming the pair to install. Pure functions over plain data, plus two
readers of the machine (dpkg's database and a file's sha256).
"""

from __future__ import annotations

import hashlib
import platform
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from segd.runtime.tpu_worker import RUNTIMES, TPU_PREFERENCE

POLICIES = ("check", "trust")
DPKG_ADMINDIR = Path("/var/lib/dpkg")
_RUNTIME_VERSION = re.compile(r"RuntimeVersion\((\d+)\)")


# --- versions ---------------------------------------------------------------------------------
def version_tuple(text: str) -> tuple[int, ...]:
    """Leading dotted numbers: "2.5.0.post1" -> (2, 5, 0), "2.17.1" -> (2, 17, 1)."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):
            break
    return tuple(parts)


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def version_matches(version: str, spec: str) -> bool:
    """``spec``: "*", an exact version, or comma-joined comparisons (">=2.5.0,<2.12")."""
    spec = spec.strip()
    if spec == "*":
        return True
    have = version_tuple(version)
    if not have:
        return False
    for clause in (c.strip() for c in spec.split(",")):
        match = re.fullmatch(r"(>=|<=|==|>|<)?\s*([\d.]+)", clause)
        if not match:
            raise ValueError(f"bad version spec {clause!r}")
        op, want = match.group(1) or "==", version_tuple(match.group(2))
        c = _cmp(have, want)
        ok = {">=": c >= 0, "<=": c <= 0, "==": c == 0, ">": c > 0, "<": c < 0}[op]
        if not ok:
            return False
    return True


def runtime_version_of(version_string: str | None) -> int | None:
    """The N of ``RuntimeVersion(N)`` in an ``edgetpu_version()`` string."""
    match = _RUNTIME_VERSION.search(version_string or "")
    return int(match.group(1)) if match else None


# --- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    runtime: str  # "tflite_runtime" | "litert" | "*"
    versions: tuple[str, ...]  # specs; any may match
    verdict: str  # "good" | "bad"
    note: str
    sources: tuple[str, ...]

    def covers(self, runtime: str, version: str) -> bool:
        return self.runtime in ("*", runtime) and any(version_matches(version, v) for v in self.versions)


@dataclass(frozen=True)
class Build:
    id: str
    name: str
    tensorflow: str | None = None
    packages: tuple[str, ...] = ()
    package_versions: tuple[str, ...] = ()
    version_strings: tuple[str, ...] = ()
    runtime_version: int | None = None  # any edgetpu_version() with this RuntimeVersion(N)
    path_patterns: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    claims: tuple[Claim, ...] = ()
    same_tensorflow_runtime: str | None = None  # the runtime of the same TF version is good
    family_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    packages: tuple[str, ...]
    pattern: str
    same_tensorflow_runtime: str | None
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Recommended:
    build: str
    package: str
    package_version: str
    deb_url: str
    runtime: str
    runtime_version: str
    python: str
    wheel_urls: Mapping[str, str]
    numpy: str
    source: str

    def deb(self, machine: str) -> str | None:
        arch = {"aarch64": "arm64", "arm64": "arm64", "x86_64": "amd64", "amd64": "amd64"}.get(machine)
        return self.deb_url.format(deb_arch=arch) if arch else None

    def wheel(self, machine: str) -> str | None:
        return self.wheel_urls.get({"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine))

    def label(self) -> str:
        return (f"{self.package} {self.package_version} + {RUNTIMES[self.runtime][1]} "
                f"{self.runtime_version} (Python {self.python}, {self.numpy})")  # fmt: skip


@dataclass(frozen=True)
class Table:
    builds: tuple[Build, ...]
    families: Mapping[str, Family]
    recommended: Recommended

    @classmethod
    def load(cls, extra: Path | None = None) -> Table:
        """The shipped table, plus ``extra`` (same format; its builds are tried first)."""
        text = resources.files("segd").joinpath("data/edgetpu_pairings.toml").read_text()
        data = tomllib.loads(text)
        extra_builds: list[dict[str, Any]] = []
        if extra is not None:
            try:
                more = tomllib.loads(Path(extra).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"cannot read edgetpu_pairings {extra}: {exc}") from exc
            extra_builds = list(more.get("build", []))
        families = {
            key: Family(
                name=f["name"], packages=tuple(f.get("packages", ())),
                pattern=f["package_version_pattern"],
                same_tensorflow_runtime=f.get("same_tensorflow_runtime"),
                sources=tuple(f.get("sources", ())),
            )
            for key, f in data.get("family", {}).items()
        }
        builds = tuple(_build(b, families) for b in [*extra_builds, *data.get("build", [])])
        rec = data["recommended"]
        recommended = Recommended(
            build=rec["build"], package=rec["package"], package_version=rec["package_version"],
            deb_url=rec["deb_url"], runtime=rec["runtime"], runtime_version=rec["runtime_version"],
            python=rec["python"], wheel_urls=dict(rec["wheel_urls"]), numpy=rec["numpy"],
            source=rec["source"],
        )  # fmt: skip
        return cls(builds, families, recommended)


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _build(raw: Mapping[str, Any], families: Mapping[str, Family]) -> Build:
    family = families.get(raw.get("family", ""))
    name = raw.get("name") or (family.name.format(tensorflow=raw.get("tensorflow")) if family else raw["id"])
    versions = _strings(raw.get("package_versions"))
    claims = tuple(
        Claim(
            runtime=c["runtime"], versions=_strings(c.get("versions", "*")), verdict=c["verdict"],
            note=c.get("note", ""), sources=_strings(c.get("sources")),
        )
        for c in raw.get("pairing", [])
    )
    for claim in claims:
        if claim.verdict not in ("good", "bad"):
            raise ValueError(f"build {raw['id']}: verdict must be good or bad, not {claim.verdict!r}")
    return Build(
        id=raw["id"], name=name, tensorflow=raw.get("tensorflow"),
        packages=_strings(raw.get("packages")) or (family.packages if family else ()),
        package_versions=versions, version_strings=_strings(raw.get("version_strings")),
        runtime_version=raw.get("runtime_version"), path_patterns=_strings(raw.get("path_patterns")),
        sha256=tuple(s.lower() for s in _strings(raw.get("sha256"))), claims=claims,
        same_tensorflow_runtime=family.same_tensorflow_runtime if family else None,
        family_sources=family.sources if family else (),
    )  # fmt: skip


# --- what is installed --------------------------------------------------------------------------
@dataclass(frozen=True)
class Library:
    """What can be known about the libedgetpu the worker would load, without loading the delegate."""

    library: str  # as configured (a soname or a path)
    path: str | None = None  # the file the loader opens
    package: str | None = None  # the Debian package that owns that file
    package_version: str | None = None
    version_string: str | None = None  # edgetpu_version()
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"library": self.library, "path": self.path, "package": self.package,
                "package_version": self.package_version, "version": self.version_string,
                "sha256": self.sha256}  # fmt: skip


def dpkg_packages(status_file: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """Installed Debian packages -> version, from dpkg's status database (all when ``names`` is None)."""
    wanted = set(names) if names is not None else None
    found: dict[str, str] = {}
    try:
        text = status_file.read_text(errors="replace")
    except OSError:
        return found
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" ")
        )
        pkg = fields.get("Package")
        if pkg and (wanted is None or pkg in wanted) and "installed" in fields.get("Status", "").split():
            found[pkg] = fields.get("Version", "?")
    return found


def dpkg_owner(path: str, admindir: Path = DPKG_ADMINDIR, packages: Iterable[str] | None = None) -> tuple[str, str] | None:
    """(package, version) of the installed Debian package whose file list has ``path`` (compared
    after resolving symlinks, so /usr/lib/.../libedgetpu.so.1 finds libedgetpu.so.1.0's owner)."""
    installed = dpkg_packages(admindir / "status", packages)
    target = Path(path).resolve()
    for pkg, version in installed.items():
        for lst in (admindir / "info").glob(f"{pkg}.list"), (admindir / "info").glob(f"{pkg}:*.list"):
            for list_file in lst:
                try:
                    lines = list_file.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                if any(line and Path(line).resolve() == target for line in lines if "libedgetpu" in line):
                    return pkg, version
    return None


def file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def observe(library: str, path: str | None, version_string: str | None, *,
            admindir: Path = DPKG_ADMINDIR, table: Table | None = None) -> Library:  # fmt: skip
    """Everything :func:`identify` uses about one loaded libedgetpu file."""
    owner = None
    if path:
        names = {p for b in (table or Table.load()).builds for p in b.packages} or None
        owner = dpkg_owner(path, admindir, names)
    return Library(library, path, owner[0] if owner else None, owner[1] if owner else None,
                   version_string, file_sha256(path))  # fmt: skip


# --- decisions ----------------------------------------------------------------------------------
def identify(lib: Library, table: Table) -> tuple[Build | None, str]:
    """(the table's build, how it was recognised) — or (None, what was tried)."""
    if lib.sha256:
        for b in table.builds:
            if lib.sha256.lower() in b.sha256:
                return b, f"sha256 {lib.sha256[:12]}…"
    if lib.package and lib.package_version:
        for b in table.builds:
            if lib.package in b.packages and lib.package_version in b.package_versions:
                return b, f"Debian package {lib.package} {lib.package_version}"
        for key, fam in table.families.items():
            match = re.match(fam.pattern, lib.package_version)
            if lib.package in fam.packages and match:
                tf = match.group("tensorflow")
                listed = next((b for b in table.builds if b.tensorflow == tf and b.family_sources == fam.sources), None)
                build = listed or Build(
                    id=f"{key}-16.0tf{tf}", name=fam.name.format(tensorflow=tf), tensorflow=tf,
                    packages=fam.packages, same_tensorflow_runtime=fam.same_tensorflow_runtime,
                    family_sources=fam.sources,
                )  # fmt: skip
                return build, f"Debian package {lib.package} {lib.package_version}"
    if lib.path:
        for b in table.builds:
            if any(re.search(p, lib.path) for p in b.path_patterns):
                return b, f"path {lib.path}"
    if lib.version_string:
        for b in table.builds:
            if lib.version_string in b.version_strings:
                return b, f"edgetpu_version() {lib.version_string!r}"
        rv = runtime_version_of(lib.version_string)
        for b in table.builds:
            if rv is not None and b.runtime_version == rv:
                return b, f"edgetpu_version() RuntimeVersion({rv})"
    tried = [f"file {lib.path or lib.library}"]
    if lib.package:
        tried.append(f"Debian package {lib.package} {lib.package_version}")
    tried.append(f"edgetpu_version() {lib.version_string!r}" if lib.version_string else "no edgetpu_version()")
    return None, ", ".join(tried)


@dataclass(frozen=True)
class Verdict:
    runtime: str
    version: str
    verdict: str  # good | bad | unknown
    note: str = ""
    sources: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "version": self.version, "verdict": self.verdict,
                "note": self.note, "sources": list(self.sources)}  # fmt: skip


def judge(build: Build | None, runtime: str, version: str) -> Verdict:
    """What the table says about ``build`` inside ``runtime`` ``version``."""
    if build is None:
        return Verdict(runtime, version, "unknown", "this libedgetpu is not in segd's table")
    for claim in build.claims:  # a listed claim wins over the family rule
        if claim.covers(runtime, version):
            return Verdict(runtime, version, claim.verdict, claim.note, claim.sources)
    if build.same_tensorflow_runtime == runtime and build.tensorflow and version_matches(version, build.tensorflow):
        return Verdict(runtime, version, "good",
                       f"built from the same TensorFlow {build.tensorflow} as this libedgetpu",
                       build.family_sources)  # fmt: skip
    return Verdict(runtime, version, "unknown", f"no public report of {build.name} inside {RUNTIMES.get(runtime, (runtime, runtime))[1]} {version}")


@dataclass(frozen=True)
class Decision:
    library: Library
    build: Build | None
    recognised_by: str
    verdicts: tuple[Verdict, ...]  # one per installed runtime, in the worker's preference order
    runtime: str | None  # the runtime to load libedgetpu into; None: refused
    policy: str
    message: str
    recommended: Recommended = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def known_good(self) -> bool:
        return any(v.runtime == self.runtime and v.verdict == "good" for v in self.verdicts)

    def describe(self) -> dict[str, Any]:
        return {
            "library": self.library.describe(),
            "build": self.build.id if self.build else None,
            "build_name": self.build.name if self.build else None,
            "recognised_by": self.recognised_by,
            "runtimes": [v.describe() for v in self.verdicts],
            "runtime": self.runtime,
            "known_good": self.known_good,
            "policy": self.policy,
            "message": self.message,
        }


def _dist(runtime: str) -> str:
    return RUNTIMES.get(runtime, (runtime, runtime))[1]


def install_advice(rec: Recommended, machine: str | None = None) -> str:
    """One sentence naming the known-good pair and where it comes from."""
    machine = machine or platform.machine()
    deb, wheel = rec.deb(machine), rec.wheel(machine)
    if deb is None or wheel is None:
        return (f"install the known-good pair {rec.label()} — published for 64-bit ARM and x86-64 only "
                f"(this is {machine}: install a 64-bit OS)")  # fmt: skip
    return (f"install the known-good pair {rec.label()}: {deb} and {wheel} "
            "(`segd doctor` prints the commands)")  # fmt: skip


def decide(
    lib: Library,
    runtimes: Mapping[str, str | None],
    *,
    table: Table,
    policy: str = "check",
    preferred: str | None = None,
    machine: str | None = None,
) -> Decision:
    """The runtime to load ``lib`` into, from the runtimes installed where the worker runs
    (name -> version, None: not installed). ``check``: only a pairing the table calls good (in
    the order tflite_runtime, ai-edge-litert); ``trust``: ``preferred`` or the first installed."""
    if policy not in POLICIES:
        raise ValueError(f"edgetpu_pairing must be one of {', '.join(POLICIES)}, not {policy!r}")
    build, how = identify(lib, table)
    installed = [(n, runtimes[n]) for n in TPU_PREFERENCE if runtimes.get(n)]
    verdicts = tuple(judge(build, n, str(v)) for n, v in installed)
    who = build.name if build else f"an unknown libedgetpu ({how})"
    if not installed:
        message = f"no TFLite runtime is installed for the Edge TPU worker; {install_advice(table.recommended, machine)}"
        return Decision(lib, build, how, verdicts, None, policy, message, table.recommended)
    if policy == "trust":
        names = [n for n, _ in installed]
        chosen = preferred if preferred in names else names[0]
        v = next(x for x in verdicts if x.runtime == chosen)
        message = f"{who} inside {_dist(chosen)} {v.version}: {v.verdict} pairing, loaded anyway (edgetpu_pairing = \"trust\")"
        return Decision(lib, build, how, verdicts, chosen, policy, message, table.recommended)
    good = [v for v in verdicts if v.verdict == "good"]
    if good:
        v = good[0]
        source = f" ({v.sources[0]})" if v.sources else ""
        message = f"{who} inside {_dist(v.runtime)} {v.version}: known good — {v.note}{source}"
        return Decision(lib, build, how, verdicts, v.runtime, policy, message, table.recommended)
    reasons = "; ".join(
        f"{_dist(v.runtime)} {v.version}: {'known bad' if v.verdict == 'bad' else 'unknown'}"
        + (f" — {v.note}" if v.note else "") + (f" ({v.sources[0]})" if v.sources else "")
        for v in verdicts
    )
    message = (f"refused to load {who}{f' (recognised by {how})' if build else ''} — {reasons}. "
               f"{install_advice(table.recommended, machine)}; or set edgetpu_pairing = \"trust\" "
               "to load it anyway")  # fmt: skip
    return Decision(lib, build, how, verdicts, None, policy, message, table.recommended)


TPU_VENV = "/opt/segd-tpu"
ENV_FILE = "/etc/segd/segd.env"


def install_steps(rec: Recommended, machine: str | None = None, venv: str = TPU_VENV,
                  download_dir: str = "/tmp") -> list[list[str]]:  # fmt: skip
    """The known-good pair's installation as commands to run as root (``segd install-service
    --edgetpu-pair``): the libedgetpu .deb, and the runtime in its own venv for the worker."""
    machine = machine or platform.machine()
    deb, wheel = rec.deb(machine), rec.wheel(machine)
    if deb is None or wheel is None:
        return []
    local = f"{download_dir}/{deb.rsplit('/', 1)[1]}"
    return [
        ["curl", "-fsSL", "-o", local, deb],
        # libedgetpu1-max asks to confirm the maximum clock (a USB Accelerator runs hot with it)
        ["sh", "-c", f"echo '{rec.package} libedgetpu/accepted-eula boolean true' | debconf-set-selections"],
        ["apt-get", "install", "-y", local],
        [f"python{rec.python}", "-m", "venv", venv],
        [f"{venv}/bin/pip", "install", "--no-cache-dir", rec.numpy, wheel],
    ]


def install_commands(rec: Recommended, machine: str | None = None, venv: str = TPU_VENV) -> list[str]:
    """The same as shell lines for a person (``segd doctor``, docs), ending with the setting."""
    steps = install_steps(rec, machine, venv, download_dir=".")
    if not steps:
        return []
    import shlex

    def line(step: list[str]) -> str:
        if step[0] == "curl":  # downloads as you, into the current directory
            return shlex.join(step)
        if step[0] == "sh":
            return step[2].replace("| debconf-set-selections", "| sudo debconf-set-selections")
        return "sudo " + shlex.join(step)

    lines = [line(s) for s in steps]
    return [*lines, f"echo SEGD_EDGETPU_PYTHON={venv}/bin/python | sudo tee -a {ENV_FILE}"]
