"""Dockerfile.arm64 without a Docker engine: its instructions parsed; every COPY source present
in the repository and let through by .dockerignore; the build stage's ``pip install`` resolved
for linux/arm64 from exactly the files those COPYs put in the image; the HEALTHCHECK command run
against a real daemon."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon import Daemon, free_port, start_daemon
from pip_resolve import BOOKWORM_GLIBC_MINOR, aarch64_platforms, cache_dir, installable_on, resolve

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile.arm64"
DOCKERIGNORE = REPO / ".dockerignore"


# --- a Dockerfile reader (the subset of the grammar the file uses, strictly) ---------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
            return value
        return None

    def flags(self) -> tuple[dict[str, str], list[str]]:
        """``--name=value`` flags before the arguments, and the remaining words."""
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    name: str
    base: str
    platform: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


KEYWORDS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
            "ENTRYPOINT", "CMD", "STOPSIGNAL", "LABEL"}  # fmt: skip


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Comments and blank lines inside continuations are skipped,
    as Docker does."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        line = " ".join(p.strip() for p in pending if p.strip())
        pending = []
        keyword, _, args = line.partition(" ")
        assert keyword.upper() == keyword and keyword in KEYWORDS, (
            f"line {start}: unknown instruction {keyword!r}"
        )
        instructions.append(Instruction(keyword, args.strip(), start))
    assert not pending, "the file ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            flags, words = ins.flags()
            assert len(words) == 3 and words[1].upper() == "AS", (
                f"line {ins.line}: every stage is named (FROM image AS name)"
            )
            stages.append(Stage(words[2], expand(words[0], global_args), expand(flags.get("platform", ""), global_args)))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def expand(text: str, args: dict[str, str]) -> str:
    """``${NAME}`` replaced by the ARG defaults (which may refer to earlier ARGs), as Docker does."""
    while (expanded := re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)) != text:
        text = expanded
    return text


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


# --- .dockerignore (Docker's rules: last matching pattern wins; a pattern matching a parent
# directory matches everything below it; "!" re-includes) ----------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for negate, text in dockerignore_lines():
        patterns.append((negate, _glob_regex(text)))
    return patterns


def dockerignore_lines() -> list[tuple[bool, str]]:
    lines = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append((line.startswith("!"), os.path.normpath(line.lstrip("!")).strip("/")))
    return lines


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def test_dockerignore_matcher_follows_dockers_rules() -> None:
    pats = [
        (False, _glob_regex("*")),
        (True, _glob_regex("segd")),
        (False, _glob_regex("**/__pycache__")),
    ]
    assert excluded("tests/test_x.py", pats) and excluded(".venv/bin/python", pats)
    assert not excluded("segd/cli.py", pats)
    assert excluded("segd/__pycache__/cli.cpython-311.pyc", pats)


def build_context(tmp: Path) -> Path:
    """The build context the Docker daemon would receive, as a directory (symlinks kept)."""
    patterns = dockerignore_patterns()
    reincluded = [text for negate, text in dockerignore_lines() if negate]
    ctx = tmp / "context"
    for top, dirs, files in os.walk(REPO):
        rel_top = Path(top).relative_to(REPO).as_posix()
        rel_top = "" if rel_top == "." else rel_top + "/"
        # Do not descend where everything is excluded and nothing is re-included (.venv, .git).
        dirs[:] = [d for d in dirs if not (excluded(rel_top + d, patterns)
                   and not any(r.startswith(rel_top + d + "/") for r in reincluded))]  # fmt: skip
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            rel = rel_top + name
            path = REPO / rel
            if excluded(rel, patterns):
                continue
            target = ctx / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                target.symlink_to(os.readlink(path))
            else:
                shutil.copy2(path, target)
    return ctx


def docker_copy(context: Path, root: Path, sources: list[str], dest: str) -> None:
    """COPY semantics: a directory source copies its contents; several sources or a trailing
    slash make the destination a directory; symlinks stay symlinks."""
    dest_path = root / dest
    into_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        origin = context / source
        if origin.is_dir() and not origin.is_symlink():
            shutil.copytree(origin, dest_path, symlinks=True, dirs_exist_ok=True)
        else:
            target = dest_path / origin.name if into_dir else dest_path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target, follow_symlinks=False)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_context(tmp_path_factory.mktemp("docker"))


# --- structure -------------------------------------------------------------------------------------
def test_stages_are_linux_arm64_slim_bookworm_and_copy_only_from_earlier_stages(
    stages: list[Stage],
) -> None:
    assert len(stages) >= 2
    assert len({s.name for s in stages}) == len(stages)
    for s in stages:
        assert s.platform == "linux/arm64", s.name
        assert re.fullmatch(r"(python:3\.1[1-3]-slim-bookworm|debian:bookworm-slim)", s.base), (
            s.base
        )
    seen: set[str] = set()
    for s in stages:
        for ins in s.all("COPY"):
            source = ins.flags()[0].get("from")
            assert source is None or source in seen, (
                f"line {ins.line}: COPY --from={source} before that stage"
            )
        seen.add(s.name)
    assert stages[-1].name == "runtime"


def test_copy_sources_exist_and_reach_the_build_context(stages: list[Stage], context: Path) -> None:
    patterns = dockerignore_patterns()
    copied = []
    for s in stages:
        for ins in s.all("COPY"):
            flags, words = ins.flags()
            if "from" in flags:
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), (
                    f"line {ins.line}: COPY {source}: not in the repository"
                )
                assert (context / source).exists(), (
                    f"line {ins.line}: COPY {source}: excluded by .dockerignore"
                )
                copied.append(source)
    assert {"pyproject.toml", "README.md", "segd"} <= set(copied)
    # The context carries nothing else of size or secrecy.
    for rel in (".venv", ".git", "tests", "bench", "models/deeplabv3_mnv2_pascal_quant.tflite"):
        assert excluded(rel, patterns), rel
    # Symlinks inside the copied trees (package data) point at files that are copied too.
    for link in (context / "segd").rglob("*"):
        if link.is_symlink():
            assert link.resolve().is_file(), (
                f"{link.relative_to(context)} -> {os.readlink(link)} is dangling in the image"
            )


def test_runtime_runs_as_a_non_root_user_in_plugdev_with_models_in_a_volume(
    stages: list[Stage],
) -> None:
    runtime = stage(stages, "runtime")
    [user] = runtime.all("USER")
    assert user.args not in ("root", "0") and not user.args.startswith(("0:", "root:"))
    creates = [i for i in runtime.all("RUN") if "useradd" in i.args]
    assert creates, "the USER is created in the final stage"
    words = shlex.split(creates[0].args.split("&&")[0])
    assert words[-1] == user.args and "--system" in words
    assert (
        words[words.index("--groups") + 1] == "plugdev" and words[words.index("--uid") + 1] != "0"
    )
    env = env_of(runtime)
    [volume] = runtime.all("VOLUME")
    assert volume.exec_form() == [env["SEGD_MODELS_DIR"]]
    assert f"chown -R {user.args}" in creates[0].args and env["SEGD_MODELS_DIR"] in creates[0].args


def test_the_image_installs_the_pinned_known_good_edgetpu_pair_of_the_table(stages: list[Stage]) -> None:
    from segd.runtime import pairing

    rec = pairing.Table.load().recommended
    edgetpu, runtime = stage(stages, "edgetpu"), stage(stages, "runtime")
    args = dict(a.args.split("=", 1) for a in edgetpu.all("ARG"))
    assert args == {"LIBEDGETPU_DEB_URL": rec.deb("aarch64"), "TFLITE_RUNTIME_WHEEL_URL": rec.wheel("aarch64"),
                    "EDGETPU": "pair"}  # fmt: skip
    # EDGETPU=none (a CPU-only image, offline builds) skips the fetch and the install, nothing else.
    assert all(i.args.startswith('if [ "${EDGETPU}" = none ]; then') for i in edgetpu.all("RUN"))
    assert [a.args for a in runtime.all("ARG")] == ["EDGETPU=pair"]
    fetch = " ".join(i.args for i in edgetpu.all("RUN"))
    assert f'pip install "{rec.numpy}" "${{TFLITE_RUNTIME_WHEEL_URL}}"' in fetch and '"${LIBEDGETPU_DEB_URL}"' in fetch
    install = " ".join(i.args for i in runtime.all("RUN"))
    assert f"{rec.package} libedgetpu/accepted-eula boolean true" in install
    assert "apt-get install -y --no-install-recommends /tmp/libedgetpu.deb" in install
    assert "packages.cloud.google.com" not in DOCKERFILE.read_text()  # not Coral's stock 16.0
    copies = [i.flags() for i in runtime.all("COPY")]
    assert ({"from": "edgetpu"}, ["/opt/segd-tpu", "/opt/segd-tpu"]) in copies
    assert env_of(runtime)["SEGD_EDGETPU_PYTHON"] == "/opt/segd-tpu/bin/python"


def test_entrypoint_port_and_venv_paths_agree(stages: list[Stage]) -> None:
    build, runtime = stage(stages, "build"), stage(stages, "runtime")
    assert "python -m venv /opt/segd" in " ".join(i.args for i in build.all("RUN"))
    assert any(
        i.flags() == ({"from": "build"}, ["/opt/segd", "/opt/segd"]) for i in runtime.all("COPY")
    )
    [entry], [cmd] = runtime.all("ENTRYPOINT"), runtime.all("CMD")
    assert (entry.exec_form() or []) + (cmd.exec_form() or []) == ["/opt/segd/bin/segd", "serve"]
    env = env_of(runtime)
    [expose] = runtime.all("EXPOSE")
    assert expose.args == env["SEGD_PORT"]
    # The image's settings load, and the non-loopback bind is refused without a key: the docs
    # must (and do) tell users to pass SEGD_API_KEY.
    from segd.app.server import InsecureBind, check_bind
    from segd.settings import load_settings

    settings = load_settings(env={k: v for k, v in env.items() if k.startswith("SEGD_")})
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    with pytest.raises(InsecureBind):
        check_bind(settings)
    assert "SEGD_API_KEY" in (REPO / "docs" / "RASPBERRY_PI.md").read_text()


# --- the build stage's pip install, for real ------------------------------------------------------
def pip_install_step(build: Stage) -> tuple[list[str], str]:
    """(pip options, target) of the build stage's ``pip install``."""
    for ins in build.all("RUN"):
        for command in ins.args.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["/opt/segd/bin/pip", "install"]:
                options = [w for w in words[2:] if w.startswith("-")]
                [target] = [w for w in words[2:] if not w.startswith("-")]
                return options, target
    raise AssertionError("no pip install in the build stage")


