"""Two nodes on one machine: the real `deepspeed --hostfile` launcher over pdsh and ssh (an sshd
on a loopback port, two ssh aliases for it), ZeRO-3 across both node ranks, then the checkpoint
consolidated into one file that matches the run's final weights."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, VENV_BIN, free_port, train_losses

pytestmark = pytest.mark.system


def test_two_nodes_train_zero3_over_ssh_and_consolidate(ssh_nodes, tokenizer_dir, pretrain_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    # pdsh runs each node's launch command in a fresh login shell: only PYTHON* variables (and
    # NCCL* on GPUs) travel by themselves; the rest comes from a .deepspeed_env file (here named
    # by DS_ENV_FILE). The venv goes first on PATH so DeepSpeed's JIT ops build with its ninja.
    ds_env = tmp_path / "ds_env"
    ds_env.write_text(f"OMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n"
                      f"PATH={VENV_BIN}:/usr/local/bin:/usr/bin:/bin\n")
    out = tmp_path / "run"
    args = {"preset": "debug", "tokenizer": tokenizer_dir, "data": pretrain_data, "output-dir": out, "seq-len": 32,
            "micro-batch-size": 4, "max-steps": 8, "warmup-steps": 2, "lr": 3e-3, "log-interval": 1,
            "eval-interval": 8, "eval-samples": 16, "save-interval": 4, "zero-stage": 3, "precision": "fp32"}
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launcher/pretrain.py"]
    cmd += [x for k, v in args.items() for x in (f"--{k}", str(v))]
    proc = subprocess.run(cmd, cwd=ROOT, env=ssh_nodes.env(DS_ENV_FILE=str(ds_env)), capture_output=True,
                          text=True, errors="replace", timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    # pdsh started one launcher per node; node-b is node rank 1 and its rank ran to the end
    assert "pdsh -S" in output and "export OMP_NUM_THREADS=1" in output
    assert "node-a: " in output and "node-b: " in output
    assert "nnodes=2, num_local_procs=1, node_rank=1" in output
    assert output.count("exits successfully") == 2, output[-3000:]
    assert sorted(train_losses(out)) == list(range(1, 9))

    # every rank wrote its ZeRO-3 partition
    tag = out / "checkpoints" / "global_step8"
    for rank in (0, 1):
        assert (tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (tag / f"rng_state_{rank}.pt").is_file()

    consolidated = tmp_path / "model.safetensors"
    done = subprocess.run([str(VENV_BIN / "zerotrain"), "consolidate", str(out / "checkpoints"), str(consolidated)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    gathered, final = load_file(consolidated), load_file(out / "final" / "model.safetensors")
    assert final.keys() <= gathered.keys()
    for key in final:
        assert torch.equal(gathered[key], final[key]), key
