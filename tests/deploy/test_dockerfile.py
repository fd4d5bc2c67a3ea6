"""Static checks of the Dockerfile (no Docker engine here to build it): pinned bases, the
targets the chart and README name, non-root final stages, nothing secret or bulky copied."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^FROM (\S+) AS (\S+)$", line)
        if m:
            base = re.sub(r"\$\{(\w+)\}", lambda a: args[a.group(1)], m.group(1))
            current = stages.setdefault(m.group(2), [f"FROM {base}"])
        elif current and line.strip() and not line.startswith("#"):
            current.append(line.strip())
    return stages


def test_targets_exist_and_final_stages_run_as_non_root() -> None:
    stages = _stages()
    assert {"gateway", "optimizer", "triton-cpu"} <= set(stages)
    for target in ("gateway", "optimizer", "triton-cpu"):
        users = [line for line in stages[target] if line.startswith("USER ")]
        assert users, target
        uid = users[-1].split()[1].split(":")[0]
        assert uid not in ("0", "root"), target


def test_base_images_are_pinned() -> None:
    for name, lines in _stages().items():
        base = lines[0].removeprefix("FROM ")
        if base in _stages():  # a stage of this file
            continue
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, f"{name}: {base}"


def test_dockerignore_keeps_environments_and_data_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", ".venv-triton", "bedside-demo", "tests"} <= ignored


# --- supply chain: every image installs only hashed, locked dependencies ------------------

LOCKS = {"gateway": ("build-gateway", ()), "optimizer": ("build-optimizer",
                                                         ("optimizer", "deploy"))}


def _pip_installs(stage: list[str]) -> list[str]:
    commands = [part.strip() for line in stage if line.startswith("RUN ")
                for part in line.removeprefix("RUN ").split("&&")]
    return [c for c in commands if re.search(r"\bpip install\b", c)]


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """requirements/NAME.lock -> {normalized name: (version, hashes)}; environment markers
    may pin one name twice (e.g. per Python version): the last pin is kept."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text(encoding="utf-8")
    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", text.replace("\\\n", " ")):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+?)(?:\s*;\s*[^-]+?)?\s+((?:--hash=\S+\s*)+)$", entry)
        assert m, f"{name}.lock: not an exact, hashed pin: {entry[:120]}"
        hashes = re.findall(r"--hash=(\S+)", m.group(3))
        pins[_norm(m.group(1))] = (m.group(2), hashes)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements(extras: tuple[str, ...]) -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def test_images_install_dependencies_only_from_hashed_locks() -> None:
    stages = _stages()
    for lock, (stage, _) in LOCKS.items():
        installs = _pip_installs(stages[stage])
        assert installs, stage
        deps = [c for c in installs if f"-r requirements/{lock}.lock" in c]
        assert len(deps) == 1, (stage, installs)
        assert "--require-hashes" in deps[0] and "--no-deps" in deps[0], deps[0]
        for command in installs:
            if command in deps:
                continue
            # the project itself: nothing resolved, nothing fetched for the build
            assert command.endswith(" /src") and "--no-deps" in command and \
                "--no-build-isolation" in command, (stage, command)
    triton = _pip_installs(stages["triton-cpu"])
    assert len(triton) == 1 and "--require-hashes" in triton[0] and "--no-deps" in triton[0] \
        and "triton-cpu.lock" in triton[0], triton


def test_locks_pin_every_dependency_of_pyproject_with_hashes() -> None:
    from packaging.requirements import Requirement

    for lock, (_, extras) in LOCKS.items():
        pins = _lock(lock)
        for pin, (_, hashes) in pins.items():
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), pin
        for text in [*_pyproject_requirements(extras), "setuptools>=68"]:
            req = Requirement(text)
            name = _norm(req.name)
            assert name in pins, f"{lock}.lock lacks {name}: run scripts/lock.sh"
            assert req.specifier.contains(pins[name][0], prereleases=True), (
                f"{lock}.lock pins {name}=={pins[name][0]}, pyproject wants {req.specifier}: "
                "run scripts/lock.sh")


def test_optimizer_lock_has_the_cpu_torch_build() -> None:
    version, hashes = _lock("optimizer")["torch"]
    assert version == "2.13.0+cpu" and hashes
    assert not [name for name in _lock("optimizer") if name.startswith("nvidia-")]


def test_triton_cpu_lock_covers_its_input() -> None:
    from packaging.requirements import Requirement

    pins = _lock("triton-cpu")
    for line in (ROOT / "requirements" / "triton-cpu.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert req.specifier.contains(pins[_norm(req.name)][0]), line


def test_lock_script_is_what_the_locks_name() -> None:
    for lock in ("gateway", "optimizer", "triton-cpu"):
        head = (ROOT / "requirements" / f"{lock}.lock").read_text(encoding="utf-8")[:300]
        assert "scripts/lock.sh" in head, lock
    assert (ROOT / "scripts" / "lock.sh").stat().st_mode & 0o111


def test_gateway_image_command_parses_and_chooses_keys_and_tls() -> None:
    """The image's default command is a valid `bedside gateway` line with API keys and TLS
    (the CLI refuses to start without an explicit security choice)."""
    import json

    from services.cli import _parser

    lines = _stages()["gateway"]
    entry = json.loads(next(x for x in lines if x.startswith("ENTRYPOINT "))[11:])
    cmd = json.loads(next(x for x in lines if x.startswith("CMD "))[4:])
    assert entry[0] == "bedside"
    args = _parser().parse_args([*entry[1:], *cmd])
    assert args.api_keys is not None and not args.no_auth
    assert args.tls_cert is not None and args.tls_key is not None and not args.plaintext


def test_no_secrets_baked_into_images() -> None:
    """Keys, certificates and tokens come from mounted Secrets at run time, never the image."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for line in text.replace("\\\n", " ").splitlines():
        if re.match(r"^(ARG|ENV)\s", line):
            assert not re.search(r"(?i)(key|token|secret|passw|credential)", line), line
        if line.startswith(("COPY", "ADD")):
            assert not re.search(r"(?i)(\.pem|\.key|\.crt|keys\.(ya?ml|json)|\.env\b|id_rsa)",
                                 line), line
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert ".git" in ignored  # history (and anything ever committed by mistake) stays out


def test_gateway_image_installs_no_torch_onnx_or_monai() -> None:
    """The gateway needs only the torch-free model contract from the optimizer
    (tests/gateway/test_torch_free.py): neither its lock nor the core dependencies it installs
    name an ML framework or a CUDA package."""
    from packaging.requirements import Requirement

    heavy = {"torch", "torchvision", "monai", "onnx", "onnxruntime", "onnxruntime-gpu",
             "onnxscript", "tensorrt"}
    pins = _lock("gateway")
    assert not heavy & set(pins), sorted(heavy & set(pins))
    assert not [name for name in pins if name.startswith("nvidia-")]
    core = {_norm(Requirement(text).name) for text in _pyproject_requirements(())}
    assert not heavy & core, sorted(heavy & core)
    assert "torch" in {_norm(Requirement(t).name) for t in _pyproject_requirements(("optimizer",))}
