"""Every command in a ```bash block of docs/*.md and README.md runs and exits 0, or is skipped by
the explicit list below with its reason (the Hub, a GPU, a cluster, a placeholder, hours of
compute). A new command in the docs that is neither runnable here nor in the list fails the test.

The commands run as a user would type them (through the CLI's app in this process, as the
``kcs-lens`` script runs it), in a fresh folder per page, in page order, with these
changes to keep them short: ``discover`` runs 2 steps; ``--draws`` is 1; ``compare-circuits`` uses
4 prompts and 10 bootstrap resamples; ``downstream`` 1 epoch, 1 seed, 1 random draw; the page's
``study.toml`` is study.md's bundled study with one TargetKG (two seeds) and 2 steps per cell. A run directory a command reads
that no earlier command of the page wrote (``runs/location-s84`` beside ``-s1318``) is made first by a
2-step ``discover`` of that TargetKG and seed (a study directory, by ``sweep study.toml``); an output that an earlier command already wrote is
moved aside first (the pages show commands one at a time, not as one script).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires_bundled
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# (regular expression on the command line, why it does not run here); the first match wins
SKIP: list[tuple[str, str]] = [
    (r"--model gpt2|--model \"\$M\"|gpt2-medium\.toml|runs/m-b-84", "needs GPT-2 weights from the Hugging Face Hub"),
    (r"hf:|wikitext-2|hf download|load_dataset", "needs the Hugging Face Hub"),
    (r"--devices? cuda|--num-gpus|gpu_step\.sh|cuda\.is_available", "needs a CUDA GPU"),
    (r"ray start|ray stop|ray get-auth-token|RAY_AUTH|--ray-address|srun|scontrol|SLURM", "needs a Ray / Slurm cluster"),
    (
        r"pip install|python3? -m venv|constraints-gpu|bash scripts/test\.sh|\.ci/run|/tmp/ci",
        "installs packages or runs the test suite / CI itself",
    ),
    (r"bench/", "a benchmark: minutes of timing on the GPT-2 shapes (tests/test_bench.py runs bench/ on tiny settings)"),
    (r"scripts/train_bundled\.py", "retrains a bundled model (40 minutes)"),
    (
        r"/tmp/ds-runs|\.\.\.same 4 runs|STUDY/",
        "the measured downstream study (hours of finetuning); cli.md's example runs the same command on one run",
    ),
    (
        r"\bRUN\b|QA_TRAIN|\$P/|\$R\b|\$\{|\"\$|^P=|^R=|^M=|^export |^for |^done$|^head=|^nodes=|^sleep |^import |^ds = |^open\(|^python -c",
        "a template with placeholders or shell scaffolding of the GPU recipe, not a literal command",
    ),
]

# study.md's bundled study ("Measured here"): one of its TargetKGs, both seeds, 2 steps per cell
STUDY = """[base]
model = "bundled"
steps = 2
eval_every = 1
checkpoint_every = 1

[grid]
target_kg = ["building"]
seed = [84, 1318]
"""


def commands(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return out


def skip_reason(cmd: str) -> str | None:
    return next((why for pat, why in SKIP if re.search(pat, cmd)), None)


def argv(cmd: str) -> tuple[dict[str, str], list[str]] | None:
    """``[ENV=x ...] kcs-lens ARGS`` as (env, ARGS); None for anything else."""
    words = shlex.split(cmd)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if not words or Path(words[0]).name != "kcs-lens":
        return None
    return env, words[1:]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    if flag in args:
        args = list(args)
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def shorten(args: list[str]) -> list[str]:
    """The module docstring's substitutions."""
    cmd = args[0] if args else ""
    if cmd == "discover":
        args = _set(args, "--steps", "2")
    if cmd in ("baseline", "report") or (cmd == "report" and "--draws" in args):
        args = _set(args, "--draws", "1")
    if cmd == "compare-circuits":
        args = _set(_set(args, "--max-prompts", "4"), "--n-bootstrap", "10")
    if cmd == "downstream":
        args = _set(_set(_set(args, "--epochs", "1"), "--seeds", "1"), "--baseline-draws", "1")
    return args


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def outputs(args: list[str]) -> list[Path]:
    """What the command writes that a rerun would refuse to overwrite."""
    cmd = args[0]
    if cmd == "sweep" or "--resume" in args:
        return []  # a sweep reruns into its own directory by design
    out = _value(args, "--out")
    if cmd == "discover" and out is None:
        target = Path(_value(args, "--target-kg") or "building").stem
        return [Path("runs") / f"{target}-seed{_value(args, '--seed') or 84}"]
    if out is None:
        return []
    return [Path(out)] + [Path(out + s) for s in (".md", ".csv", ".png", ".html", ".json")]