def test_build_stage_pip_install_resolves_to_aarch64_wheels_from_the_copied_files(
    stages: list[Stage], context: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    build = stage(stages, "build")
    options, target = pip_install_step(build)
    assert options == ["--only-binary=:all:"]  # nothing may be compiled on the Pi
    [workdir] = build.all("WORKDIR")
    assert target == workdir.args
    # Lay the image's /src out from the COPY instructions, from the build context.
    src = tmp_path / "src"
    for ins in build.all("COPY"):
        _, words = ins.flags()
        docker_copy(context, src, words[:-1], words[-1])
    cache = cache_dir(request)
    resolved = resolve([str(src)], "3.11", aarch64_platforms(), cache_dir=cache, work_dir=tmp_path)
    [project] = [r for r in resolved if r.local]
    assert project.name == "segd"
    wheels = [r for r in resolved if not r.local]
    assert {"ai-edge-litert", "numpy", "opencv-python-headless", "fastapi"} <= {
        r.name for r in wheels
    }
    bad = [
        r.filename
        for r in wheels
        if not installable_on(r.filename, "aarch64", BOOKWORM_GLIBC_MINOR)
    ]
    assert bad == []

    # And the wheel built from those files carries the package data install-service needs.
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if proc.returncode != 0 and "NewConnectionError" in proc.stderr:
        pytest.skip("the package index is unreachable (build dependencies)")
    assert proc.returncode == 0, proc.stderr
    [wheel] = out.glob("segd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for data in (
            "segd/data/segd.service",
            "segd/data/segd.env",
            "segd/data/99-coral-edgetpu.rules",
            "segd/data/variants.toml",
        ):
            assert data in names and z.getinfo(data).file_size > 0, data
        assert z.read("segd/data/segd.service") == (REPO / "systemd" / "segd.service").read_bytes()


# --- HEALTHCHECK, run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("health"), models_dir, "--model", "deeplabv3_mnv2_dm05_pascal",
                     "--accelerator", "cpu", wait="healthy")  # fmt: skip
    yield d
    d.stop()


def test_healthcheck_command_passes_on_a_live_daemon_and_fails_without_one(
    stages: list[Stage], daemon: Daemon
) -> None:
    runtime = stage(stages, "runtime")
    [hc] = runtime.all("HEALTHCHECK")
    options, _, command = hc.args.partition(" CMD ")
    assert "--start-period=" in options and "--interval=" in options
    argv = json.loads(command)
    assert argv[0] == "/opt/segd/bin/python" and "/healthz" in argv[-1]
    argv[0] = sys.executable  # the image's venv python, here this run's
    port = daemon.url.rsplit(":", 1)[1]
    env = {**os.environ, "SEGD_PORT": port}
    assert (
        subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode == 0
    )
    dead = subprocess.run(
        argv,
        env={**env, "SEGD_PORT": str(free_port())},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert dead.returncode != 0 and b"Connection refused" in dead.stderr
