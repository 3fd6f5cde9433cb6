"""``--log tensorboard`` / ``--log wandb``: the records read back from the TensorBoard event file
(tensorboard's EventAccumulator) and from the offline W&B run equal metrics.jsonl's, with the
config; a missing package or W&B login is one ``error:`` line before any work; tracking changes
no result, and a run started without it resumes with it."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from _eval_fixtures import cli
from conftest import tiny_run_kwargs

pytest_plugins = ["_eval_fixtures"]  # tiny_lm (session)
tb = pytest.importorskip("tensorboard")


def read_wandb_log(path: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file: W&B's transaction log, LevelDB-log framed
    (32 KiB blocks; each chunk: CRC32 u32, length u16, type u8 [1 full, 2 first, 3 middle, 4 last]
    after a 7-byte header). A reader for the test only: kcs-lens writes through ``wandb``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's zero-padded tail
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_records(run_dir: Path) -> tuple[dict, list[dict]]:
    """(the run record: display name, group, config; the history rows without W&B's own keys)
    of the one offline W&B run in ``run_dir/wandb``."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run: dict = {}
    history = []
    for rec in read_wandb_log(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = {
                "display_name": rec.run.display_name,
                "group": rec.run.run_group,
                "config": {i.key: json.loads(i.value_json) for i in rec.run.config.update},
            }
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            history.append({"step": row.pop("_step"), **{k: v for k, v in row.items() if not k.startswith("_")}})
    return run, history


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from kcs_lens.discovery.rundir import RunDir
    from kcs_lens.tracking import record_scalars

    out: dict[str, list[tuple[int, float]]] = {}
    for rec in RunDir(run_dir).read_metrics():
        for k, v in record_scalars(rec).items():
            out.setdefault(k, []).append((rec["step"], v))
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_kg, tiny_model_dir, tiny_lm):
    """A 12-step tiny run logged to TensorBoard and to an offline W&B run."""
    from kcs_lens.discovery.runner import discover

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("tracked") / "run"
    try:
        discover(
            out=out,
            lens_model=tiny_lm,
            log=lambda m: None,
            track=["tensorboard", "wandb"],
            **tiny_run_kwargs(tiny_kg, tiny_model_dir),
        )
    finally:
        mp.undo()
    return out


def test_tensorboard_records_equal_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    got, want = tensorboard_scalars(tracked), expected_scalars(tracked)
    assert set(got) == set(want) and {"target_ratio", "sparsity", "train/suppression"} <= set(want)
    for k in want:
        assert [s for s, _ in got[k]] == [s for s, _ in want[k]], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]], rel=1e-6), k  # float32 in the event file
    acc = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["config"] == json.loads((tracked / "config.json").read_text())["config"]


def test_wandb_offline_records_equal_metrics_jsonl(tracked):
    from kcs_lens.discovery.rundir import RunDir
    from kcs_lens.tracking import record_scalars

    run, history = wandb_records(tracked)
    assert run["display_name"] == tracked.name
    assert run["config"]["config"] == json.loads((tracked / "config.json").read_text())["config"]
    want = [{"step": r["step"], **record_scalars(r)} for r in RunDir(tracked).read_metrics()]
    assert history == want  # JSON doubles: exactly the numbers of metrics.jsonl


def test_tracking_changes_no_result(tracked, real_run):
    """The same settings without tracking (the session's real_run) give the same masks and config."""
    from kcs_lens.masks.subnetwork import Subnetwork

    a, b = Subnetwork.load(tracked / "subnetwork.safetensors"), Subnetwork.load(real_run / "subnetwork.safetensors")
    assert all(torch.equal(a.logits[n], b.logits[n]) for n in a.logits)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (tracked, real_run))
    assert ca["config"] == cb["config"] and ca["model_fingerprint"] == cb["model_fingerprint"]


def test_resume_with_tracking_of_a_run_started_without(tmp_path, tiny_kg, tiny_model_dir, tiny_lm):
    """--log is a run option: a run started without it resumes with it; TensorBoard gets the records
    of the resumed steps, equal to metrics.jsonl's."""
    from kcs_lens.discovery.runner import discover

    out = tmp_path / "run"
    assert (
        discover(out=out, lens_model=tiny_lm, log=lambda m: None, stop_after=6, **tiny_run_kwargs(tiny_kg, tiny_model_dir))
        is None
    )
    assert not (out / "tensorboard").exists()
    summary = discover(resume=out, lens_model=tiny_lm, log=lambda m: None, track=["tensorboard"])
    assert summary is not None
    got = tensorboard_scalars(out)
    want = {k: [(s, v) for s, v in pts if s > 6] for k, pts in expected_scalars(out).items()}
    assert {k: [s for s, _ in v] for k, v in got.items()} == {k: [s for s, _ in v] for k, v in want.items()}
    assert [s for s, _ in got["sparsity"]] == [9, 12]


def test_unknown_tracker_is_one_error_line(tmp_path):
    r = cli("discover", "--log", "mlflow", "--out", tmp_path / "run")
    assert r.exit_code == 2 and r.output.startswith("error: --log 'mlflow': expected one of tensorboard, wandb"), r.output
    assert not (tmp_path / "run").exists()


def test_wandb_without_login_is_one_error_line_before_work(tmp_path, monkeypatch):
    for v in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    r = cli("discover", "--log", "wandb", "--out", tmp_path / "run")
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --log wandb: not logged in") and "WANDB_MODE=offline" in r.output
    assert "kcs-lens discover:" not in r.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_is_one_error_line(kind, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = cli("discover", "--log", kind, "--out", tmp_path / "run")
    assert r.exit_code == 2 and r.output.startswith(f"error: --log {kind} needs the {kind} package"), r.output
    assert "kcs-lens[track]" in r.output and not (tmp_path / "run").exists()


def test_sweep_checks_tracking_before_any_cell(tmp_path, monkeypatch):
    from test_sweep import study_file

    monkeypatch.setitem(sys.modules, "wandb", None)
    r = cli("sweep", study_file(tmp_path), "--out", tmp_path / "study", "--log", "wandb", "--no-progress")
    assert r.exit_code == 2 and r.output.startswith("error: --log wandb needs the wandb package"), r.output
    assert not (tmp_path / "study").exists()


def test_force_deletes_the_tracking_folders(tmp_path):
    """--force replaces a run's own files, tensorboard/ and wandb/ included, and keeps the user's."""
    from kcs_lens.discovery.rundir import RunDir

    for d in ("tensorboard", "wandb"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x").write_text("x")
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    assert RunDir(tmp_path).clear() == [tmp_path / "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