RUN_NAME = re.compile(r"^(?:.*/)?runs/(?P<target>[a-z]+)-(?:s|seed)?(?P<seed>\d+)$")


def needed_runs(args: list[str], cwd: Path) -> list[Path]:
    """Run directories the command reads (``runs/<target>-s<seed>``) that do not exist yet."""
    if not args or args[0] in ("discover", "sweep", "kg"):
        return []
    return [Path(a) for a in args[1:] if RUN_NAME.match(a) and not (cwd / a).exists()]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run(args: list[str], cwd: Path, env: dict[str, str]) -> Ran:
    """``kcs-lens ARGS`` in ``cwd``: in this process through the CLI's own app (what the
    ``kcs-lens`` script calls), which spares each command the seconds of importing torch and
    transformers; cli/errors.py's exit codes and one-line errors are the same in either. The
    environment of ENV and ``env`` is set for the command and restored after it."""
    from kcs_lens.cli.main import app

    here = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, args, env={**ENV, **env})
    finally:
        os.chdir(here)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return Ran(r.exit_code, r.stdout, err)


ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "offline",
    "COLUMNS": "80",
}


def test_every_docs_command_is_runnable_or_skipped_with_a_reason():
    """Cheap: the classification alone, so a new command in the docs must be placed."""
    unplaced = [(p.name, c) for p in PAGES for c in commands(p) if skip_reason(c) is None and argv(c) is None]
    assert not unplaced, f"commands in the docs that neither run here nor are in SKIP: {unplaced}"
    assert sum(1 for p in PAGES for c in commands(p) if skip_reason(c) is None) >= 25


def _wordnet_available() -> bool:
    return Path("/usr/share/wordnet").is_dir()


@pytest.mark.slow
@requires_bundled
@pytest.mark.parametrize("page", [p for p in PAGES if any(skip_reason(c) is None for c in commands(p))], ids=lambda p: p.name)
def test_docs_commands_exit_zero(page: Path, tmp_path: Path, one_thread):
    (tmp_path / "study.toml").write_text(STUDY)
    ran = []
    for cmd in commands(page):
        if skip_reason(cmd) is not None:
            continue
        parsed = argv(cmd)
        assert parsed is not None, cmd
        env, args = parsed
        if args[:2] == ["kg", "wordnet"] and not _wordnet_available():
            continue  # the WordNet database (Debian's wordnet-base) is not installed here
        missing = [k for k in ("tensorboard", "wandb") if k in args and importlib.util.find_spec(k) is None]
        if "--log" in args and missing:
            continue  # the page installs the track extra first (pip install 'kcs-lens[track]'); not here
        if "kg/target_location.jsonl" in args and not (tmp_path / "kg").exists():
            continue  # reads what `kg wordnet` above would have written
        args = shorten(args)
        for need in needed_runs(args, tmp_path):
            m = RUN_NAME.match(str(need))
            assert m is not None
            r = run(
                [
                    "discover",
                    "--target-kg",
                    m["target"],
                    "--seed",
                    m["seed"],
                    "--steps",
                    "2",
                    "--out",
                    str(need),
                    "--no-progress",
                ],
                tmp_path,
                {},
            )
            assert r.returncode == 0, f"setting up {need} for `{cmd}`:\n{r.stdout}\n{r.stderr}"
        for a in args[1:]:  # a study directory read before the page's sweep command made it
            if args[0] != "sweep" and a.startswith("studies/") and not (tmp_path / a).exists():
                r = run(["sweep", "study.toml", "--out", a, "--no-progress"], tmp_path, {})
                assert r.returncode == 0, f"setting up {a} for `{cmd}`:\n{r.stdout}\n{r.stderr}"
        for i, p in enumerate(outputs(args)):
            if (tmp_path / p).exists():
                (tmp_path / p).rename(tmp_path / f"{p}.before-{len(ran)}-{i}")
        r = run(args, tmp_path, env)
        assert r.returncode == 0, (
            f"{page.name}: `{cmd}` (run as kcs-lens {shlex.join(args)}) exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
        ran.append(cmd)
    assert ran, page.name
