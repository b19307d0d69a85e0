"""Data parallelism on CPU: ``torchrun`` with 2 gloo processes equals 1 process with the doubled
batch (a BatchNorm-free MLP and the deterministic IBP loss make the two runs the same sum)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = """
import json, sys
import torch
from tightrope.apps.train.cli import _distributed
from tightrope.train import Trainer, parse_config

torch.set_num_threads(1)
config = parse_config(json.loads(sys.argv[1]))
out = sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "whole"
distributed = _distributed(torch.device("cpu"))


def interrupt(progress):
    if mode == "cut" and progress.step == 11:
        raise SystemExit(0)


trainer = Trainer(config, run_dir=out + "/run" if distributed.is_main else None,
                  distributed=distributed, on_progress=interrupt)
if mode == "resume":
    trainer.restore(out + "/run/last.pt")
trainer.fit()
torch.save(trainer.model.state_dict(), f"{out}/rank{distributed.rank}.pt")
with open(f"{out}/metrics{distributed.rank}.json", "w") as handle:
    json.dump(trainer.last_metrics, handle)
"""


def _config(batch: int, method: str = "ibp") -> dict[str, object]:
    return {
        "epochs": 2, "seed": 3, "precision": "float64",
        "data": {"dataset": "synthetic", "batch_size": batch, "validation_size": 64,
                 "synthetic_size": 256, "eval_batch_size": 32},
        "model": {"name": "mlp", "options": {"hidden": [32]}},
        "loss": {"method": method},
        "eps": {"train": 0.03, "ramp_epochs": 1},
        "evaluation": {"pgd_steps": 0},
        "checkpoint": {"every_steps": 3},
    }


def _run(command: list[str], env: dict[str, str]) -> None:
    """Run ``command``; on failure show the end of its output (the workers' tracebacks)."""
    done = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), json.dumps(_config(16)), str(tmp_path)],
        env,
    )
    single = tmp_path / "single"
    single.mkdir()
    _run([sys.executable, str(script), json.dumps(_config(32)), str(single)], env)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = torch.load(single / "rank0.pt", weights_only=True)
    for name in one:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], one[name], rtol=1e-9, atol=1e-11)
    shared = json.loads((tmp_path / "metrics0.json").read_text())
    alone = json.loads((single / "metrics0.json").read_text())
    assert shared["samples"] == alone["samples"] == 64
    assert shared["clean_count"] == alone["clean_count"]
    assert (tmp_path / "run" / "last.pt").is_file()
    assert not (tmp_path / "rank1" / "run").exists()


@pytest.mark.slow
def test_tightrope_train_under_torchrun(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "epochs: 2\n"
        "data: {dataset: synthetic, batch_size: 16, validation_size: 64, synthetic_size: 256}\n"
        "model: {name: cnn3, options: {width: 4}}\nloss: {method: ibp}\n"
        "eps: {train: 0.05, ramp_epochs: 1}\nevaluation: {pgd_steps: 2}\n"
    )
    cli = Path(sys.executable).with_name("tightrope-train")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(cli), "--config", str(config), "--out", str(tmp_path / "runs"), "--device", "cpu",
         "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert done.stdout.count("run directory:") == 2  # printed by rank 0 only, start and end
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["samples"] == 64
    assert (run / "best.pt").is_file()


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path: Path) -> None:
    """CC-IBP's random attack starts come from per-process generators, stored per rank."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = json.dumps(_config(16, "cc_ibp"))

    def torchrun(out: Path, mode: str) -> None:
        out.mkdir(exist_ok=True)
        _run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", str(script), config, str(out), mode],
            env,
        )

    torchrun(tmp_path / "whole", "whole")
    torchrun(tmp_path / "cut", "cut")  # 6 steps per epoch: stops after step 11, saved at 9
    assert torch.load(tmp_path / "cut" / "run" / "last.pt", weights_only=True)["step"] == 9
    torchrun(tmp_path / "cut", "resume")
    for rank in range(2):
        whole = torch.load(tmp_path / "whole" / f"rank{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / "cut" / f"rank{rank}.pt", weights_only=True)
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (rank, name)
